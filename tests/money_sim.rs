//! A deterministic, seeded simulation of the money core, in TigerBeetle's way: it drives the real
//! code (the store's leases, settlement, recalls, Stripe credits, disputes and adjustments on a
//! real SQLite file; the gateway's credit book, holds and journal; crash recovery from the
//! journal) through a random sequence of steps on several simulated gateway nodes, with faults
//! injected (a node killed at any step, duplicate webhooks, recalls racing settlements, writes
//! held back), and checks after every step:
//!
//! * no balance below zero, and `balance + leased = ledger sum` for every account;
//! * each external reference applied at most once (a duplicate webhook changes nothing);
//! * every hold settled or released exactly once (the books' holds in flight come back to zero);
//! * at the end, every settled answer billed exactly once: each settled request has one usage
//!   record, and billed plus platform loss is exactly what the nodes settled.
//!
//! `DUANG_SIM_SEEDS` sets how many seeds run (CI: the default), `DUANG_SIM_SEED` replays one;
//! a failure names its seed. `benches/money_sim.sh` runs a million.

mod support;

use duang::conf::Backend;
use duang::gateway::hold::{CreditBook, Hold};
use duang::gateway::nodes::{self, LocalJournal};
use duang::gateway::spend::SpendBook;
use duang::money::NanoUsd;
use duang::store::{
    AccountRef, CheckoutCredit, LedgerKind, NewAccount, NewLedgerEntry, PaidSession, Role,
    Settlement, Store, StoreError, StripeDebit, UsageRecord,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;

const NODES: usize = 3;
const ACCOUNTS: usize = 2;
const STEPS: usize = 40;
const FINGERPRINT: &str = "sim";

/// One simulated gateway process: the real credit book and journal, its open holds, and the
/// settlements it has not written yet.
struct Node {
    instance_id: String,
    credit: Arc<CreditBook>,
    spend: SpendBook,
    journal: LocalJournal,
    holds: Vec<(Hold, i64, i64)>, // hold, account index, worst case
    queued: Vec<(Settlement, Option<duang::gateway::journal::Ticket>)>,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    store: Store,
    root: std::path::PathBuf,
    accounts: Vec<(i64, i64)>, // account id, key id
    nodes: Vec<Node>,
    starts: u64,
    requests: u64,
    /// Request id → what the node settled it for (billed from the lease plus above the hold).
    settled: HashMap<String, (usize, i64)>,
    /// Applied Stripe events, for duplicates.
    events: Vec<(String, String, i64, usize)>, // event id, session id, cents, account index
    payments: Vec<(String, i64)>, // payment intent, cents
    seen: Seen,
}

/// What the seeds went through, so a run shows it exercised the paths that matter.
#[derive(Default, Debug, Clone, Copy)]
struct Seen {
    holds_refused: u64,
    replayed: u64,
    losses: u64,
    recalls_answered: u64,
}

impl Sim {
    fn node(&mut self) -> Node {
        self.starts += 1;
        let instance_id = format!("sim-{}-node/{}", self.seed, self.starts);
        let journal = nodes::open_local(&self.root, &instance_id, FINGERPRINT).expect("journal");
        Node {
            instance_id,
            credit: Arc::new(CreditBook::default().without_recall_wait()),
            spend: SpendBook::default(),
            journal,
            holds: Vec::new(),
            queued: Vec::new(),
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {}: {what} (replay: DUANG_SIM_SEED={} cargo test --test money_sim)",
            self.seed, self.seed
        )
    }

    async fn check(&self, step: &str) {
        for (a, _) in &self.accounts {
            let proof = self.store.balance_proof(*a).await.expect("proof");
            if !proof.holds() {
                self.fail(format!(
                    "after {step}: balance + leased != ledger sum: {proof:?}"
                ));
            }
            let account = self
                .store
                .account(&AccountRef::Id(*a))
                .await
                .expect("account");
            if account.balance.is_negative() || proof.leased.is_negative() {
                self.fail(format!("after {step}: below zero: {proof:?}"));
            }
        }
    }

    async fn top_up(&mut self, a: usize) {
        let cents = self.rng.random_range(1..=100);
        let n = self.events.len();
        let session = format!("cs_{}_{n}", self.seed);
        let pi = format!("pi_{}_{n}", self.seed);
        let event = format!("evt_{}_{n}", self.seed);
        let account = self.accounts[a].0;
        self.store
            .record_checkout_session(&session, account, cents, "usd")
            .await
            .expect("session");
        let paid = PaidSession {
            event_id: &event,
            event_type: "checkout.session.completed",
            session_id: &session,
            payment_intent: Some(&pi),
            amount_total_cents: cents,
            currency: "usd",
        };
        match self.store.credit_checkout(&paid).await.expect("credit") {
            CheckoutCredit::Credited { .. } => {}
            other => self.fail(format!("a new payment was not credited: {other:?}")),
        }
        self.events.push((event, session, cents, a));
        self.payments.push((pi, cents));
    }

    /// A webhook delivered again (Stripe retries, reorders): it must change nothing.
    async fn duplicate_webhook(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let (event, session, cents, _) =
            self.events[self.rng.random_range(0..self.events.len())].clone();
        let pi = format!("pi_{}", &session[3..]);
        let paid = PaidSession {
            event_id: &event,
            event_type: "checkout.session.completed",
            session_id: &session,
            payment_intent: Some(&pi),
            amount_total_cents: cents,
            currency: "usd",
        };
        match self.store.credit_checkout(&paid).await.expect("credit") {
            CheckoutCredit::DuplicateEvent | CheckoutCredit::AlreadyCredited => {}
            other => self.fail(format!("a duplicate webhook credited again: {other:?}")),
        }
    }

    async fn dispute(&mut self) {
        if self.payments.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.payments.len());
        let (pi, cents) = self.payments[i].clone();
        // Sometimes the same dispute twice.
        let dispute = format!("dp_{}_{}", self.seed, i);
        let event = format!("evt_dp_{}_{}", self.seed, self.rng.random_range(0..2));
        match self
            .store
            .apply_stripe_dispute(&format!("{event}_{i}"), &dispute, &pi, cents, "fraudulent")
            .await
            .expect("dispute")
        {
            StripeDebit::Debited { .. } | StripeDebit::AlreadyApplied | StripeDebit::NothingNew => {
            }
            other => self.fail(format!("a dispute of a known payment: {other:?}")),
        }
    }

    async fn adjust(&mut self, a: usize) {
        let amount = NanoUsd::from_nanos(-self.rng.random_range(1..=2_000_000_000i64));
        let n = self.requests;
        self.requests += 1;
        let r = self
            .store
            .append_ledger(&NewLedgerEntry {
                account_id: self.accounts[a].0,
                kind: LedgerKind::Adjustment,
                amount,
                external_ref: format!("adj_{}_{n}", self.seed),
                actor: Some("sim".into()),
                reason: Some("simulated correction".into()),
            })
            .await;
        match r {
            Ok(_) | Err(StoreError::InsufficientBalance { .. }) => {}
            Err(e) => self.fail(format!("an adjustment failed: {e}")),
        }
    }

    async fn hold(&mut self, n: usize, a: usize) {
        let worst = self.rng.random_range(1..=400_000_000i64);
        let account = self.accounts[a].0;
        let node = &mut self.nodes[n];
        match node
            .credit
            .hold(
                account,
                NanoUsd::from_nanos(worst),
                Some(&self.store),
                &node.instance_id,
                duang::time::now_ms(),
            )
            .await
        {
            Ok(h) => node.holds.push((h, a as i64, worst)),
            Err(_) => self.seen.holds_refused += 1,
        }
    }

    fn settle(&mut self, n: usize) {
        if self.nodes[n].holds.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.nodes[n].holds.len());
        let (hold, a, worst) = self.nodes[n].holds.swap_remove(i);
        let a = a as usize;
        if self.rng.random_bool(0.1) {
            drop(hold); // failed before any output: released whole
            return;
        }
        // Now and then more than the hold (an upstream counting more than the bound).
        let cost = if self.rng.random_bool(0.2) {
            self.rng.random_range(worst..=worst * 20)
        } else {
            self.rng.random_range(0..=worst)
        };
        let (billed, over) = hold.settle(NanoUsd::from_nanos(cost));
        if billed.nanos() + over.nanos() != cost {
            self.fail(format!(
                "a settlement of {cost} split into {billed} + {over}"
            ));
        }
        let request_id = format!("req_{}_{}", self.seed, self.requests);
        self.requests += 1;
        let (account_id, key_id) = self.accounts[a];
        let s = Settlement {
            billed,
            over_hold: over,
            capped: false,
            record: UsageRecord {
                request_id: request_id.clone(),
                account_id,
                key_id,
                tier: "budget".into(),
                provider: Some("sim".into()),
                upstream_model: Some("sim".into()),
                stream: false,
                input_tokens: 1,
                output_tokens: 1,
                cached_input_tokens: 0,
                cache_write_tokens: 0,
                reasoning_tokens: 0,
                provider_cost: NanoUsd::ZERO,
                billed: NanoUsd::from_nanos(cost),
                http_status: 200,
                error_code: None,
                attempts: 1,
                latency_ms: 1,
                ttft_ms: None,
                started_at: 0,
                finished_at: 0,
            },
        };
        let ticket = nodes::journal_settlement(Some(&self.nodes[n].journal), &s);
        self.settled.insert(request_id, (a, cost));
        self.nodes[n].queued.push((s, ticket));
    }

    async fn write(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        if node.queued.is_empty() {
            return;
        }
        let batch: Vec<Settlement> = node.queued.iter().map(|(s, _)| s.clone()).collect();
        self.store
            .settle_batch(&node.instance_id, &batch)
            .await
            .expect("settle");
        for (_, t) in node.queued.drain(..) {
            if let Some(t) = t {
                node.journal.journal.stored(t, 1);
            }
        }
    }

    /// The node is killed: its memory is gone; a new process takes its place on the same machine
    /// and recovers the journal.
    async fn crash(&mut self, n: usize) {
        let fresh = self.node();
        let dead = std::mem::replace(&mut self.nodes[n], fresh);
        drop(dead); // holds dropped with their book; the journal's lock goes with the process
        for r in nodes::recover_orphans(&self.nodes[n].journal.dir, FINGERPRINT, &self.store).await
        {
            self.seen.replayed += r.replayed as u64;
        }
    }

    async fn answer_recalls(&mut self, n: usize) {
        let node = &self.nodes[n];
        let asked = self
            .store
            .recalled(&node.instance_id)
            .await
            .expect("recalled")
            .len();
        nodes::answer_recalls(&node.credit, &node.spend, &node.instance_id, &self.store).await;
        self.seen.recalls_answered += asked as u64;
    }

    async fn return_idle(&mut self, n: usize) {
        let node = &self.nodes[n];
        nodes::return_idle(
            &node.credit,
            &node.spend,
            &node.instance_id,
            &self.store,
            i64::MAX,
        )
        .await;
    }

    /// Every node settles what it holds, writes, and shuts down cleanly (or the last ones crash
    /// and are recovered): then everything settled must be billed exactly once.
    async fn finish(&mut self) {
        for n in 0..NODES {
            while !self.nodes[n].holds.is_empty() {
                self.settle(n);
            }
            if self.rng.random_bool(0.3) {
                self.crash(n).await;
            } else {
                self.write(n).await;
            }
        }
        for n in 0..NODES {
            let node = &self.nodes[n];
            if node.credit.holds_in_flight() != 0 {
                self.fail(format!(
                    "{} holds never settled or released",
                    node.credit.holds_in_flight()
                ));
            }
            let _ = node.credit.take_all();
            self.store
                .return_node_leases(&node.instance_id)
                .await
                .expect("return");
        }
        self.check("the shutdown").await;
        let mut billed_per_account = [0i64; ACCOUNTS];
        for (a, (account_id, _)) in self.accounts.iter().enumerate() {
            let records = self
                .store
                .usage_page(*account_id, None, 100_000)
                .await
                .expect("usage");
            for r in &records {
                if !self.settled.contains_key(&r.request_id) {
                    self.fail(format!("a usage record nobody settled: {}", r.request_id));
                }
                billed_per_account[a] += r.billed.nanos();
            }
            // What the usage records say was billed is what the ledger took.
            let taken: i64 = self
                .store
                .ledger(*account_id, 100_000)
                .await
                .expect("ledger")
                .iter()
                .filter(|e| e.kind == LedgerKind::Usage)
                .map(|e| -e.amount.nanos())
                .sum();
            if taken != billed_per_account[a] {
                self.fail(format!(
                    "account {a}: usage records bill {} but the ledger took {taken}",
                    billed_per_account[a]
                ));
            }
            let proof = self.store.balance_proof(*account_id).await.expect("proof");
            if proof.leased != NanoUsd::ZERO {
                self.fail(format!("leases left after every node shut down: {proof:?}"));
            }
        }
        let mut recorded = 0;
        for (a, (account_id, _)) in self.accounts.iter().enumerate() {
            recorded += self
                .store
                .usage_page(*account_id, None, 100_000)
                .await
                .expect("usage")
                .len();
            let settled: i64 = self
                .settled
                .values()
                .filter(|(x, _)| *x == a)
                .map(|(_, c)| c)
                .sum();
            let loss = self
                .store
                .platform_loss(*account_id)
                .await
                .expect("loss")
                .nanos();
            self.seen.losses += u64::from(loss > 0);
            if billed_per_account[a] + loss != settled {
                self.fail(format!(
                    "account {a}: billed {} + loss {loss} != settled {settled}",
                    billed_per_account[a]
                ));
            }
        }
        if recorded != self.settled.len() {
            self.fail(format!(
                "{recorded} usage records for {} settled answers",
                self.settled.len()
            ));
        }
    }
}

