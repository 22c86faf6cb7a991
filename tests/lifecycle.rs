//! Money through a gateway's life, with the real binaries: a graceful shutdown lets streams finish
//! and writes everything; a grace that runs out ends streams with an error event, billed for what
//! was delivered; a SIGKILL loses no settled answer (the next start replays the journal, returns
//! the dead instance's lease and keeps a damaged journal tail aside); a node that never comes back
//! under its name has its lease swept back; the operator lists and releases leases by instance.

mod support;

use duang::conf::Backend;
use duang::money::NanoUsd;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use support::relay::{Proc, Relay};
use support::{ADMIN_BIN, on_both_stores};

fn stream_body(chunks: u64, gap_ms: u64) -> Value {
    json!({"model": "budget", "stream": true, "max_tokens": 100,
           "messages": [{"role": "user", "content": "Count slowly."}],
           "mock": {"chunks": chunks, "gap_ms": gap_ms}})
}

/// A JSON request; bodies for any `ttft_ms` up to 9,999 have one length, so one worst case.
fn json_body(ttft_ms: u64) -> Value {
    let pad = "x".repeat(4 - ttft_ms.to_string().len());
    json!({"model": "budget", "max_tokens": 100, "user": pad,
           "messages": [{"role": "user", "content": "Say ok."}],
           "mock": {"ttft_ms": ttft_ms}})
}

fn signal(proc: &Proc, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(proc.0.id() as i32), sig).expect("signal");
}

