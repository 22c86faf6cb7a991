//! The gateway's background worker (a Pingora background service): it connects the store inside
//! Pingora's runtime, returns leases a previous run of this node left behind, warms the key cache
//! and the tokenizer, resolves upstream addresses, and then keeps the cache fresh, writes settled
//! requests in batches, and returns idle leases. On shutdown it waits for requests in flight,
//! writes what is queued and returns every lease.

use super::auth::{REFRESH_EVERY, Refresher};
use super::state::Gateway;
use crate::store::{Settlement, Store};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::ServiceReadyNotifier;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settlements written in one transaction at most.
const BATCH_MAX: usize = 512;
/// How long the first settlement of a batch waits for others to join it.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
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

/// Writes a batch; a batch the store refuses is retried one settlement at a time so one bad
/// entry cannot hold the others back.
async fn write(gw: &Gateway, store: &Store, batch: Vec<Settlement>) {
    let node_id = gw.node_id.as_str();
    let billed: Vec<(i64, crate::money::NanoUsd)> = batch
        .iter()
        .filter(|s| s.billed.is_positive())
        .map(|s| (s.record.key_id, s.billed))
        .collect();
    for attempt in 0..5 {
        match store.settle_batch(node_id, &batch).await {
            Ok(()) => {
                gw.spend.written(&billed);
                let mut keys: Vec<(i64, i64)> = batch
                    .iter()
                    .map(|s| (s.record.key_id, s.record.finished_at))
                    .collect();
                keys.sort_unstable();
                keys.dedup_by_key(|k| k.0);
                for (key_id, at) in keys {
                    let _ = store.touch_key(key_id, at).await;
                }
                return;
            }
            Err(crate::store::StoreError::Invalid(_)) => break,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "writing usage failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    }
    for s in batch {
        match store.settle_batch(node_id, std::slice::from_ref(&s)).await {
            Ok(()) if s.billed.is_positive() => gw.spend.written(&[(s.record.key_id, s.billed)]),
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, request_id = %s.record.request_id, "usage record could not be written")
            }
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

        let Some(mut rx) = gw.settlements_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        let mut idle = tokio::time::interval(Duration::from_secs(5));
        let mut resolve = tokio::time::interval(RESOLVE_EVERY);
        let mut spent = tokio::time::interval(super::spend::REFRESH_SPENT_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = refresh.tick() => {
                    if let Err(e) = refresher.pass(&gw.keys, &store).await {
                        tracing::warn!(error = %e, "refreshing the key cache failed");
                    }
                }
                Some(first) = rx.recv() => {
                    // Gather for a moment: one transaction for many requests is what makes
                    // usage logging cheap under load.
                    let mut batch = vec![first];
                    let until = tokio::time::Instant::now() + BATCH_WINDOW;
                    while batch.len() < BATCH_MAX {
                        match tokio::time::timeout_at(until, rx.recv()).await {
                            Ok(Some(s)) => batch.push(s),
                            _ => break,
                        }
                    }
                    write(gw, &store, batch).await;
                }
                _ = idle.tick() => return_idle(gw, &store).await,
                _ = spent.tick() => {
                    // Between batch writes, so what is stored and what is unwritten never overlap.
                    let followed = gw.spend.followed(crate::time::now_ms());
                    if !followed.is_empty() {
                        match store.key_spent(&followed).await {
                            Ok(totals) => gw.spend.refreshed(&totals, &followed),
                            Err(e) => tracing::warn!(error = %e, "reading capped keys' spending failed"),
                        }
                    }
                }
                _ = resolve.tick() => {
                    let g = gw.clone();
                    let _ = tokio::task::spawn_blocking(move || resolve_all(&g)).await;
                }
            }
        }

        // Shutdown: let requests in flight finish, write everything, give every lease back.
        let deadline = Instant::now() + gw.conf.gateway.graceful_shutdown_timeout;
        loop {
            let mut batch = Vec::new();
            while let Ok(s) = rx.try_recv() {
                batch.push(s);
            }
            if !batch.is_empty() {
                write(gw, &store, batch).await;
            }
            if gw.credit.holds_in_flight() == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while let Ok(s) = rx.try_recv() {
            write(gw, &store, vec![s]).await;
        }
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
                    super::metrics::METRICS
                        .holds_in_flight
                        .set(gw.credit.holds_in_flight());
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
