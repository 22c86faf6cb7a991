//! What the gateway shares between requests and its background worker.

use super::auth::KeyCache;
use super::hold::CreditBook;
use super::routing::Routing;
use super::spend::SpendBook;
use crate::conf::Conf;
use crate::store::{Settlement, Store};
use arc_swap::ArcSwap;
use pingora::connectors::TransportConnector;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::mpsc;

pub struct Gateway {
    /// This process's name as a lease holder: the node id and its start (see `nodes`).
    pub instance_id: String,
    /// Settlements are journaled here before the answer's last bytes go out (`None`: an
    /// in-memory store, or a unit test).
    pub journal: OnceLock<super::nodes::LocalJournal>,
    /// Set by the worker once connected (inside Pingora's runtime).
    pub store: OnceLock<Store>,
    pub keys: KeyCache,
    pub credit: Arc<CreditBook>,
    /// Spending of keys with a spend cap.
    pub spend: SpendBook,
    /// Rate limits: Redis when configured, in process otherwise.
    pub limits: super::limits::Limiter,
    /// Settled requests on their way to the store, written in batches by the usage writer
    /// (bounded: a request that finds it full waits, see `writer`).
    pub settlements: mpsc::Sender<Queued>,
    pub(super) settlements_rx: Mutex<Option<mpsc::Receiver<Queued>>>,
    pub connector: TransportConnector,
    /// The conf and what is made from it for requests, replaced whole by a reload: read it once
    /// per request with [`Gateway::routing`].
    pub(super) routing: ArcSwap<Routing>,
    /// Reloads one at a time.
    pub(super) reloading: Mutex<()>,
    /// Set by the worker once the store is connected and the caches warm: requests that arrive
    /// before (the listener is open from the start) wait for it.
    pub ready: super::drain::Flag,
    /// When the worker's loop last went round (see [`Gateway::readiness`]).
    pub worker_beat_ms: AtomicI64,
    /// Graceful shutdown's switches (see `drain`).
    pub drain: Arc<super::drain::Drain>,
    /// Chat requests between their start and their settlement's hand-off to the writer: what a
    /// drain waits for.
    in_flight: AtomicI64,
}

/// A worker that has not gone round its loop for this long is stalled (a store call can hold it
/// for the pool's acquire timeout, 10 s).
const WORKER_STALLED_MS: i64 = 30_000;

/// A settlement on its way to the writer, with where it was journaled.
pub struct Queued {
    pub settlement: Settlement,
    pub ticket: Option<super::journal::Ticket>,
}