/// Waits for the process to exit (it must, within `within`).
fn wait_exit(proc: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = proc.0.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until the mock has `n` streams open (so they are in flight at the gateway).
async fn streams_open(relay: &Relay, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if relay.mock.stats().await["streams_open"].as_u64() >= Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "streams never opened at the mock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One request's answer as the client saw it.
struct Seen {
    request_id: String,
    status: u16,
    body: String,
}

async fn send(client: reqwest::Client, base: String, key: String, body: Value) -> Seen {
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("request");
    let request_id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    Seen {
        request_id,
        status,
        body,
    }
}

/// `send` from the relay's account to its first node.
async fn ask(relay: &Relay, body: Value) -> Seen {
    send(
        relay.client.clone(),
        relay.base.clone(),
        relay.key.clone(),
        body,
    )
    .await
}

/// `send` on a task of its own.
fn spawn_send(
    relay: &Relay,
    base: String,
    key: String,
    body: Value,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(send(relay.client.clone(), base, key, body))
}

fn complete(s: &Seen) -> bool {
    s.status == 200 && (s.body.contains("data: [DONE]") || s.body.starts_with('{'))
}

/// The usage records of these requests, by id.
async fn records(relay: &Relay) -> std::collections::HashMap<String, duang::store::UsageRecord> {
    relay
        .store()
        .usage_page(relay.account_id, None, 10_000)
        .await
        .expect("usage")
        .into_iter()
        .map(|r| (r.request_id.clone(), r))
        .collect()
}

/// Waits until the gateway has written the record of this request.
async fn record_of(relay: &Relay, request_id: &str) -> duang::store::UsageRecord {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(r) = records(relay).await.remove(request_id) {
            return r;
        }
        assert!(Instant::now() < deadline, "{request_id} was never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn funding_minus_billed(relay: &Relay, funding: &str) {
    let billed = records(relay)
        .await
        .values()
        .try_fold(NanoUsd::ZERO, |a, r| a.checked_add(r.billed))
        .expect("sum");
    let funding: NanoUsd = funding.parse().expect("usd");
    assert_eq!(
        relay.credit().await,
        funding.checked_sub(billed).expect("sub")
    );
}

/// SIGTERM with streams and JSON answers in flight: new connections are refused, every answer
/// completes, every one is recorded, the lease goes back, the process exits 0.
async fn sigterm_lets_streams_finish_and_writes_every_record(backend: Backend) {
    let mut relay = Relay::start(backend, "5").await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(spawn_send(
            &relay,
            relay.base.clone(),
            relay.key.clone(),
            stream_body(8, 100),
        ));
    }
    for _ in 0..2 {
        tasks.push(spawn_send(
            &relay,
            relay.base.clone(),
            relay.key.clone(),
            json_body(600),
        ));
    }
    streams_open(&relay, 4).await;
    signal(&relay.gateway, nix::sys::signal::Signal::SIGTERM);
    // The listener closes at once: a new connection is refused while the streams go on.
    let deadline = Instant::now() + Duration::from_secs(5);
    while reqwest::get(format!("{}/healthz", relay.base))
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "the draining gateway still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.expect("task"));
    }
    let status = wait_exit(&mut relay.gateway, Duration::from_secs(15));
    assert!(status.success(), "{status}");
    for s in &seen {
        assert!(
            complete(s),
            "an answer was cut by the shutdown: {} {}",
            s.status,
            s.body
        );
    }
    // Everything was written before the exit: no waiting here.
    let recorded = records(&relay).await;
    for s in &seen {
        let r = recorded
            .get(&s.request_id)
            .unwrap_or_else(|| panic!("{} was never recorded", s.request_id));
        assert!(r.billed.is_positive() && r.error_code.is_none(), "{r:?}");
    }
    let instances = relay.store().instances().await.expect("instances");
    assert!(
        instances.is_empty(),
        "the lease and the instance were not returned: {instances:?}"
    );
    funding_minus_billed(&relay, "5").await;
}

/// A stream longer than the grace: it ends with a `server_shutting_down` error event, billed for
/// the part delivered, and the gateway still writes it and exits.
async fn a_stream_past_the_grace_ends_with_an_error_event_billed_for_what_was_delivered(
    backend: Backend,
) {
    let mut relay = Relay::start(backend, "5").await;
    let task = tokio::spawn(send(
        relay.client.clone(),
        relay.base.clone(),
        relay.key.clone(),
        stream_body(40, 200),
    ));
    streams_open(&relay, 1).await;
    signal(&relay.gateway, nix::sys::signal::Signal::SIGTERM);
    let seen = task.await.expect("task");
    let status = wait_exit(&mut relay.gateway, Duration::from_secs(15));
    assert!(status.success(), "{status}");
    assert!(!seen.body.contains("[DONE]"), "{}", seen.body);
    assert!(
        seen.body.contains("\"code\":\"server_shutting_down\""),
        "{}",
        seen.body
    );
    let delivered = seen.body.matches("\"content\":").count() as i64;
    assert!(delivered > 0 && delivered < 40, "{delivered}");
    let r = records(&relay)
        .await
        .remove(&seen.request_id)
        .expect("recorded");
    assert_eq!(r.error_code.as_deref(), Some("server_shutting_down"));
    assert!(r.output_tokens > 0 && r.output_tokens < 40, "{r:?}");
    assert!(r.billed.is_positive(), "{r:?}");
    funding_minus_billed(&relay, "5").await;
}

/// SIGKILL right after answers were delivered, with streams open: the next gateway on the same
/// machine replays the journal, so every delivered answer is billed exactly once, the streams cut
/// by the crash are not billed (our fault, our cost), and the dead instance's lease goes back.
/// A damaged journal tail does not stop the start and is kept aside.
async fn sigkill_loses_no_delivered_answer(backend: Backend) {
    let mut relay = Relay::start(backend, "5").await;
    let mut cut = Vec::new();
    for _ in 0..3 {
        cut.push(spawn_send(
            &relay,
            relay.base.clone(),
            relay.key.clone(),
            stream_body(40, 200),
        ));
    }
    streams_open(&relay, 3).await;
    let mut done = Vec::new();
    for _ in 0..10 {
        done.push(ask(&relay, json_body(0)).await);
    }
    // Killed as soon as the answers are in: their settlements were still on their way.
    signal(&relay.gateway, nix::sys::signal::Signal::SIGKILL);
    wait_exit(&mut relay.gateway, Duration::from_secs(5));
    let mut cut_ids = HashSet::new();
    for t in cut {
        let s = t.await.expect("task");
        assert!(!s.body.contains("[DONE]"));
        cut_ids.insert(s.request_id);
    }
    for s in &done {
        assert!(complete(s), "{}", s.body);
    }
    // A damaged tail on the dead instance's journal: the good entries still count.
    let journal = relay.dir().join("journal");
    let dead_dir = std::fs::read_dir(&journal)
        .expect("journal root")
        .flatten()
        .next()
        .expect("instance dir")
        .path();
    let segment = std::fs::read_dir(&dead_dir)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "journal"))
        .expect("segment");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&segment)
            .expect("open");
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, b'{'])
            .expect("damage");
    }
    let restarted = relay.another_node().await;
    let recorded = records(&relay).await;
    for s in &done {
        let r = recorded
            .get(&s.request_id)
            .unwrap_or_else(|| panic!("{} was delivered and lost", s.request_id));
        assert!(r.billed.is_positive());
    }
    for id in &cut_ids {
        assert!(
            !recorded.contains_key(id),
            "a stream cut by the crash was billed"
        );
    }
    assert_eq!(recorded.len(), done.len());
    let instances = relay.store().instances().await.expect("instances");
    assert_eq!(instances.len(), 1, "only the new instance: {instances:?}");
    assert!(instances[0].leased == NanoUsd::ZERO, "{instances:?}");
    funding_minus_billed(&relay, "5").await;
    let kept: Vec<_> = std::fs::read_dir(&journal)
        .expect("root")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("damaged-"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged tail is kept aside");
    assert_eq!(
        std::fs::read(kept[0].path()).expect("read"),
        vec![200, 0, 0, 0, 1, 2, 3, 4, b'{']
    );
    assert!(!dead_dir.exists(), "the replayed journal is removed");
    drop(restarted);
}

