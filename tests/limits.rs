//! Rate limits as clients meet them, against the real gateway: OpenAI's `x-ratelimit-*` headers,
//! 429 with `Retry-After` naming the limit, refused requests costing nothing; in process (no
//! Redis), shared by two gateway nodes through Redis, and riding out a Redis outage.

mod support;

use duang::conf::Backend;
use duang::money::NanoUsd;
use duang::store::LimitOverrides;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::redis_server::{PrivateRedis, SHARED_REDIS, require_shared};
use support::relay::{Relay, key_with};

fn chat() -> Value {
    json!({"model": "budget", "messages": [{"role": "user", "content": "Say ok in one word."}], "max_tokens": 4})
}

async fn post(relay: &Relay, base: &str, key: &str, body: &Value) -> reqwest::Response {
    relay
        .client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("request")
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_owned()
}

/// Requests per minute, in process: the headers count down, the 4th gets 429, and it costs
/// nothing.
async fn requests_per_minute_count_down_then_refuse(relay: &Relay) {
    let key = key_with(
        relay,
        LimitOverrides {
            requests_per_minute: Some(3),
            ..Default::default()
        },
    )
    .await;
    let before = relay.credit().await;
    let mut billed = NanoUsd::ZERO;
    for left in ["2", "1", "0"] {
        let r = post(relay, &relay.base, &key, &chat()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), left);
        assert!(header(&r, "x-ratelimit-reset-requests").ends_with('s'));
        assert!(
            header(&r, "x-ratelimit-limit-tokens")
                .parse::<u64>()
                .is_ok()
        );
        assert!(
            header(&r, "x-ratelimit-remaining-tokens")
                .parse::<u64>()
                .is_ok()
        );
        assert!(header(&r, "x-ratelimit-reset-tokens").ends_with('s'));
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["usage"]["completion_tokens"], 4);
        billed = billed
            .checked_add(NanoUsd::from_nanos(10 * 120 + 4 * 480))
            .expect("sum");
    }
    let r = post(relay, &relay.base, &key, &chat()).await;
    assert_eq!(r.status(), 429);
    // Until the sliding window leaves room: up to two windows (the requests of this minute
    // fade out over the next one); whole seconds rounded up, and exact in milliseconds.
    let retry: u64 = header(&r, "retry-after").parse().expect("seconds");
    let retry_ms: u64 = header(&r, "retry-after-ms").parse().expect("ms");
    assert!((1..=120).contains(&retry), "{retry}");
    assert_eq!(retry, retry_ms.div_ceil(1000), "{retry} {retry_ms}");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "requests");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("requests per minute of this key (limit 3)"),
        "{message}"
    );
    // Only the three answered requests were billed; the refused one left no hold behind.
    let records = relay.usage(4).await;
    assert!(
        records
            .iter()
            .any(|u| u.http_status == 429 && u.billed == NanoUsd::ZERO)
    );
    assert_eq!(
        relay.credit().await,
        before.checked_sub(billed).expect("sub")
    );
    // The account's other key is not limited by this one.
    assert_eq!(
        post(relay, &relay.base, &relay.key, &chat()).await.status(),
        200
    );
}

