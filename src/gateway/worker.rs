//! The gateway's background worker (a Pingora background service): it connects the store inside
//! Pingora's runtime, registers this instance and recovers crashed ones from the journal (see
//! `nodes`), warms the key cache
//! and the tokenizer, resolves upstream addresses, starts the usage [`writer`](super::writer), and
//! then keeps the cache fresh, returns idle leases and renews this instance's heartbeat (see
//! `nodes`). On shutdown it drains (see `drain`): requests finish, the writer writes what they
//! settled, and every lease goes back.

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
/// How often this node looks for recalls of its leases (what another node short of credit, or a
/// debit, waits for).
const RECALL_EVERY: Duration = Duration::from_millis(100);

pub struct Worker {
    pub gateway: Arc<Gateway>,
}

async fn connect(gw: &Gateway) -> Store {
    loop {
        match Store::open(&gw.conf().store).await {
            Ok(store) => return store,
            Err(e) => {
                tracing::error!(error = %e, "gateway: store unavailable; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn resolve_all(gw: &Arc<Gateway>) {
    let live = gw.routing();
    for (p, ep) in live.conf.providers.iter().zip(&live.endpoints) {
        if p.enabled && !ep.resolve() {
            tracing::error!(provider = %p.name, host = %ep.host, "cannot resolve the provider's host; will retry");
        }
    }
}

/// How often the providers' prepaid credit is read from the store.
const PREPAID_EVERY: Duration = Duration::from_secs(5);

/// Reads what is left of each provider's prepaid credit: its metrics, and for a provider whose
/// conf says `leave_routing_when_prepaid_spent`, whether its upstreams are still tried (a
/// reload's new providers are read at the next pass).
async fn check_prepaid(gw: &Gateway, store: &Store) {
    let credits = match store.provider_credits().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "reading the providers' prepaid credit failed");
            return;
        }
    };
    let live = gw.routing();
    let m = &super::metrics::METRICS;
    for (p, ep) in live.conf.providers.iter().zip(&live.endpoints) {
        let label = [p.name.as_str()];
        let credit = credits.iter().find(|c| c.provider == p.name);
        let spent = credit.is_some_and(|c| !c.remaining.is_positive());
        let leave = spent && p.leave_routing_when_prepaid_spent;
        if ep
            .prepaid_spent
            .swap(leave, std::sync::atomic::Ordering::Relaxed)
            != leave
        {
            if leave {
                tracing::warn!(provider = %p.name, "prepaid credit spent: its upstreams leave routing");
            } else {
                tracing::info!(provider = %p.name, "prepaid credit available: its upstreams are routed again");
            }
        }
        match credit {
            Some(c) => {
                m.prepaid_remaining
                    .with_label_values(&label)
                    .set(c.remaining.nanos());
                m.prepaid_left_routing
                    .with_label_values(&label)
                    .set(i64::from(leave));
                if let Some(below) = p.prepaid_alert_below {
                    m.prepaid_alert_below
                        .with_label_values(&label)
                        .set(below.nanos());
                }
            }
            None => {
                let _ = m.prepaid_remaining.remove_label_values(&label);
                let _ = m.prepaid_left_routing.remove_label_values(&label);
                let _ = m.prepaid_alert_below.remove_label_values(&label);
            }
        }
    }
}

async fn return_idle(gw: &Gateway, store: &Store) {
    let idle_before = crate::time::now_ms() - LEASE_IDLE_MS;
    super::nodes::return_idle(&gw.credit, &gw.spend, &gw.instance_id, store, idle_before).await;
}

/// Replays what dead instances of this node's journal root left, returns their leases.
async fn recover(gw: &Gateway, store: &Store) {
    let Some(own) = gw.journal.get() else {
        return;
    };
    let fingerprint = super::nodes::store_fingerprint(&gw.conf());
    super::nodes::recover_orphans(&own.dir, &fingerprint, store).await;
}

async fn answer_recalls(gw: &Gateway, store: &Store) {
    super::nodes::answer_recalls(&gw.credit, &gw.spend, &gw.instance_id, store).await;
}

/// A node's heartbeat: when it last went through, and since when it has gone through without a
/// gap (a node sweeps others only once it has itself been in touch with the store for a whole
/// expiry, so after an outage of the store every node has had the time to renew first).
struct Beat {
    last_ok_ms: i64,
    healthy_since_ms: i64,
}

/// One heartbeat: renew this instance, fence or unfence its credit, sweep instances that stopped.
async fn heartbeat(gw: &Gateway, store: &Store, beat: &mut Beat) {
    let now = crate::time::now_ms();
    let expiry_ms = gw.conf().gateway.lease_expiry.as_millis() as i64;
    match store.heartbeat(&gw.instance_id, now).await {
        Ok(true) => {
            if now - beat.last_ok_ms > 2 * super::nodes::HEARTBEAT_EVERY.as_millis() as i64 {
                beat.healthy_since_ms = now;
            }
            beat.last_ok_ms = now;
            gw.credit.fence(false);
        }
        Ok(false) => {
            let forgotten = gw.credit.forget_all();
            gw.spend.forget_all();
            tracing::error!(instance = %gw.instance_id, %forgotten, "this instance was swept (no heartbeat for the lease expiry): its leases went back to the balances; leasing anew");
            if store
                .register_instance(&gw.instance_id, &gw.conf().gateway.node_id, now)
                .await
                .is_ok()
            {
                beat.last_ok_ms = now;
                beat.healthy_since_ms = now;
                gw.credit.fence(false);
            }
        }
        Err(e) => {
            if now - beat.last_ok_ms > expiry_ms / 2 {
                gw.credit.fence(true);
                tracing::error!(error = %e, "heartbeat failing for half the lease expiry: not spending leased credit until it goes through");
            } else {
                tracing::warn!(error = %e, "heartbeat failed");
            }
            return;
        }
    }
    if now - beat.healthy_since_ms < expiry_ms {
        return;
    }
    match store.sweep_instances(now - expiry_ms).await {
        Ok(swept) => {
            for (instance, n, total) in swept {
                super::metrics::METRICS.leases_swept.inc_by(n as u64);
                tracing::warn!(%instance, leases = n, %total, "returned the leases of a gateway instance that stopped renewing");
            }
        }
        Err(e) => tracing::warn!(error = %e, "sweeping stopped instances failed"),
    }
}

/// Graceful shutdown (see `drain`): requests finish, or are ended at the deadline; the writer
/// writes everything; leases go back (only if everything was written: otherwise the journal's
/// replay at the next start needs them).
async fn drain(gw: &Gateway, store: &Store, writer: tokio::sync::oneshot::Receiver<usize>) {
    let d = &gw.drain;
    let started = Instant::now();
    let deadline = started + gw.conf().gateway.graceful_shutdown_timeout;
    tracing::info!(in_flight = gw.requests_in_flight(), "draining");
    let settled_by = |until: Instant| async move {
        while gw.requests_in_flight() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    settled_by(deadline).await;
    if gw.requests_in_flight() > 0 {
        tracing::warn!(
            in_flight = gw.requests_in_flight(),
            "grace time over: ending the streams still open (billed for what was delivered)"
        );
        d.cut.set();
        settled_by(Instant::now() + super::drain::FLUSH_MARGIN / 2).await;
    }
    d.flush.set();
    let unwritten = writer.await.unwrap_or(usize::MAX);
    if let Some(j) = gw.journal.get()
        && let Err(e) = j.journal.sync()
    {
        tracing::error!(error = %e, "flushing the journal to disk failed");
    }
    if unwritten > 0 {
        tracing::error!(
            unwritten,
            "usage could not be written before exit: it waits in the journal, and the leases stay until the next start replays it"
        );
        return;
    }
    let _ = gw.credit.take_all();
    match store.return_node_leases(&gw.instance_id).await {
        Ok((n, total)) => {
            tracing::info!(leases = n, %total, took_ms = started.elapsed().as_millis() as u64, "returned leases at shutdown");
            let _ = store.forget_instance(&gw.instance_id).await;
            if let Some(j) = gw.journal.get()
                && let Err(e) = std::fs::remove_dir_all(&j.dir)
            {
                tracing::warn!(error = %e, "removing this instance's (empty) journal failed");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "returning leases at shutdown failed; they return by expiry or at the next start")
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
        while let Err(e) = store
            .register_instance(
                &gw.instance_id,
                &gw.conf().gateway.node_id,
                crate::time::now_ms(),
            )
            .await
        {
            tracing::error!(error = %e, "registering this gateway instance failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        recover(gw, &store).await;
        check_prepaid(gw, &store).await;
        let mut refresher = Refresher::new();
        if let Err(e) = refresher.pass(&gw.keys, &store).await {
            tracing::error!(error = %e, "warming the key cache failed");
        }
        let _ = gw.store.set(store.clone());
        let g = gw.clone();
        let _ = tokio::task::spawn_blocking(move || {
            resolve_all(&g);
            super::tokens::tokenizer();
        })
        .await;
        tracing::info!(keys = gw.keys.len(), instance = %gw.instance_id, "gateway ready");
        gw.ready.set();
        ready.notify_ready();

        let Some(rx) = gw.settlements_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        // The usage writer: a thread of its own, with its own store connection (see `writer`).
        let writer = match super::writer::spawn(gw.clone(), rx) {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the usage writer");
                return;
            }
        };
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        let mut idle = tokio::time::interval(Duration::from_secs(5));
        let mut resolve = tokio::time::interval(RESOLVE_EVERY);
        let mut beats = tokio::time::interval(super::nodes::HEARTBEAT_EVERY);
        let mut fsync = tokio::time::interval(gw.conf().gateway.journal_fsync_interval);
        let started_ms = crate::time::now_ms();
        let mut beat = Beat {
            last_ok_ms: started_ms,
            healthy_since_ms: started_ms,
        };
        let mut recalls = tokio::time::interval(RECALL_EVERY);
        let mut prepaid = tokio::time::interval(PREPAID_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = prepaid.tick() => check_prepaid(gw, &store).await,
                _ = refresh.tick() => {
                    gw.worker_beat();
                    match refresher.pass(&gw.keys, &store).await {
                        Ok(_) => gw.keys.store_answered(),
                        Err(e) => {
                            gw.keys.store_failed();
                            tracing::warn!(error = %e, "refreshing the key cache failed");
                        }
                    }
                }
                _ = idle.tick() => return_idle(gw, &store).await,
                _ = beats.tick() => heartbeat(gw, &store, &mut beat).await,
                _ = recalls.tick() => answer_recalls(gw, &store).await,
                _ = fsync.tick() => {
                    let g = gw.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Some(j) = g.journal.get()
                            && let Err(e) = j.journal.sync()
                        {
                            tracing::error!(error = %e, "flushing the journal to disk failed");
                        }
                    })
                    .await;
                }
                _ = resolve.tick() => {
                    let g = gw.clone();
                    let _ = tokio::task::spawn_blocking(move || resolve_all(&g)).await;
                }
            }
        }
        drain(gw, &store, writer).await;
        gw.drain.finish();
    }
}

/// Serves `GET /metrics` on `gateway.metrics_listen`, and this process's own `GET /healthz` (the
/// API port may be shared by an old and a new process during a rolling deploy; this one is not).
pub struct MetricsServer {
    pub gateway: Arc<Gateway>,
}

#[async_trait]
impl BackgroundService for MetricsServer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // First: SIGHUP's default action ends the process.
        tokio::spawn(reload_on_hangup(self.gateway.clone()));
        let addr = self.gateway.conf().gateway.metrics_listen;
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, %addr, "cannot listen for metrics");
                return;
            }
        };
        let gw = self.gateway.clone();
        let health = self.gateway.clone();
        let ready = self.gateway.clone();
        let reload = self.gateway.clone();
        let app = axum::Router::new()
            .route(
                "/-/reload",
                axum::routing::post(move || {
                    let gw = reload.clone();
                    async move { reload_answer(&reloaded(gw).await) }
                }),
            )
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let (status, body) = ready.readiness();
                    async move {
                        (
                            axum::http::StatusCode::from_u16(status)
                                .unwrap_or(axum::http::StatusCode::SERVICE_UNAVAILABLE),
                            [(axum::http::header::CONTENT_TYPE, "application/json")],
                            body,
                        )
                    }
                }),
            )
            .route(
                "/healthz",
                axum::routing::get(move || {
                    let (status, body) = health.health();
                    async move {
                        (
                            axum::http::StatusCode::from_u16(status)
                                .unwrap_or(axum::http::StatusCode::SERVICE_UNAVAILABLE),
                            [(axum::http::header::CONTENT_TYPE, "application/json")],
                            body,
                        )
                    }
                }),
            )
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let gw = gw.clone();
                    async move {
                        let m = &*super::metrics::METRICS;
                        m.holds_in_flight.set(gw.credit.holds_in_flight());
                        m.usage_queue.set(gw.usage_queue_depth() as i64);
                        m.store_up
                            .set(i64::from(gw.keys.store_down_since().is_none()));
                        if let Some(j) = gw.journal.get() {
                            m.usage_backlog.set(j.journal.backlog() as i64);
                        }
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

/// Reloads the conf off the request threads (it reads files and may resolve hosts).
async fn reloaded(gw: Arc<Gateway>) -> super::routing::Reload {
    tokio::task::spawn_blocking(move || gw.reload())
        .await
        .unwrap_or_else(|e| super::routing::Reload::Refused {
            reason: format!("the reload failed: {e}"),
        })
}

/// `POST /-/reload`'s answer: 200 `reloaded` with the new conf's warnings, or 409 `refused`
/// with the reason (the running conf stays).
fn reload_answer(r: &super::routing::Reload) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (status, body) = match r {
        super::routing::Reload::Applied { warnings } => (
            axum::http::StatusCode::OK,
            serde_json::json!({ "status": "reloaded", "warnings": warnings }),
        ),
        super::routing::Reload::Refused { reason } => (
            axum::http::StatusCode::CONFLICT,
            serde_json::json!({ "status": "refused", "reason": reason }),
        ),
    };
    (status, axum::Json(body)).into_response()
}

/// SIGHUP rereads the conf (`systemctl reload`, `kill -HUP`), as `POST /-/reload` does.
async fn reload_on_hangup(gw: Arc<Gateway>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload with POST /-/reload");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the conf");
        reloaded(gw.clone()).await;
    }
}
