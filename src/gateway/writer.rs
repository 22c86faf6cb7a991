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
//! Nothing is ever dropped. Each settlement is journaled before the answer's last bytes go out
//! (see `nodes`), so a crash loses none; while the store is down the writer keeps what arrives in
//! its backlog and retries (backing off up to [`RETRY_MAX`]) for as long as it takes, and the
//! backlog is the metric `duang_usage_backlog`. A record the store refuses on its own while others
//! go through is kept aside and retried every minute.
//!

use super::state::{Gateway, Queued};
use crate::store::{Settlement, Store};
use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Settlements waiting for the writer at most (a few seconds of a busy node's traffic, some
/// tens of MiB); a request that finds it full waits. While the store is down the writer keeps
/// taking them into its backlog (they are in the journal too), so requests do not wait on it.
pub const QUEUE_CAPACITY: usize = 65_536;
/// Settlements written in one transaction at most.
const BATCH_MAX: usize = 512;
/// How long the first settlement of a batch waits for others to join it.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// The longest wait between two tries while the store refuses.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often settlements the store refused alone (while taking others) are tried again.
const STUCK_RETRY: Duration = Duration::from_secs(60);

/// Starts the writer thread. It writes until the drain's `flush` (requests are all done), then
/// writes everything queued and completes the returned receiver with how many settlements it
/// could not write (the store stayed down: they wait in the journal for the next start).
pub fn spawn(
    gw: Arc<Gateway>,
    rx: mpsc::Receiver<Queued>,
) -> std::io::Result<oneshot::Receiver<usize>> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("duang-writer".into())
        .spawn(move || {
            let unwritten = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(run(&gw, rx)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the usage writer's runtime");
                    usize::MAX
                }
            };
            let _ = done_tx.send(unwritten);
        })?;
    Ok(done_rx)
}