/// A node rescheduled under another name never comes back for its lease: the other gateways
/// sweep it after the lease expiry, and the credit is spendable again.
async fn a_gone_nodes_lease_is_swept_back(backend: Backend) {
    let mut relay = Relay::start(backend, "5").await;
    let first = ask(&relay, json_body(0)).await;
    assert!(complete(&first));
    signal(&relay.gateway, nix::sys::signal::Signal::SIGKILL);
    wait_exit(&mut relay.gateway, Duration::from_secs(5));
    let leased = relay.store().instances().await.expect("instances");
    assert_eq!(leased.len(), 1);
    assert!(leased[0].leased.is_positive(), "{leased:?}");
    // Elsewhere (its own journal), under another name.
    let elsewhere = relay.dir().join("elsewhere");
    let other = relay
        .node_with(&format!(
            "node_id = \"rescheduled\"\nlease_expiry_ms = 3000\njournal_dir = {:?}",
            elsewhere.display().to_string()
        ))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let instances = relay.store().instances().await.expect("instances");
        if instances
            .iter()
            .all(|i| i.instance_id.starts_with("rescheduled/"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gone instance was never swept: {instances:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first answer was settled only in the dead node's journal, which is not here: it stays
    // unbilled, and all the rest of the credit is back.
    let r = send(
        relay.client.clone(),
        other.base.clone(),
        relay.key.clone(),
        json_body(0),
    )
    .await;
    assert!(complete(&r), "{}", r.body);
    let proof = relay
        .store()
        .balance_proof(relay.account_id)
        .await
        .expect("proof");
    assert!(proof.holds());
}

fn admin(conf: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(ADMIN_BIN)
        .arg("--conf")
        .arg(conf)
        .args(args)
        .output()
        .expect("duang-admin");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `duang-admin leases`: lists instances and leases; refuses an unknown name and a live
/// instance; releases a dead one's leases (with --force while its heartbeat is recent).
async fn the_operator_lists_and_releases_leases(backend: Backend) {
    let mut relay = Relay::start(backend, "5").await;
    let live = relay.another_node().await;
    for base in [&relay.base, &live.base] {
        let s = send(
            relay.client.clone(),
            base.clone(),
            relay.key.clone(),
            json_body(0),
        )
        .await;
        assert!(complete(&s));
    }
    signal(&relay.gateway, nix::sys::signal::Signal::SIGKILL);
    wait_exit(&mut relay.gateway, Duration::from_secs(5));
    let conf = std::fs::read_dir(relay.dir())
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "toml"))
        .expect("a conf");
    let (ok, listing) = admin(&conf, &["leases", "list", "--accounts"]);
    assert!(ok, "{listing}");
    let instances = relay.store().instances().await.expect("instances");
    assert_eq!(instances.len(), 2, "{instances:?}");
    for i in &instances {
        assert!(listing.contains(&i.instance_id), "{listing}");
    }
    let (ok, out) = admin(&conf, &["leases", "release", "nobody/1"]);
    assert!(!ok && out.contains("no gateway instance"), "{out}");
    let live_port = live.base.rsplit(':').next().expect("port");
    let live_id = instances
        .iter()
        .find(|i| i.node_id.ends_with(&format!(":{live_port}")))
        .expect("live")
        .instance_id
        .clone();
    let dead_id = instances
        .iter()
        .find(|i| i.instance_id != live_id)
        .expect("dead")
        .instance_id
        .clone();
    let (ok, out) = admin(&conf, &["leases", "release", &live_id]);
    assert!(!ok && out.contains("nothing changed"), "{out}");
    // The dead one renewed only seconds ago: refused without --force, released with it.
    let (ok, out) = admin(&conf, &["leases", "release", &dead_id]);
    assert!(!ok && out.contains("--force"), "{out}");
    let (ok, out) = admin(&conf, &["leases", "release", &dead_id, "--force"]);
    assert!(ok && out.contains("released 1 lease"), "{out}");
    let after = relay.store().instances().await.expect("instances");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].instance_id, live_id);
    relay.credit().await;
}

/// What one request of `body` can cost at most, as a 402 on an empty account says.
async fn worst_case(relay: &Relay, body: &Value) -> NanoUsd {
    let r = ask(relay, body.clone()).await;
    assert_eq!(r.status, 402, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).expect("json");
    let message = v["error"]["message"].as_str().expect("message");
    let needed = message
        .split("can cost up to $")
        .nth(1)
        .expect("needed")
        .split(' ')
        .next()
        .expect("amount");
    needed.parse().expect("usd")
}

async fn fund(relay: &Relay, amount: NanoUsd, reference: &str) {
    relay
        .store()
        .append_ledger(&duang::store::NewLedgerEntry {
            account_id: relay.account_id,
            kind: duang::store::LedgerKind::TopUp,
            amount,
            external_ref: reference.into(),
            actor: None,
            reason: None,
        })
        .await
        .expect("fund");
}

fn times(w: NanoUsd, n: i64) -> NanoUsd {
    NanoUsd::from_nanos(w.nanos() * n)
}