/// Tokens per minute: a request whose input alone is over the limit is refused; the input bound
/// taken at admission is corrected to the real usage afterwards.
async fn tokens_are_bounded_at_admission_and_corrected_after(relay: &Relay) {
    let body = chat();
    let bound = body.to_string().len() as i64;
    let small = key_with(
        relay,
        LimitOverrides {
            tokens_per_minute: Some(bound - 1),
            ..Default::default()
        },
    )
    .await;
    let r = post(relay, &relay.base, &small, &body).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["type"], "tokens");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("tokens per minute of this key")
    );

    // Room for 1.5 bounds: the second request fits only once the first is corrected from its
    // bound (~90) to what it used (14 tokens).
    let key = key_with(
        relay,
        LimitOverrides {
            tokens_per_minute: Some(bound * 3 / 2),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(post(relay, &relay.base, &key, &body).await.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = post(relay, &relay.base, &key, &body).await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429, "only the token limit may refuse it");
        assert!(
            Instant::now() < deadline,
            "the first request's tokens were never corrected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// In flight: while one slow stream runs, a second request of the key is refused.
async fn in_flight_counts_the_requests_still_running(relay: &Relay) {
    let key = key_with(
        relay,
        LimitOverrides {
            in_flight: Some(1),
            ..Default::default()
        },
    )
    .await;
    let mut slow = chat();
    slow["stream"] = json!(true);
    slow["mock"] = json!({"ttft_ms": 100, "gap_ms": 200, "chunks": 5});
    let before = relay.mock.stats().await["requests"].as_u64().unwrap_or(0);
    let running = {
        let (relay_base, client, key) = (relay.base.clone(), relay.client.clone(), key.clone());
        tokio::spawn(async move {
            let r = client
                .post(format!("{relay_base}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&slow)
                .send()
                .await
                .expect("stream");
            r.text().await.expect("body")
        })
    };
    // Once the upstream has the first request, it was admitted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.mock.stats().await["requests"].as_u64().unwrap_or(0) == before {
        assert!(
            Instant::now() < deadline,
            "the stream never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = post(relay, &relay.base, &key, &chat()).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("requests in flight of this key (limit 1)")
    );
    let text = running.await.expect("task");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // Finished: the key may send again.
    assert_eq!(post(relay, &relay.base, &key, &chat()).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_limits() {
    let relay = Relay::start(Backend::Sqlite, "1").await;
    requests_per_minute_count_down_then_refuse(&relay).await;
    tokens_are_bounded_at_admission_and_corrected_after(&relay).await;
    in_flight_counts_the_requests_still_running(&relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limits() {
    require_shared().await;
    let relay = Relay::start_with(Backend::Sqlite, "1", Some(SHARED_REDIS), "").await;
    requests_per_minute_count_down_then_refuse(&relay).await;
    tokens_are_bounded_at_admission_and_corrected_after(&relay).await;
    in_flight_counts_the_requests_still_running(&relay).await;
    let metrics = relay.metrics_text().await;
    assert!(metrics.contains("duang_redis_up 1"), "{metrics}");
}

/// Two gateway nodes, one Redis, one key limited to 60 a minute: of 200 requests spread over
/// both, at most 60 pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_limit_through_redis() {
    require_shared().await;
    let relay = Relay::start_with(Backend::Postgres, "5", Some(SHARED_REDIS), "").await;
    let second = relay.another_node().await;
    let key = key_with(
        &relay,
        LimitOverrides {
            requests_per_minute: Some(60),
            ..Default::default()
        },
    )
    .await;
    let bases = [relay.base.clone(), second.base.clone()];
    let mut ok = 0;
    let mut refused = 0;
    for round in 0..10 {
        let mut batch = Vec::new();
        for i in 0..20 {
            let base = bases[(round + i) % 2].clone();
            let (client, key) = (relay.client.clone(), key.clone());
            batch.push(tokio::spawn(async move {
                client
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&chat())
                    .send()
                    .await
                    .expect("request")
                    .status()
                    .as_u16()
            }));
        }
        for t in batch {
            match t.await.expect("task") {
                200 => ok += 1,
                429 => refused += 1,
                other => panic!("unexpected status {other}"),
            }
        }
    }
    assert_eq!(ok + refused, 200);
    assert_eq!(ok, 60, "exactly the limit passes within the minute");
    relay.credit().await;
}

/// Redis stops: with the default policy each node enforces the limits itself and keeps
/// answering, says so in a metric, and goes back to Redis when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_falls_back_to_local_limits_and_recovers() {
    let mut redis = PrivateRedis::start().await;
    let relay = Relay::start_with(Backend::Sqlite, "1", Some(&redis.url()), "").await;
    let key = key_with(
        &relay,
        LimitOverrides {
            requests_per_minute: Some(1000),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(post(&relay, &relay.base, &key, &chat()).await.status(), 200);
    let metric = |name: &'static str| {
        let (client, url) = (relay.client.clone(), relay.metrics.clone());
        async move {
            let text = client
                .get(&url)
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text");
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(-1.0)
        }
    };
    assert_eq!(metric("duang_redis_up ").await, 1.0);

    redis.stop();
    for _ in 0..5 {
        let r = post(&relay, &relay.base, &key, &chat()).await;
        assert_eq!(r.status(), 200, "the gateway keeps answering");
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "1000");
    }
    assert_eq!(metric("duang_redis_up ").await, 0.0);
    assert!(metric("duang_rate_limit_fallbacks_total ").await >= 5.0);

    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert_eq!(post(&relay, &relay.base, &key, &chat()).await.status(), 200);
        if metric("duang_redis_up ").await == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never went back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back on Redis: its counters are in the restarted server.
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*rpm*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(!keys.is_empty(), "counters are written to Redis again");
    assert!(
        keys.iter()
            .all(|k| k.contains(&format!("{{a{}}}", relay.account_id))),
        "{keys:?}"
    );
}

/// With `on_outage = "refuse"`, requests get 503 while Redis is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_refuses_when_the_conf_says_so() {
    let mut redis = PrivateRedis::start().await;
    let relay = Relay::start_with(
        Backend::Sqlite,
        "1",
        Some(&redis.url()),
        "on_outage = \"refuse\"",
    )
    .await;
    assert_eq!(
        post(&relay, &relay.base, &relay.key, &chat())
            .await
            .status(),
        200
    );
    redis.stop();
    let r = post(&relay, &relay.base, &relay.key, &chat()).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "rate_limiter_unavailable");
    relay.credit().await;
}

/// An operator's throttle reaches every node within a second, and so does lifting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_reaches_every_node_within_a_second() {
    require_shared().await;
    let relay = Relay::start_with(Backend::Sqlite, "5", Some(SHARED_REDIS), "").await;
    let second = relay.another_node().await;
    let key = key_with(&relay, LimitOverrides::default()).await;
    let key_id = relay
        .store()
        .key_by_hash(&duang::keys::hash(&key))
        .await
        .expect("lookup")
        .expect("key")
        .id;
    for base in [&relay.base, &second.base] {
        assert_eq!(post(&relay, base, &key, &chat()).await.status(), 200);
    }
    // Two requests in this minute already; a throttle to one a minute refuses the next anywhere.
    let throttle = duang::store::Throttle {
        requests_per_minute: Some(1),
        tokens_per_minute: None,
        until_ms: Some(duang::time::now_ms() + 600_000),
    };
    relay
        .store()
        .set_throttle(
            duang::store::Target::Key(key_id),
            &throttle,
            "operator:test",
            Some("abuse"),
        )
        .await
        .expect("throttle");
    let start = Instant::now();
    for base in [&relay.base, &second.base] {
        loop {
            let r = post(&relay, base, &key, &chat()).await;
            if r.status() == 429 {
                assert_eq!(header(&r, "x-ratelimit-limit-requests"), "1");
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the throttle never arrived"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "both nodes throttled after {took:?}"
    );
    relay
        .store()
        .set_throttle(
            duang::store::Target::Key(key_id),
            &duang::store::Throttle::default(),
            "operator:test",
            None,
        )
        .await
        .expect("lift");
    let start = Instant::now();
    for base in [&relay.base, &second.base] {
        while post(&relay, base, &key, &chat()).await.status() != 200 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the lift never arrived"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    assert!(start.elapsed() < Duration::from_secs(1));
}