/// The writer's own connection (`None`: the gateway finished draining before one could be
/// made). An in-memory SQLite database exists only in its own pool, so that one is shared.
async fn open(gw: &Gateway) -> Option<Store> {
    let store_conf = gw.conf().store.clone();
    let in_memory = store_conf.backend == crate::conf::Backend::Sqlite
        && crate::store::sqlite_path(store_conf.url.expose()).is_none();
    if in_memory && let Some(store) = gw.store() {
        return Some(store.clone());
    }
    let mut conf = store_conf;
    conf.max_connections = NonZeroU32::MIN;
    loop {
        match Store::connect(&conf).await {
            Ok(store) => return Some(store),
            Err(e) => {
                tracing::error!(error = %e, "usage writer: store unavailable; retrying");
                tokio::select! {
                    () = flush_deadline(gw) => return None,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Resolves once a drain has asked for the flush and its margin for writing has run out.
async fn flush_deadline(gw: &Gateway) {
    gw.drain.flush.wait().await;
    tokio::time::sleep(super::drain::FLUSH_MARGIN).await;
}

/// What the writer holds: taken from the queue, not yet in the store.
struct Backlog {
    pending: VecDeque<Queued>,
    /// Refused by the store on their own while others went through.
    stuck: Vec<Queued>,
    stuck_since: Instant,
}

impl Backlog {
    fn len(&self) -> usize {
        self.pending.len() + self.stuck.len()
    }
}

async fn run(gw: &Gateway, mut rx: mpsc::Receiver<Queued>) -> usize {
    let Some(store) = open(gw).await else {
        let queued = rx.len();
        tracing::error!(
            queued,
            "shutting down without a store connection; the journal keeps the queued usage for the next start"
        );
        return queued.max(1);
    };
    let mut backlog = Backlog {
        pending: VecDeque::new(),
        stuck: Vec::new(),
        stuck_since: Instant::now(),
    };
    let mut failures = 0u32;
    loop {
        let flushing = gw.drain.flush.is_set();
        if flushing {
            take_queued(&mut rx, &mut backlog.pending, usize::MAX);
            if backlog.pending.is_empty() {
                if !backlog.stuck.is_empty() {
                    backlog.pending.extend(backlog.stuck.drain(..));
                    write_some(gw, &store, &mut backlog).await;
                }
                return backlog.len();
            }
        } else if backlog.pending.is_empty() {
            tokio::select! {
                () = gw.drain.flush.wait() => continue,
                Some(first) = rx.recv() => {
                    // Gather for a moment: one transaction for many requests is what makes usage
                    // logging cheap under load. Sleep, then take what came: waiting on the queue
                    // instead would wake this thread once per request, a context switch each.
                    backlog.pending.push_back(first);
                    take_queued(&mut rx, &mut backlog.pending, BATCH_MAX);
                    if backlog.pending.len() < BATCH_MAX {
                        tokio::time::sleep(BATCH_WINDOW).await;
                        take_queued(&mut rx, &mut backlog.pending, BATCH_MAX);
                    }
                }
            }
        }
        if !backlog.stuck.is_empty() && backlog.stuck_since.elapsed() >= STUCK_RETRY {
            backlog.stuck_since = Instant::now();
            let stuck: Vec<Queued> = backlog.stuck.drain(..).collect();
            backlog.pending.extend(stuck);
        }
        if write_some(gw, &store, &mut backlog).await {
            failures = 0;
            continue;
        }
        // The store refused: wait, taking what requests settle meanwhile so they never wait on
        // the store (their settlements are journaled; the backlog is a metric).
        failures += 1;
        let wait = Duration::from_millis(200u64 << failures.min(5)).min(RETRY_MAX);
        tracing::warn!(
            backlog = backlog.len(),
            retry_in_ms = wait.as_millis() as u64,
            "writing usage failed; keeping it and retrying"
        );
        let until = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                Some(q) = rx.recv() => backlog.pending.push_back(q),
                () = flush_deadline(gw), if flushing => {
                    tracing::error!(backlog = backlog.len(), "the store is still down at shutdown: the journal keeps this usage for the next start");
                    return backlog.len() + rx.len();
                }
            }
        }
    }
}

/// Moves what is queued into `into`, up to `max` there, without waiting.
fn take_queued(rx: &mut mpsc::Receiver<Queued>, into: &mut VecDeque<Queued>, max: usize) {
    while into.len() < max {
        match rx.try_recv() {
            Ok(s) => into.push_back(s),
            Err(_) => break,
        }
    }
}

/// Writes the front of the backlog as one batch. `false`: the store refused it all (down). A
/// batch the store refuses is tried one settlement at a time, so one bad entry cannot hold the
/// others back: entries refused alone while others go through are set aside as stuck (retried
/// every minute, never dropped; they stay in the journal too).
async fn write_some(gw: &Gateway, store: &Store, backlog: &mut Backlog) -> bool {
    let n = backlog.pending.len().min(BATCH_MAX);
    let batch: Vec<Queued> = backlog.pending.drain(..n).collect();
    let settlements: Vec<Settlement> = batch.iter().map(|q| q.settlement.clone()).collect();
    match store.settle_batch(&gw.instance_id, &settlements).await {
        Ok(()) => {
            stored(gw, store, &batch).await;
            true
        }
        Err(e) if batch.len() == 1 => {
            tracing::warn!(error = %e, request_id = %batch[0].settlement.record.request_id, "writing a usage record failed");
            backlog.pending.extend(batch);
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, rows = batch.len(), "writing a usage batch failed; trying its records one by one");
            let mut ok = Vec::new();
            let mut refused = Vec::new();
            for q in batch {
                match store
                    .settle_batch(&gw.instance_id, std::slice::from_ref(&q.settlement))
                    .await
                {
                    Ok(()) => ok.push(q),
                    Err(_) => refused.push(q),
                }
            }
            if ok.is_empty() {
                // Nothing went through: the store is down, keep the order.
                for q in refused.into_iter().rev() {
                    backlog.pending.push_front(q);
                }
                return false;
            }
            for q in &refused {
                tracing::error!(request_id = %q.settlement.record.request_id, "the store refuses this usage record on its own; kept (journal and memory) and retried every minute");
            }
            backlog.stuck.extend(refused);
            stored(gw, store, &ok).await;
            true
        }
    }
}

/// After a write: the journal may drop these entries, keys' last use moves on.
async fn stored(gw: &Gateway, store: &Store, batch: &[Queued]) {
    if let Some(j) = gw.journal.get() {
        let mut tickets: Vec<super::journal::Ticket> =
            batch.iter().filter_map(|q| q.ticket).collect();
        tickets.sort_unstable();
        for t in tickets.chunk_by(|a, b| a == b) {
            j.journal.stored(t[0], t.len() as u64);
        }
    }
    let mut keys: Vec<(i64, i64)> = batch
        .iter()
        .map(|q| (q.settlement.record.key_id, q.settlement.record.finished_at))
        .collect();
    // Each key's latest use.
    keys.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    keys.dedup_by_key(|k| k.0);
    for (key_id, at) in keys {
        let _ = store.touch_key(key_id, at).await;
    }
}