/// Two nodes and a small balance: requests alternating between them are all served (neither
/// node takes the whole balance), and concurrent ones are served exactly as far as the balance
/// covers their worst cases, whichever node they reach: the other node gives back what it holds
/// unpromised before a 402, and the 402 says what the account really has.
async fn a_funded_customer_is_served_on_every_node(backend: Backend) {
    let relay = Relay::start(backend, "0").await;
    let other = relay.another_node().await;
    let quick = json_body(0);
    let w = worst_case(&relay, &quick).await;
    fund(&relay, times(w, 20), "cs_small").await;
    for i in 0..10 {
        let base = if i % 2 == 0 { &relay.base } else { &other.base };
        let s = send(
            relay.client.clone(),
            base.clone(),
            relay.key.clone(),
            quick.clone(),
        )
        .await;
        assert_eq!(s.status, 200, "request {i} on {base}: {}", s.body);
    }
    // Now an account with exactly six worst cases, held at once across both nodes (slow
    // answers), none leased yet.
    let slow = json_body(4000);
    assert_eq!(
        slow.to_string().len(),
        quick.to_string().len(),
        "one worst case"
    );
    let exact = relay
        .store()
        .create_account(&duang::store::NewAccount {
            email: "exact@example.com".into(),
            password_hash: None,
            role: duang::store::Role::Customer,
            verified: true,
        })
        .await
        .expect("account");
    relay
        .store()
        .append_ledger(&duang::store::NewLedgerEntry {
            account_id: exact.id,
            kind: duang::store::LedgerKind::TopUp,
            amount: times(w, 6),
            external_ref: "cs_exact".into(),
            actor: None,
            reason: None,
        })
        .await
        .expect("fund");
    let (key, _) = support::new_key(relay.store(), exact.id).await;
    let mut tasks = Vec::new();
    for i in 0..7 {
        let base = if i % 2 == 0 {
            relay.base.clone()
        } else {
            other.base.clone()
        };
        tasks.push(spawn_send(&relay, base, key.clone(), slow.clone()));
    }
    let mut served = 0;
    let mut refused = Vec::new();
    for t in tasks {
        let s = t.await.expect("task");
        match s.status {
            200 => served += 1,
            402 => refused.push(s.body),
            other => panic!("{other}: {}", s.body),
        }
    }
    assert_eq!((served, refused.len()), (6, 1), "{refused:?}");
    assert!(
        refused[0].contains("available balance is $0.00"),
        "{}",
        refused[0]
    );
    assert!(
        relay
            .store()
            .balance_proof(exact.id)
            .await
            .expect("proof")
            .holds()
    );
}