/// Counts a request in [`Gateway::in_flight`] until dropped.
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gateway {
    pub fn new(conf: Arc<Conf>) -> Arc<Gateway> {
        let (tx, rx) = mpsc::channel(super::writer::QUEUE_CAPACITY);
        Arc::new(Gateway {
            instance_id: super::nodes::new_instance_id(
                &conf.gateway.node_id,
                crate::time::now_ms(),
            ),
            journal: OnceLock::new(),
            store: OnceLock::new(),
            keys: KeyCache::default(),
            credit: Arc::new(CreditBook::default()),
            spend: SpendBook::default(),
            limits: super::limits::Limiter::new(&conf),
            settlements: tx,
            settlements_rx: Mutex::new(Some(rx)),
            connector: TransportConnector::new(None),
            routing: ArcSwap::from_pointee(Routing::new(conf, None)),
            reloading: Mutex::new(()),
            ready: super::drain::Flag::default(),
            worker_beat_ms: AtomicI64::new(crate::time::now_ms()),
            drain: Arc::default(),
            in_flight: AtomicI64::new(0),
        })
    }

    /// The current conf and routing: a request takes it once, when it arrives, and keeps it.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// The current conf. Settings a reload cannot change ([`Conf::restart_only_changes`]) are
    /// the ones this process started with.
    pub fn conf(&self) -> Arc<Conf> {
        self.routing.load().conf.clone()
    }

    pub fn store(&self) -> Option<&Store> {
        self.store.get()
    }

    /// `/healthz`'s answer: 503 `draining` once a shutdown signal came (the load balancer sends
    /// new traffic elsewhere while streams finish), 200 once connected to the store, 503
    /// `starting` before.
    pub fn health(&self) -> (u16, &'static [u8]) {
        if self.drain.draining.is_set() {
            (503, br#"{"status":"draining"}"#)
        } else if self.ready.is_set() {
            (200, br#"{"status":"ok"}"#)
        } else {
            (503, br#"{"status":"starting"}"#)
        }
    }

    /// `/readyz`'s answer, for a load balancer or an orchestrator deciding where to send
    /// traffic: 200 `ready` when the gateway is started, not draining, its worker is running and
    /// either the store answers or settlements go to a healthy journal (cached keys are then
    /// served and their usage waits on disk); 503 with the reason otherwise.
    pub fn readiness(&self) -> (u16, Vec<u8>) {
        let now = crate::time::now_ms();
        let beat = self.worker_beat_ms.load(Ordering::Acquire);
        let store_down = self.keys.store_down_since();
        let journal_ok = self.journal.get().is_some();
        let (status, reason) = if self.drain.draining.is_set() {
            (503, "draining")
        } else if !self.ready.is_set() {
            (503, "starting")
        } else if now - beat > WORKER_STALLED_MS {
            (503, "worker_stalled")
        } else if store_down.is_some() && !journal_ok {
            (503, "store_unavailable")
        } else {
            (200, "ready")
        };
        let body = serde_json::json!({
            "status": reason,
            "store": if store_down.is_some() { "unavailable" } else { "ok" },
            "store_down_since_ms": store_down,
            "journal": if journal_ok { "ok" } else { "none" },
            "worker_beat_age_ms": now - beat,
        });
        (status, body.to_string().into_bytes())
    }

    /// The worker's loop went round (every key-cache refresh).
    pub fn worker_beat(&self) {
        self.worker_beat_ms
            .store(crate::time::now_ms(), Ordering::Release);
    }

    /// Counts a chat request until its settlement is queued for the writer.
    pub fn request_started(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(&self.in_flight)
    }

    /// Chat requests not yet settled and queued.
    pub fn requests_in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Settled requests waiting for the usage writer.
    pub fn usage_queue_depth(&self) -> usize {
        self.settlements.max_capacity() - self.settlements.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::NanoUsd;
    use crate::store::UsageRecord;

    #[test]
    fn the_usage_queue_depth_counts_what_the_writer_has_not_taken() {
        let gw = Gateway::new(Arc::new(super::super::test_conf(
            "http://127.0.0.1:8000/v1",
        )));
        let settlement = |n: i64| Queued {
            ticket: None,
            settlement: Settlement {
                billed: NanoUsd::ZERO,
                over_hold: NanoUsd::ZERO,
                capped: false,
                record: UsageRecord {
                    request_id: format!("req_{n}"),
                    account_id: 1,
                    key_id: 1,
                    tier: "budget".into(),
                    provider: None,
                    upstream_model: None,
                    stream: false,
                    input_tokens: 0,
                    output_tokens: 0,
                    cached_input_tokens: 0,
                    cache_write_tokens: 0,
                    reasoning_tokens: 0,
                    provider_cost: NanoUsd::ZERO,
                    billed: NanoUsd::ZERO,
                    http_status: 200,
                    error_code: None,
                    attempts: 1,
                    latency_ms: 0,
                    ttft_ms: None,
                    started_at: 0,
                    finished_at: 0,
                },
            },
        };
        assert_eq!(gw.usage_queue_depth(), 0);
        gw.settlements.try_send(settlement(1)).expect("room");
        gw.settlements.try_send(settlement(2)).expect("room");
        assert_eq!(gw.usage_queue_depth(), 2);
        let mut rx = gw.settlements_rx.lock().unwrap().take().expect("receiver");
        rx.try_recv().expect("queued");
        assert_eq!(gw.usage_queue_depth(), 1);
    }
}
