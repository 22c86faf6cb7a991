//! The gateway (data plane): a Pingora `ProxyHttp` service. The request flow, one module per step:
//!
//! 1. [`auth`]: parse and check the key, from an in-memory cache;
//! 2. limits (issue #5);
//! 3. [`request`]: read and validate the body, map the tier;
//! 4. [`hold`]: hold credits for the worst case, from this node's credit lease;
//! 5. [`upstream`]: send to the tier's upstreams with fallback before the first byte;
//! 6. [`relay`]: pass the answer through event by event, reading usage, through the
//!    [`dialect`] seam (chat completions, Messages and Responses on either side), and
//!    [`respond`] to the client;
//! 7. settle: bill the real usage and queue the usage record ([`chat`]); the [`writer`] writes
//!    batches from a thread of its own; the [`worker`] keeps the key cache fresh and returns
//!    idle leases.
//!
//! [`chat`] is the table of contents of these steps; [`ctx`] is what they tell each other.
//! [`conn`] runs each client connection (Pingora's HTTP/1 server session, in a keep-alive loop
//! of its own with the head bounds) and has [`GatewayService::answer`], the service's request
//! phase, answer each request.

pub mod auth;
mod chat;
pub mod conn;
pub mod ctx;
pub mod dialect;
pub mod drain;
pub mod error;
pub mod health;
pub mod hold;
pub mod journal;
pub mod limits;
pub mod metrics;
mod models;
pub mod nodes;
pub mod relay;
pub mod request;
pub mod respond;
pub mod room;
pub mod routing;
mod service;
pub mod spend;
pub mod state;
pub mod tokens;
pub mod upstream;
mod worker;
mod writer;

pub use service::GatewayService;
pub use state::Gateway;

use crate::conf::Conf;
use pingora::server::Server;
use pingora::server::configuration::ServerConf;
use std::sync::Arc;

/// Runs the gateway until a shutdown signal has been drained (see [`drain`]): returns once every
/// request in flight has finished or been ended, its usage written and its leases returned.
pub fn run(conf: Arc<Conf>) -> std::process::ExitCode {
    let (server, gateway) = match build_server(conf) {
        Ok(built) => built,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let drain = gateway.drain.clone();
    let signals = drain::Signals {
        drain: drain.clone(),
    };
    let pingora = std::thread::Builder::new()
        .name("duang-server".into())
        .spawn(move || {
            server.run(pingora::server::RunArgs {
                shutdown_signal: Box::new(signals),
            });
            // Pingora's backstop ended the runtimes (its grace period ran out).
            drain.finish();
        });
    if let Err(e) = pingora {
        eprintln!("error: cannot start the server thread: {e}");
        return std::process::ExitCode::FAILURE;
    }
    gateway.drain.wait_done();
    tracing::info!("gateway stopped");
    std::process::ExitCode::SUCCESS
}

/// Builds the Pingora server: the background worker, and the gateway service listening on
/// `conf.gateway.listen`, which starts taking requests once the worker is ready.
pub fn build_server(conf: Arc<Conf>) -> Result<(Server, Arc<Gateway>), String> {
    let grace = conf.gateway.graceful_shutdown_timeout + drain::FLUSH_MARGIN;
    let server_conf = ServerConf {
        threads: conf.gateway.threads.get() as usize,
        // Only a backstop: the worker drains (streams finish or are ended at the conf's
        // deadline, usage is written, leases go back) and `run` returns as soon as it is done.
        // Pingora's grace period is a fixed sleep before its runtimes drop every task.
        grace_period_seconds: Some(grace.as_millis().div_ceil(1000) as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();
    let gateway = Gateway::new(conf.clone());
    metrics::METRICS
        .conf_loaded
        .set(crate::time::now_ms() / 1000);
    if let Some(root) = nodes::journal_root(&conf) {
        let fingerprint = nodes::store_fingerprint(&conf);
        let local = nodes::open_local(&root, &gateway.instance_id, &fingerprint).map_err(|e| {
            format!(
                "cannot open the settlement journal under {} (gateway.journal_dir): {e}",
                root.display()
            )
        })?;
        let _ = gateway.journal.set(local);
    }
    let gateway_for_metrics = gateway.clone();
    let gateway_for_run = gateway.clone();
    let worker = pingora::services::background::background_service(
        "duang worker",
        worker::Worker {
            gateway: gateway.clone(),
        },
    );
    server.add_service(worker);
    // The service behind the client-connection bounds and HTTP/1 loop (`conn`): head timeout
    // and size, a cap on open connections, pipelining.
    let mut proxy = pingora::services::listening::Service::new(
        "duang gateway".to_owned(),
        conn::Connections::new(
            GatewayService::new(gateway),
            conn::Bounds::of(&conf.gateway),
        ),
    );
    // No read buffer on client connections: Pingora's default keeps a zero-filled 64 KiB one per
    // connection, which was most of what an idle stream cost. Headers and bodies are read into
    // their own buffers anyway, so reads still take one system call each.
    //
    // With `gateway.reuse_port`, SO_REUSEPORT: a new gateway process can listen on the same port
    // while the old one drains (the rolling deploy in the README), and the kernel hands new
    // connections to whichever is still accepting.
    let mut socket = pingora::listeners::TcpSocketOptions::default();
    socket.so_reuseport = Some(conf.gateway.reuse_port);
    proxy.add_listener(
        pingora::listeners::ListenerConfig::tcp(conf.gateway.listen.to_string())
            .tcp_socket_options(socket)
            .l4_buffer(pingora::listeners::L4BufferSettings::default().read(0)),
    );
    // No dependency on the worker: the listener is open from the start (so `/healthz` answering
    // 200 means this process is listening, which a rolling deploy needs to know), and requests
    // that arrive before the worker is ready wait for it (`service`).
    server.add_service(proxy);
    let metrics = pingora::services::background::background_service(
        "duang metrics",
        worker::MetricsServer {
            gateway: gateway_for_metrics,
        },
    );
    server.add_service(metrics);
    Ok((server, gateway_for_run))
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
