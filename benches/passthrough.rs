//! `duang-bench-passthrough`: a bare Pingora pass-through proxy, the baseline arm of the load
//! benchmark (`benches/load.sh`). It forwards every request to one upstream unchanged: no auth,
//! no body handling, no billing. Whatever the gateway costs on top of this is ours.
//!
//! Usage: `duang-bench-passthrough LISTEN UPSTREAM [THREADS]`, e.g. `127.0.0.1:8090 127.0.0.1:7001 1`.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;

struct Passthrough {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: duang-bench-passthrough LISTEN UPSTREAM [THREADS]");
        std::process::exit(2);
    };
    let threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(1);
    let upstream: SocketAddr = upstream.parse().unwrap_or_else(|e| {
        eprintln!("UPSTREAM must be host:port ({e})");
        std::process::exit(2);
    });
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, Passthrough { upstream });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
