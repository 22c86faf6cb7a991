//! The gateway's background worker (a Pingora background service): it connects the store inside
//! Pingora's runtime, returns leases a previous run of this node left behind, warms the key cache
//! and the tokenizer, resolves upstream addresses, starts the usage [`writer`](super::writer), and
//! then keeps the cache fresh and returns idle leases. On shutdown it waits for the writer (which
//! lets requests in flight finish and writes what they settle) and returns every lease.

use super::auth::{REFRESH_EVERY, Refresher};
use super::state::Gateway;
use crate::store::Store;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::ServiceReadyNotifier;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An account idle this long gives its unpromised lease back.
const LEASE_IDLE_MS: i64 = 30_000;
const RESOLVE_EVERY: Duration = Duration::from_secs(30);

pub struct Worker {
    pub gateway: Arc<Gateway>,
}

async fn connect(gw: &Gateway) -> Store {
    loop {
        match Store::open(&gw.conf.store).await {
            Ok(store) => return store,
            Err(e) => {
                tracing::error!(error = %e, "gateway: store unavailable; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn resolve_all(gw: &Arc<Gateway>) {
    for (p, ep) in gw.conf.providers.iter().zip(&gw.endpoints) {
        if p.enabled && !ep.resolve() {
            tracing::error!(provider = %p.name, host = %ep.host, "cannot resolve the provider's host; will retry");
        }
    }
}

async fn return_idle(gw: &Gateway, store: &Store) {
    let idle_before = crate::time::now_ms() - LEASE_IDLE_MS;
    for (account_id, amount) in gw.credit.take_idle(idle_before) {
        if let Err(e) = store
            .return_lease(account_id, &gw.node_id, Some(amount))
            .await
        {
            tracing::warn!(error = %e, account_id, "returning an idle lease failed; keeping it");
            gw.credit.restore(account_id, amount);
        }
    }
}

#[async_trait]
impl BackgroundService for Worker {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let gw = &self.gateway;
        if let Some(r) = gw.limits.redis() {
            // Inside Pingora's runtime, so the connection lives as long as the server.
            let r = r.clone();
            tokio::spawn(async move { r.connect().await });
        }
        let store = connect(gw).await;
        if let Some(r) = gw.limits.redis() {
            // Give Redis a moment, so the first requests already share their limits; a Redis that
            // is down does not hold the gateway back (the outage policy applies meanwhile).
            let deadline = Instant::now() + Duration::from_secs(2);
            while !r.is_up() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        match store.return_node_leases(&gw.node_id).await {
            Ok((n, total)) if n > 0 => {
                tracing::info!(leases = n, %total, node = %gw.node_id, "returned leases left by a previous run")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "returning old leases failed"),
        }
        let mut refresher = Refresher::new();
        if let Err(e) = refresher.pass(&gw.keys, &store).await {
            tracing::error!(error = %e, "warming the key cache failed");
        }
        let _ = gw.store.set(store.clone());
        let g = gw.clone();
        let _ = tokio::task::spawn_blocking(move || {
            resolve_all(&g);
            super::relay::tokenizer();
        })
        .await;
        tracing::info!(keys = gw.keys.len(), node = %gw.node_id, "gateway ready");
        ready.notify_ready();

        let Some(rx) = gw.settlements_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        // The usage writer: a thread of its own, with its own store connection (see `writer`).
        let writer = match super::writer::spawn(gw.clone(), rx, shutdown.clone()) {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the usage writer");
                return;
            }
        };
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        let mut idle = tokio::time::interval(Duration::from_secs(5));
        let mut resolve = tokio::time::interval(RESOLVE_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = refresh.tick() => {
                    if let Err(e) = refresher.pass(&gw.keys, &store).await {
                        tracing::warn!(error = %e, "refreshing the key cache failed");
                    }
                }
                _ = idle.tick() => return_idle(gw, &store).await,
                _ = resolve.tick() => {
                    let g = gw.clone();
                    let _ = tokio::task::spawn_blocking(move || resolve_all(&g)).await;
                }
            }
        }

        // Shutdown: the writer lets requests in flight finish and writes what they settle; then
        // every lease goes back.
        let _ = writer.await;
        match store.return_node_leases(&gw.node_id).await {
            Ok((n, total)) => tracing::info!(leases = n, %total, "returned leases at shutdown"),
            Err(e) => {
                tracing::error!(error = %e, "returning leases at shutdown failed; the next start returns them")
            }
        }
    }
}

/// Serves `GET /metrics` on `gateway.metrics_listen`.
pub struct MetricsServer {
    pub gateway: Arc<Gateway>,
}

#[async_trait]
impl BackgroundService for MetricsServer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let addr = self.gateway.conf.gateway.metrics_listen;
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, %addr, "cannot listen for metrics");
                return;
            }
        };
        let gw = self.gateway.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let gw = gw.clone();
                async move {
                    let m = &*super::metrics::METRICS;
                    m.holds_in_flight.set(gw.credit.holds_in_flight());
                    m.usage_queue.set(gw.usage_queue_depth() as i64);
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        super::metrics::render(),
                    )
                }
            }),
        );
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
    }
}