async fn run(store: &Store, seed: u64) -> Seen {
    let dir = tempfile::tempdir().expect("dir");
    let mut sim = Sim {
        seed,
        rng: StdRng::seed_from_u64(seed),
        store: store.clone(),
        root: dir.path().join("journal"),
        accounts: Vec::new(),
        nodes: Vec::new(),
        starts: 0,
        requests: 0,
        settled: HashMap::new(),
        events: Vec::new(),
        payments: Vec::new(),
        seen: Seen::default(),
    };
    for i in 0..ACCOUNTS {
        let account = store
            .create_account(&NewAccount {
                email: format!("sim{seed}x{i}@example.com"),
                password_hash: None,
                role: Role::Customer,
                verified: true,
            })
            .await
            .expect("account");
        let (_, key_id) = support::new_key(store, account.id).await;
        sim.accounts.push((account.id, key_id));
        sim.top_up(i).await;
    }
    for _ in 0..NODES {
        let n = sim.node();
        sim.nodes.push(n);
    }
    for step in 0..STEPS {
        let n = sim.rng.random_range(0..NODES);
        let a = sim.rng.random_range(0..ACCOUNTS);
        let op = sim.rng.random_range(0..100);
        let name = match op {
            0..35 => {
                sim.hold(n, a).await;
                "hold"
            }
            35..60 => {
                sim.settle(n);
                "settle"
            }
            60..72 => {
                sim.write(n).await;
                "write"
            }
            72..82 => {
                sim.answer_recalls(n).await;
                "answer recalls"
            }
            82..86 => {
                sim.crash(n).await;
                "crash"
            }
            86..89 => {
                sim.top_up(a).await;
                "top-up"
            }
            89..92 => {
                sim.duplicate_webhook().await;
                "duplicate webhook"
            }
            92..95 => {
                sim.dispute().await;
                "dispute"
            }
            95..97 => {
                sim.adjust(a).await;
                "adjustment"
            }
            _ => {
                sim.return_idle(n).await;
                "idle return"
            }
        };
        sim.check(&format!("step {step} ({name})")).await;
    }
    sim.finish().await;
    sim.seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_money_core_keeps_its_invariants_on_every_seed() {
    let t = support::TestStore::new(Backend::Sqlite).await;
    if let Some(seed) = std::env::var("DUANG_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        let seen = run(&t.store, seed).await;
        eprintln!("seed {seed}: invariants held; {seen:?}");
        return;
    }
    let seeds: u64 = std::env::var("DUANG_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let first: u64 = std::env::var("DUANG_SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let started = std::time::Instant::now();
    let mut total = Seen::default();
    for seed in first..first + seeds {
        let s = run(&t.store, seed).await;
        total.holds_refused += s.holds_refused;
        total.replayed += s.replayed;
        total.losses += s.losses;
        total.recalls_answered += s.recalls_answered;
    }
    eprintln!(
        "{seeds} seeds of {STEPS} steps on {NODES} nodes: invariants held ({:.1} s); {total:?}",
        started.elapsed().as_secs_f64()
    );
    // The paths that matter were taken.
    if seeds >= 100 {
        assert!(
            total.holds_refused > 0
                && total.replayed > 0
                && total.recalls_answered > 0
                && total.losses > 0,
            "{total:?}"
        );
    }
}
