//! Step 7b: the usage writer. Settled requests reach the store in batches, written by a thread of
//! its own with its own store connection, so a slow write never holds up the key cache's refresh
//! and a batch never waits for a pooled connection.
//!
//! What keeps it off the requests' latency: it is woken once per batch, not once per request (it
//! sleeps through the batch window and then takes what came), and its work comes in short runs
//! (multi-row statements of a few dozen rows, see `store::leases`), so a request that arrives
//! while a batch is written waits a fraction of a millisecond, not the whole batch. Tried and
//! measured worse: the writer at idle priority (`SCHED_IDLE`), see BENCHMARKS.md.
//!
//! The queue between the requests and the writer is bounded ([`QUEUE_CAPACITY`]): when the store
//! cannot keep up for seconds, requests that finish wait to enqueue their settlement (their
//! answer has already gone out) rather than let memory grow without end or drop a settlement.
//!
//! The re-read of capped keys' spending runs here too, between batch writes, so what is stored
//! and what is unwritten never overlap (see `spend`).

use super::state::Gateway;
use crate::store::{Settlement, Store};
use pingora::server::ShutdownWatch;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Settlements waiting for the writer at most (a few seconds of a busy node's traffic, some
/// tens of MiB); a request that finds the queue full waits.
pub const QUEUE_CAPACITY: usize = 65_536;
/// Settlements written in one transaction at most.
const BATCH_MAX: usize = 512;
/// How long the first settlement of a batch waits for others to join it.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// Starts the writer thread. It writes until `shutdown`, then lets requests in flight finish
/// (up to the conf's grace), writes everything queued, and completes the returned receiver.
pub fn spawn(
    gw: Arc<Gateway>,
    rx: mpsc::Receiver<Settlement>,
    shutdown: ShutdownWatch,
) -> std::io::Result<oneshot::Receiver<()>> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("duang-writer".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(run(&gw, rx, shutdown)),
                Err(e) => tracing::error!(error = %e, "cannot start the usage writer's runtime"),
            }
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}

/// The writer's own connection (`None`: the gateway shut down before one could be made). An
/// in-memory SQLite database exists only in its own pool, so that one is shared instead.
async fn open(gw: &Gateway, shutdown: &mut ShutdownWatch) -> Option<Store> {
    let in_memory = gw.conf.store.backend == crate::conf::Backend::Sqlite
        && crate::store::sqlite_path(gw.conf.store.url.expose()).is_none();
    if in_memory && let Some(store) = gw.store() {
        return Some(store.clone());
    }
    let mut conf = gw.conf.store.clone();
    conf.max_connections = NonZeroU32::MIN;
    loop {
        match Store::connect(&conf).await {
            Ok(store) => return Some(store),
            Err(e) => {
                tracing::error!(error = %e, "usage writer: store unavailable; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

async fn run(gw: &Gateway, mut rx: mpsc::Receiver<Settlement>, mut shutdown: ShutdownWatch) {
    let Some(store) = open(gw, &mut shutdown).await else {
        tracing::error!(
            queued = rx.len(),
            "shutting down without a store connection; queued usage records are not written"
        );
        return;
    };
    let mut spent = tokio::time::interval(super::spend::REFRESH_SPENT_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(first) = rx.recv() => {
                // Gather for a moment: one transaction for many requests is what makes usage
                // logging cheap under load. Sleep, then take what came: waiting on the queue
                // instead would wake this thread once per request, a context switch each.
                let mut batch = Vec::with_capacity(BATCH_MAX);
                batch.push(first);
                take_queued(&mut rx, &mut batch);
                if batch.len() < BATCH_MAX {
                    tokio::time::sleep(BATCH_WINDOW).await;
                    take_queued(&mut rx, &mut batch);
                }
                write(gw, &store, batch).await;
            }
            _ = spent.tick() => {
                let followed = gw.spend.followed(crate::time::now_ms());
                if !followed.is_empty() {
                    match store.key_spent(&followed).await {
                        Ok(totals) => gw.spend.refreshed(&totals, &followed),
                        Err(e) => tracing::warn!(error = %e, "reading capped keys' spending failed"),
                    }
                }
            }
        }
    }

    // Shutdown: let requests in flight finish, and write everything they settle.
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
}

/// Moves what is queued into `batch`, up to [`BATCH_MAX`], without waiting.
fn take_queued(rx: &mut mpsc::Receiver<Settlement>, batch: &mut Vec<Settlement>) {
    while batch.len() < BATCH_MAX {
        match rx.try_recv() {
            Ok(s) => batch.push(s),
            Err(_) => break,
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
                // Each key's latest use.
                keys.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
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
