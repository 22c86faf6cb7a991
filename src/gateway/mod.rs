//! The gateway (data plane): a Pingora `ProxyHttp` service.
//!
//! This build answers `GET /healthz` and `GET /v1/models` (the tiers with their customer prices);
//! chat completions arrive with the proxy itself (issue #3). The service is built the way the
//! full gateway will be: conf and store checked before Pingora starts, responses written by the
//! service in OpenAI's shapes, errors mapped in one place ([`error::ApiError`]).

pub mod error;
mod models;
mod service;

pub use service::GatewayService;

use crate::conf::Conf;
use pingora::server::Server;
use pingora::server::configuration::ServerConf;
use std::sync::Arc;

/// Builds the Pingora server with the gateway service listening on `conf.gateway.listen`.
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
                .div_ceil(1000) as u64,
        ),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();
    let listen = conf.gateway.listen.to_string();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        GatewayService::new(conf),
        "duang gateway",
    );
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server
}
