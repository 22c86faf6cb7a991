//! The gateway (data plane): a Pingora `ProxyHttp` service. The request flow, one module per step:
//!
//! 1. [`auth`]: parse and check the key, from an in-memory cache;
//! 2. limits (issue #5);
//! 3. [`request`]: read and validate the body, map the tier;
//! 4. [`hold`]: hold credits for the worst case, from this node's credit lease;
//! 5. [`upstream`]: send to the tier's upstreams with fallback before the first byte;
//! 6. [`relay`]: pass the answer through event by event, reading usage;
//! 7. settle: bill the real usage and queue the usage record ([`chat`]); the [`writer`] writes
//!    batches from a thread of its own; the [`worker`] keeps the key cache fresh and returns
//!    idle leases.

pub mod anthropic;
pub mod auth;
mod chat;
pub mod error;
pub mod health;
pub mod hold;
pub mod inbound;
pub mod limits;
pub mod metrics;
mod models;
pub mod relay;
pub mod request;
mod service;
pub mod spend;
pub mod state;
pub mod upstream;
mod worker;
mod writer;

pub use service::GatewayService;
pub use state::Gateway;

use crate::conf::Conf;
use pingora::server::Server;
use pingora::server::configuration::ServerConf;
use std::sync::Arc;

/// Builds the Pingora server: the background worker, and the gateway service listening on
/// `conf.gateway.listen`, which starts taking requests once the worker is ready.
pub fn build_server(conf: Arc<Conf>) -> Server {
    let server_conf = ServerConf {
        threads: conf.gateway.threads.get() as usize,
        // No upgrade hand-off: start shutting down at once on SIGTERM, and give streams in
        // flight the conf's grace to finish.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(
            conf.gateway
                .graceful_shutdown_timeout
                .as_millis()
                .div_ceil(1000) as u64
                + 1,
        ),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();
    let gateway = Gateway::new(conf.clone());
    let gateway_for_metrics = gateway.clone();
    let worker = pingora::services::background::background_service(
        "duang worker",
        worker::Worker {
            gateway: gateway.clone(),
        },
    );
    let worker_handle = server.add_service(worker);
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        GatewayService::new(gateway),
        "duang gateway",
    );
    // No read buffer on client connections: Pingora's default keeps a zero-filled 64 KiB one per
    // connection, which was most of what an idle stream cost. Headers and bodies are read into
    // their own buffers anyway, so reads still take one system call each.
    proxy.add_listener(
        pingora::listeners::ListenerConfig::tcp(conf.gateway.listen.to_string())
            .l4_buffer(pingora::listeners::L4BufferSettings::default().read(0)),
    );
    let proxy_handle = server.add_service(proxy);
    proxy_handle.add_dependency(&worker_handle);
    let metrics = pingora::services::background::background_service(
        "duang metrics",
        worker::MetricsServer {
            gateway: gateway_for_metrics,
        },
    );
    server.add_service(metrics);
    server
}

/// A conf with one tier on one OpenAI-compatible provider at `base_url`, for unit tests.
#[cfg(test)]
fn test_conf(base_url: &str) -> Conf {
    let text = format!(
        r#"
[tiers.budget]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
upstreams = [{{ provider = "mock", model = "mock-small" }}]
[providers.mock]
kind = "openai"
base_url = "{base_url}"
models."mock-small" = {{ input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }}
"#
    );
    Conf::parse(&text, "test.toml", &|_| None).expect("conf")
}