/// A dispute for the whole payment while two nodes hold leases: what the balance cannot cover
/// comes out of the leases, the nodes give back what they held unpromised, and neither serves
/// another request on the taken credit.
async fn a_dispute_reaches_credit_leased_by_two_nodes(backend: Backend) {
    let relay = Relay::start(backend, "0").await;
    let other = relay.another_node().await;
    let store = relay.store();
    store
        .record_checkout_session("cs_dispute", relay.account_id, 500, "usd")
        .await
        .expect("session");
    store
        .credit_checkout(&duang::store::PaidSession {
            event_id: "evt_paid",
            event_type: "checkout.session.completed",
            session_id: "cs_dispute",
            payment_intent: Some("pi_dispute"),
            amount_total_cents: 500,
            currency: "usd",
        })
        .await
        .expect("credit");
    for base in [&relay.base, &other.base] {
        let s = send(
            relay.client.clone(),
            base.clone(),
            relay.key.clone(),
            json_body(0),
        )
        .await;
        assert_eq!(s.status, 200, "{}", s.body);
    }
    let leased = store.instances().await.expect("instances");
    assert_eq!(
        leased.iter().filter(|i| i.leased.is_positive()).count(),
        2,
        "{leased:?}"
    );
    store
        .apply_stripe_dispute("evt_dispute", "dp_1", "pi_dispute", 500, "fraudulent")
        .await
        .expect("dispute");
    let proof = store.balance_proof(relay.account_id).await.expect("proof");
    assert!(proof.holds(), "{proof:?}");
    assert_eq!(
        proof.cached,
        NanoUsd::ZERO,
        "the dispute took the leased credit too"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while store
        .recalls_pending(relay.account_id)
        .await
        .expect("recalls")
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "the nodes never answered the recall"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for base in [&relay.base, &other.base] {
        let s = send(
            relay.client.clone(),
            base.clone(),
            relay.key.clone(),
            json_body(0),
        )
        .await;
        assert_eq!(
            s.status, 402,
            "disputed credit was still spendable on {base}: {}",
            s.body
        );
    }
    assert!(
        store
            .balance_proof(relay.account_id)
            .await
            .expect("proof")
            .holds()
    );
}

/// A key's spend cap across two nodes: 200 concurrent requests (every hold in flight at once)
/// are served exactly as far as the cap covers their worst cases, never past it, and no worst
/// case that fitted is left unserved.
async fn a_spend_cap_holds_across_two_nodes(backend: Backend) {
    let relay = Relay::start(backend, "5").await;
    let other = relay.another_node().await;
    let body = json!({"model": "budget", "max_tokens": 1000, "user": "x",
                      "messages": [{"role": "user", "content": "Say ok."}],
                      "mock": {"ttft_ms": 4000}});
    // The hold: every body byte a token at the input price, max_tokens at the output price.
    let w = body.to_string().len() as i64 * 120 + 1000 * 480;
    let cap: NanoUsd = "0.01".parse().expect("usd");
    let (key, key_id) = relay.capped_key(cap).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let base = if i % 2 == 0 {
            relay.base.clone()
        } else {
            other.base.clone()
        };
        tasks.push(spawn_send(&relay, base, key.clone(), body.clone()));
    }
    let (mut served, mut refused) = (0i64, 0);
    for t in tasks {
        let s = t.await.expect("task");
        match s.status {
            200 => served += 1,
            402 => {
                assert!(s.body.contains("spend_cap_reached"), "{}", s.body);
                refused += 1;
            }
            other => panic!("{other}: {}", s.body),
        }
    }
    let fit = cap.nanos() / w;
    assert!(
        served <= fit && served >= fit - 1,
        "{served} served, {refused} refused; {fit} worst cases fit under the cap"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let billed = loop {
        let recorded = records(&relay).await;
        let mine: Vec<_> = recorded.values().filter(|r| r.key_id == key_id).collect();
        if mine.len() as i64 >= 200 {
            break mine
                .iter()
                .try_fold(NanoUsd::ZERO, |a, r| a.checked_add(r.billed))
                .expect("sum");
        }
        assert!(
            Instant::now() < deadline,
            "only {} of 200 recorded",
            mine.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(billed <= cap, "billed {billed} past the cap {cap}");
}

/// The budget tier's prices in the test conf, and the same tier at twice the prices.
const BUDGET_AT_12: &str =
    "[tiers.budget]\ninput_usd_per_mtok = \"0.12\"\noutput_usd_per_mtok = \"0.48\"";
const BUDGET_AT_24: &str =
    "[tiers.budget]\ninput_usd_per_mtok = \"0.24\"\noutput_usd_per_mtok = \"0.96\"";

/// Rewrites the node's conf file (each `from` → `to`) and asks it to reload: its answer.
async fn reload_with(relay: &Relay, edits: &[(&str, &str)]) -> (u16, Value) {
    let mut text = std::fs::read_to_string(&relay.conf).expect("conf");
    for (from, to) in edits {
        assert!(text.contains(from), "the conf has no {from:?}");
        text = text.replacen(from, to, 1);
    }
    std::fs::write(&relay.conf, text).expect("write conf");
    let r = relay
        .client
        .post(relay.metrics.replace("/metrics", "/-/reload"))
        .send()
        .await
        .expect("reload");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

/// One request of the load: what the client saw, and when it was sent and answered in full.
struct Timed {
    seen: Seen,
    sent: Instant,
    done: Instant,
}

/// A price change under load (SIGHUP's path, `POST /-/reload`): every request is billed at
/// exactly one of the two prices, by when it was admitted (streams open across the reload keep
/// the old one to their end); none fails. Then a conf that does not validate and one that
/// changes a restart-only setting are refused with the reason, and the running prices stay.
async fn a_price_change_mid_run_bills_each_request_at_one_price(backend: Backend) {
    let relay = Relay::start(backend, "100").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut load = Vec::new();
    for i in 0..6 {
        let (client, base, key) = (relay.client.clone(), relay.base.clone(), relay.key.clone());
        let (stop, done) = (stop.clone(), done.clone());
        load.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                n += 1;
                let body = if (i + n).is_multiple_of(2) {
                    stream_body(3, 5)
                } else {
                    json_body(5)
                };
                let sent = Instant::now();
                let s = send(client.clone(), base.clone(), key.clone(), body).await;
                seen.push(Timed {
                    seen: s,
                    sent,
                    done: Instant::now(),
                });
                done.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
            seen
        }));
    }
    let wait_for = |n: usize| {
        let done = done.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while done.load(std::sync::atomic::Ordering::Acquire) < n {
                assert!(Instant::now() < deadline, "the load stalled below {n}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for(30).await;
    // Two slow streams admitted before the reload and still open after it.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            spawn_send(
                &relay,
                relay.base.clone(),
                relay.key.clone(),
                stream_body(4, 300),
            )
        })
        .collect();
    streams_open(&relay, 2).await;
    let asked = Instant::now();
    let (status, answer) = reload_with(&relay, &[(BUDGET_AT_12, BUDGET_AT_24)]).await;
    let applied = Instant::now();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "reloaded");
    let after = done.load(std::sync::atomic::Ordering::Acquire);
    wait_for(after + 30).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut timed = Vec::new();
    for t in load {
        timed.extend(t.await.expect("load task"));
    }
    let slow: Vec<Seen> = futures_util::future::join_all(slow)
        .await
        .into_iter()
        .map(|t| t.expect("slow stream"))
        .collect();

    let price = |r: &duang::store::UsageRecord, (inp, out): (i64, i64)| {
        NanoUsd::from_nanos(r.input_tokens * inp + r.output_tokens * out)
    };
    let (old, new) = ((120, 480), (240, 960));
    let (mut at_old, mut at_new) = (0, 0);
    for t in &timed {
        assert!(
            complete(&t.seen),
            "a request failed around the reload: {} {}",
            t.seen.status,
            t.seen.body
        );
        let r = record_of(&relay, &t.seen.request_id).await;
        assert!(r.output_tokens > 0, "{r:?}");
        if r.billed == price(&r, old) {
            at_old += 1;
            assert!(
                t.sent < applied,
                "sent after the reload was applied, billed at the old price: {r:?}"
            );
        } else if r.billed == price(&r, new) {
            at_new += 1;
            assert!(
                t.done > asked,
                "answered before the reload was asked, billed at the new price: {r:?}"
            );
        } else {
            panic!("billed at neither price: {r:?}");
        }
    }
    assert!(at_old >= 30 && at_new >= 30, "old {at_old}, new {at_new}");
    for s in &slow {
        assert!(complete(s), "{} {}", s.status, s.body);
        let r = record_of(&relay, &s.request_id).await;
        assert_eq!(
            r.billed,
            price(&r, old),
            "a stream admitted before the reload is billed at the prices it was admitted at"
        );
    }

    // A conf that does not validate: refused with the message a start gives; nothing changes.
    let (status, answer) = reload_with(
        &relay,
        &[(
            "output_usd_per_mtok = \"0.96\"",
            "output_usd_per_mtok = \"lots\"",
        )],
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    let reason = answer["reason"].as_str().expect("reason");
    let check = std::process::Command::new(support::GATEWAY_BIN)
        .arg("--conf")
        .arg(&relay.conf)
        .arg("check-conf")
        .output()
        .expect("check-conf");
    assert!(!check.status.success());
    assert_eq!(
        reason.trim(),
        String::from_utf8_lossy(&check.stderr).trim(),
        "the reload's refusal is the start's message"
    );
    assert!(
        reason.contains("tiers.budget.output_usd_per_mtok"),
        "{reason}"
    );
    // A restart-only setting (with the price made valid again): refused, naming it.
    let (status, answer) = reload_with(
        &relay,
        &[
            (
                "output_usd_per_mtok = \"lots\"",
                "output_usd_per_mtok = \"0.96\"",
            ),
            ("[gateway]\n", "[gateway]\nthreads = 2\n"),
        ],
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    let reason = answer["reason"].as_str().expect("reason");
    assert!(
        reason.contains("gateway.threads") && reason.contains("restart"),
        "{reason}"
    );
    let s = ask(&relay, json_body(5)).await;
    assert!(complete(&s));
    let r = record_of(&relay, &s.request_id).await;
    assert_eq!(r.billed, price(&r, new), "the running conf stays");
    let metrics = relay.metrics_text().await;
    assert!(
        metrics.contains("duang_conf_reloads_total{result=\"ok\"} 1")
            && metrics.contains("duang_conf_reloads_total{result=\"refused\"} 2"),
        "{metrics}"
    );
}

on_both_stores!(
    a_price_change_mid_run_bills_each_request_at_one_price,
    a_rolling_deploy_loses_nothing,
    holds_cover_images_and_usage_above_a_hold_is_billed,
    a_client_gone_before_the_first_byte_is_not_billed,
    an_adjustment_takes_leased_credit_too,
    a_spend_cap_holds_across_two_nodes,
    sigterm_lets_streams_finish_and_writes_every_record,
    a_stream_past_the_grace_ends_with_an_error_event_billed_for_what_was_delivered,
    sigkill_loses_no_delivered_answer,
    a_gone_nodes_lease_is_swept_back,
    the_operator_lists_and_releases_leases,
    a_funded_customer_is_served_on_every_node,
    a_dispute_reaches_credit_leased_by_two_nodes,
);

/// A PostgreSQL outage longer than any retry budget: requests go on being served from the
/// lease, the writer keeps their usage (the backlog metric shows it), and once the store is back
/// every record is written, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_loses_no_usage() {
    let mut relay = Relay::start(Backend::Postgres, "5").await;
    signal(&relay.gateway, nix::sys::signal::Signal::SIGTERM);
    wait_exit(&mut relay.gateway, Duration::from_secs(15));
    let proxy = support::proxy::Proxy::start("127.0.0.1:5432").await;
    let via = relay
        .t
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(via, relay.t.url, "the test store is on 127.0.0.1:5432");
    let node = relay
        .node_on_store(
            &via,
            &format!(
                "lease_expiry_ms = 600000\njournal_dir = {:?}",
                relay.dir().join("journal").display().to_string()
            ),
        )
        .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let s = send(
            relay.client.clone(),
            node.base.clone(),
            relay.key.clone(),
            json_body(0),
        )
        .await;
        assert_eq!(s.status, 200, "{}", s.body);
        ids.push(s.request_id);
    }
    proxy.cut();
    for _ in 0..30 {
        let s = send(
            relay.client.clone(),
            node.base.clone(),
            relay.key.clone(),
            json_body(0),
        )
        .await;
        assert_eq!(
            s.status, 200,
            "served from the lease while the store is down: {}",
            s.body
        );
        ids.push(s.request_id);
    }
    let backlog = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("duang_usage_backlog "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let metrics = node.metrics_text().await;
    assert!(backlog(&metrics) >= 30, "{metrics}");
    // Readiness tells the truth: the store is down, settlements go to the journal, so the node
    // still takes traffic for the keys it knows.
    let readyz = format!("{}/readyz", node.base);
    let ready = poll_json(&relay.client, &readyz, |v| v["store"] == "unavailable").await;
    assert_eq!(ready.0, 200, "{}", ready.1);
    assert_eq!(
        (&ready.1["status"], &ready.1["journal"]),
        (&json!("ready"), &json!("ok"))
    );
    let own = poll_json(
        &relay.client,
        &node.metrics.replace("/metrics", "/readyz"),
        |v| v["store"] == "unavailable",
    )
    .await;
    assert_eq!(own.0, 200, "the process's own readiness, on metrics_listen");
    // A key the node has never seen cannot be checked: 503 store_unavailable at once, not after
    // the store's pool gives up (10 s).
    let stranger = duang::keys::generate().plaintext.expose().clone();
    let asked = Instant::now();
    let s = send(
        relay.client.clone(),
        node.base.clone(),
        stranger,
        json_body(0),
    )
    .await;
    let waited = asked.elapsed();
    assert_eq!(s.status, 503, "{}", s.body);
    assert!(s.body.contains("store_unavailable"), "{}", s.body);
    eprintln!("a never-seen key during the outage was answered in {waited:?}");
    assert!(
        waited < Duration::from_secs(5),
        "{waited:?}: it waited on the store"
    );
    // The outage lasts longer than the writer's old retry budget (about 6 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    proxy.restore();
    let ready = poll_json(&relay.client, &readyz, |v| v["store"] == "ok").await;
    assert_eq!(ready.0, 200, "{}", ready.1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let recorded = records(&relay).await;
        if ids.iter().all(|id| recorded.contains_key(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} records written after the outage",
            ids.iter().filter(|id| recorded.contains_key(*id)).count(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(records(&relay).await.len(), ids.len());
    let metrics = node.metrics_text().await;
    assert_eq!(backlog(&metrics), 0, "{metrics}");
    relay.credit().await;
}

/// An operator's negative adjustment for the whole credit while a node holds part of it leased:
/// it goes through (the leased part recalled), and the node then refuses to spend it.
async fn an_adjustment_takes_leased_credit_too(backend: Backend) {
    let relay = Relay::start(backend, "2").await;
    let s = ask(&relay, json_body(0)).await;
    assert_eq!(s.status, 200, "{}", s.body);
    let credit = relay.credit().await;
    let leased = relay.store().instances().await.expect("instances");
    assert!(leased[0].leased.is_positive(), "{leased:?}");
    relay
        .store()
        .append_ledger(&duang::store::NewLedgerEntry {
            account_id: relay.account_id,
            kind: duang::store::LedgerKind::Adjustment,
            amount: credit.checked_neg().expect("neg"),
            external_ref: "adjust-all".into(),
            actor: Some("test".into()),
            reason: Some("taking it all back".into()),
        })
        .await
        .expect("an adjustment of the whole credit, leased part included");
    assert_eq!(relay.credit().await, NanoUsd::ZERO);
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay
        .store()
        .recalls_pending(relay.account_id)
        .await
        .expect("recalls")
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "the node never answered the recall"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = ask(&relay, json_body(0)).await;
    assert_eq!(s.status, 402, "{}", s.body);
    // More than there is: refused, nothing changed.
    let r = relay
        .store()
        .append_ledger(&duang::store::NewLedgerEntry {
            account_id: relay.account_id,
            kind: duang::store::LedgerKind::Adjustment,
            amount: "-1".parse().expect("usd"),
            external_ref: "adjust-more".into(),
            actor: Some("test".into()),
            reason: Some("too much".into()),
        })
        .await;
    assert!(
        matches!(r, Err(duang::store::StoreError::InsufficientBalance { .. })),
        "{r:?}"
    );
    relay.credit().await;
}

/// A client that leaves while the upstream is still preparing its answer received nothing and
/// is billed nothing, for a stream and for a JSON answer alike.
async fn a_client_gone_before_the_first_byte_is_not_billed(backend: Backend) {
    let relay = Relay::start(backend, "5").await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let mut bodies = vec![stream_body(4, 0), json_body(1500)];
    bodies[0]["mock"]["ttft_ms"] = json!(1500);
    for body in bodies {
        let r = impatient
            .post(format!("{}/v1/chat/completions", relay.base))
            .bearer_auth(&relay.key)
            .json(&body)
            .send()
            .await;
        assert!(r.is_err(), "the client gave up before the answer");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let recorded = loop {
        let recorded = records(&relay).await;
        if recorded.len() == 2 {
            break recorded;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 2 recorded",
            recorded.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for r in recorded.values() {
        assert_eq!(
            r.error_code.as_deref(),
            Some("client_disconnected"),
            "{r:?}"
        );
        assert_eq!(
            r.billed,
            NanoUsd::ZERO,
            "billed for nothing received: {r:?}"
        );
    }
    funding_minus_billed(&relay, "5").await;
}

/// Holds bound what a request really costs: an image part (a few bytes of URL) holds what the
/// provider counts for an image; usage an upstream reports above the hold is billed as far as
/// the credit goes, and only the rest is the platform's loss, recorded.
async fn holds_cover_images_and_usage_above_a_hold_is_billed(backend: Backend) {
    let relay = Relay::start(backend, "0").await;
    let text = json!({"model": "budget", "max_tokens": 10,
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}]});
    let mut image = text.clone();
    image["messages"][0]["content"]
        .as_array_mut()
        .expect("parts")
        .push(json!({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}));
    let plain = worst_case(&relay, &text).await;
    let with_image = worst_case(&relay, &image).await;
    // The budget tier's upstream is OpenAI-compatible: 1,536 tokens an image at $0.12/Mtok.
    assert!(
        with_image.nanos() - plain.nanos() >= 1_536 * 120,
        "{plain} without the image, {with_image} with it"
    );
    // An upstream that reports far more input than the hold: a million prompt tokens ($0.12).
    let mut big = json_body(0);
    big["mock"]["prompt_tokens"] = json!(1_000_000);
    fund(&relay, "5".parse().expect("usd"), "cs_big").await;
    let s = ask(&relay, big.clone()).await;
    assert_eq!(s.status, 200, "{}", s.body);
    let r = record_of(&relay, &s.request_id).await;
    assert_eq!(r.input_tokens, 1_000_000);
    let expected = 1_000_000 * 120 + r.output_tokens * 480;
    assert_eq!(
        r.billed.nanos(),
        expected,
        "billed in full, above its hold: {r:?}"
    );
    // Now more than the whole credit: it is all billed, the rest recorded as a loss.
    let credit = relay.credit().await;
    big["mock"]["prompt_tokens"] = json!(100_000_000);
    let s = ask(&relay, big).await;
    assert_eq!(s.status, 200, "{}", s.body);
    let last = record_of(&relay, &s.request_id).await;
    assert_eq!(last.input_tokens, 100_000_000);
    assert_eq!(last.billed, credit, "the whole credit, no more: {last:?}");
    assert_eq!(relay.credit().await, NanoUsd::ZERO);
    let metrics = reqwest::get(&relay.metrics)
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let loss: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("duang_platform_loss_nano_usd_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(loss > 0, "the loss is counted: {metrics}");
}

/// A rolling deploy: a new gateway process starts beside the old one on the same port, the old
/// one gets SIGTERM; its streams finish, the new one takes every new request, and nothing is
/// lost or left leased by the old one.
async fn a_rolling_deploy_loses_nothing(backend: Backend) {
    let mut relay = Relay::start(backend, "5").await;
    // The old process runs with `reuse_port`, as a deploy that runs processes side by side needs.
    signal(&relay.gateway, nix::sys::signal::Signal::SIGTERM);
    wait_exit(&mut relay.gateway, Duration::from_secs(15));
    let mut old = relay.reusable_node().await;
    let mut old_streams = Vec::new();
    for _ in 0..3 {
        old_streams.push(spawn_send(
            &relay,
            old.base.clone(),
            relay.key.clone(),
            stream_body(10, 100),
        ));
    }
    streams_open(&relay, 3).await;
    let new = relay.node_beside(&old).await;
    // The port is shared: the new process's own health check is on its metrics listener.
    let health = new.metrics.replace("/metrics", "/healthz");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(&health).await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "the new process never got ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&old.proc, nix::sys::signal::Signal::SIGTERM);
    let mut ids = Vec::new();
    for t in old_streams {
        let s = t.await.expect("task");
        assert!(complete(&s), "a stream was cut by the deploy: {}", s.body);
        ids.push(s.request_id);
    }
    let status = wait_exit(&mut old.proc, Duration::from_secs(15));
    assert!(status.success(), "{status}");
    for _ in 0..10 {
        let s = send(
            relay.client.clone(),
            old.base.clone(),
            relay.key.clone(),
            json_body(0),
        )
        .await;
        assert_eq!(s.status, 200, "the new process serves the port: {}", s.body);
        ids.push(s.request_id);
    }
    for id in &ids {
        record_of(&relay, id).await;
    }
    let instances = relay.store().instances().await.expect("instances");
    assert_eq!(
        instances.len(),
        1,
        "the old process returned its leases: {instances:?}"
    );
    drop(new);
    relay.credit().await;
}

/// GETs `url` until its JSON answer satisfies `done` (within 30 s); the status and the JSON.
async fn poll_json(
    client: &reqwest::Client,
    url: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(url).send().await {
            let status = r.status().as_u16();
            if let Ok(v) = r.json::<serde_json::Value>().await
                && done(&v)
            {
                return (status, v);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} never answered as expected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
