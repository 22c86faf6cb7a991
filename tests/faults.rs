//! The fault matrix (issue #6): for each way an upstream can fail, for a JSON and for a
//! streaming request, what the client receives, which upstream served it, and exactly what was
//! billed and logged. Each `f_<fault>` tier's first upstream fails that way (the mock reads the
//! fault from the model name the gateway sends it); its second is the healthy mock.

mod support;

use duang::conf::Backend;
use duang::money::NanoUsd;
use duang::store::UsageRecord;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::relay::Relay;

/// What one request came back with, and its usage record.
struct Seen {
    status: u16,
    body: String,
    record: UsageRecord,
}

async fn send(relay: &Relay, tier: &str, stream: bool) -> Seen {
    let body = json!({"model": tier, "stream": stream, "messages": [{"role": "user", "content": "Say ok in one word."}], "max_tokens": 50});
    let r = relay.post(body).await;
    let status = r.status().as_u16();
    let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
    let body = r.text().await.expect("body");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let records = relay
            .store()
            .usage_page(relay.account_id, None, 1000)
            .await
            .expect("usage");
        if let Some(record) = records.into_iter().find(|u| u.request_id == id) {
            return Seen {
                status,
                body,
                record,
            };
        }
        assert!(Instant::now() < deadline, "no usage record for {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The content of the chunks a stream delivered.
fn delivered_text(sse: &str) -> String {
    sse.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// budget-priced tiers: 10 prompt tokens at 120 nano-USD and each output token at 480.
fn billed_for(output_tokens: i64) -> NanoUsd {
    NanoUsd::from_nanos(10 * 120 + output_tokens * 480)
}

/// The answer came from the healthy second upstream, after one failed attempt, billed in full.
fn served_by_the_fallback(s: &Seen, stream: bool, what: &str) {
    assert_eq!(s.status, 200, "{what}: {}", s.body);
    assert_eq!(
        s.record.upstream_model.as_deref(),
        Some("mock-small"),
        "{what}"
    );
    assert_eq!(s.record.provider.as_deref(), Some("mock"), "{what}");
    assert_eq!(s.record.attempts, 2, "{what}");
    assert_eq!(s.record.http_status, 200, "{what}");
    assert_eq!(s.record.output_tokens, 4, "{what}");
    assert_eq!(s.record.billed, billed_for(4), "{what}");
    if stream {
        assert!(s.body.ends_with("data: [DONE]\n\n"), "{what}: {}", s.body);
        assert_eq!(s.body.matches("tok").count(), 4, "{what}");
    } else {
        let v: Value = serde_json::from_str(&s.body).expect("json");
        assert_eq!(
            v["choices"][0]["message"]["content"], "tok0 tok1 tok2 tok3 ",
            "{what}"
        );
    }
}

async fn the_fault_matrix(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let before = relay.credit().await;
    let mut billed = NanoUsd::ZERO;
    let mut add = |s: &Seen| billed = billed.checked_add(s.record.billed).expect("sum");

    for stream in [false, true] {
        let mode = if stream { "stream" } else { "json" };
        // Before the first byte, each of these moves on to the next upstream, unseen.
        for (tier, what) in [
            ("premium", "connection refused"),
            ("f_tls", "TLS failure (untrusted certificate)"),
            (
                "f_slow_headers",
                "headers slower than the first-byte timeout",
            ),
            ("f_status_500", "500"),
            ("f_status_503", "503"),
            ("f_error_body", "200 with an error body"),
        ] {
            let s = send(&relay, tier, stream).await;
            if tier == "premium" {
                // premium bills at its own price, from the fallback's (mock-large) answer.
                assert_eq!((s.status, s.record.attempts), (200, 2), "{mode} {what}");
                assert_eq!(s.record.upstream_model.as_deref(), Some("mock-large"));
                assert_eq!(s.record.billed, NanoUsd::from_nanos(10 * 3600 + 4 * 18000));
            } else {
                served_by_the_fallback(&s, stream, &format!("{mode} {what}"));
            }
            add(&s);
        }
    }

    // 429 with Retry-After: the next upstream serves, and the first is skipped while it asks.
    let s = send(&relay, "f_status_429_retry_30", false).await;
    served_by_the_fallback(&s, false, "429");
    add(&s);
    let s = send(&relay, "f_status_429_retry_30", true).await;
    assert_eq!(
        (s.status, s.record.attempts),
        (200, 1),
        "Retry-After honoured: {}",
        s.body
    );
    assert_eq!(s.record.upstream_model.as_deref(), Some("mock-small"));
    add(&s);
    let metrics = relay.metrics_text().await;
    assert!(
        metrics.contains(
            "duang_upstream_cooling{model=\"fault-status-429-retry-30\",provider=\"mock\"} 1"
        ),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("cooling"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Broken answers: in JSON nothing has reached the client yet, so the next upstream serves.
    for (tier, what) in [
        ("f_malformed", "malformed JSON"),
        ("f_reset", "answer cut mid-way"),
        ("f_stall", "answer stalls past the idle timeout"),
    ] {
        let s = send(&relay, tier, false).await;
        served_by_the_fallback(&s, false, &format!("json {what}"));
        add(&s);
    }
    // In a stream the first chunk has gone out: the stream ends with an SSE error event (never
    // glued to a partial event), is logged with its own code, and the client pays for what it
    // received (counted, since no usage came).
    for (tier, what, code) in [
        ("f_reset", "stream cut mid-way", "upstream_unavailable"),
        (
            "f_stall",
            "stream stalls past the idle timeout",
            "upstream_timeout",
        ),
        (
            "f_malformed",
            "a chunk that is not JSON",
            "upstream_malformed",
        ),
        (
            "f_truncate",
            "a clean end before [DONE]",
            "upstream_incomplete",
        ),
        (
            "f_split",
            "cut in the middle of an event",
            "upstream_unavailable",
        ),
    ] {
        let s = send(&relay, tier, true).await;
        assert_eq!(s.status, 200, "{what}");
        for event in s.body.split("\n\n").filter(|e| !e.is_empty()) {
            let data = event.strip_prefix("data: ").expect("data events only");
            assert!(
                serde_json::from_str::<Value>(data).is_ok(),
                "{what}: only whole events reach the client: {event:?}"
            );
        }
        let last: Value = serde_json::from_str(
            s.body
                .trim_end()
                .rsplit("\n\n")
                .next()
                .and_then(|e| e.strip_prefix("data: "))
                .expect("a last event"),
        )
        .expect("json");
        assert_eq!(last["error"]["code"], code, "{what}: {}", s.body);
        assert!(!s.body.contains("[DONE]"), "{what}");
        assert_eq!(
            s.record.upstream_model.as_deref(),
            Some("fault-".to_owned() + &tier[2..]).as_deref()
        );
        assert_eq!(s.record.attempts, 1, "{what}");
        assert_eq!(s.record.error_code.as_deref(), Some(code), "{what}");
        let text = delivered_text(&s.body);
        assert_eq!(text, "tok0 ", "{what}: {}", s.body);
        let delivered = duang::gateway::tokens::count_tokens(&text) as i64;
        assert_eq!(
            s.record.output_tokens, delivered,
            "{what}: billed for what was delivered"
        );
        // No usage came, so the prompt is counted too.
        let prompt = duang::gateway::tokens::count_tokens("Say ok in one word.") as i64;
        assert_eq!(s.record.input_tokens, prompt, "{what}");
        assert_eq!(
            s.record.billed,
            NanoUsd::from_nanos(prompt * 120 + delivered * 480),
            "{what}"
        );
        add(&s);
    }
    // A whole answer whose connection is slow to end: complete at its end ([DONE], or the
    // JSON value), served and billed in full, however long the upstream keeps it open.
    for stream in [false, true] {
        let s = send(&relay, "f_late_close", stream).await;
        assert_eq!((s.status, s.record.attempts), (200, 1), "{}", s.body);
        assert_eq!(s.record.error_code, None, "late close, stream={stream}");
        assert_eq!(
            s.record.billed,
            billed_for(4),
            "late close, stream={stream}"
        );
        if stream {
            assert!(s.body.ends_with("data: [DONE]\n\n"), "{}", s.body);
        } else {
            let v: Value = serde_json::from_str(&s.body).expect("json");
            assert_eq!(
                v["choices"][0]["message"]["content"],
                "tok0 tok1 tok2 tok3 "
            );
        }
        add(&s);
    }

    // No usage from the upstream: the tokens are counted with tiktoken, in both modes.
    for stream in [false, true] {
        let s = send(&relay, "f_nousage", stream).await;
        assert_eq!((s.status, s.record.attempts), (200, 1));
        assert!(
            s.record.output_tokens > 0 && s.record.input_tokens > 0,
            "counted: {:?}",
            s.record
        );
        assert_eq!(
            s.record.billed,
            NanoUsd::from_nanos(s.record.input_tokens * 120 + s.record.output_tokens * 480)
        );
        add(&s);
    }

    // What the ledger took is exactly what the usage records say.
    assert_eq!(
        relay.credit().await,
        before.checked_sub(billed).expect("sub")
    );
}

/// Three failures in a row put an upstream in a cool-down (skipped, visible as a metric); when
/// it is over, the next request probes it again.
async fn an_upstream_that_keeps_failing_cools_down_then_is_probed(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    for _ in 0..3 {
        let s = send(&relay, "f_status_503", false).await;
        assert_eq!((s.status, s.record.attempts), (200, 2));
    }
    let s = send(&relay, "f_status_503", false).await;
    assert_eq!(
        (s.status, s.record.attempts),
        (200, 1),
        "skipped while cooling down"
    );
    let metrics = relay.metrics_text().await;
    assert!(
        metrics.contains("duang_upstream_cooling{model=\"fault-status-503\",provider=\"mock\"} 1")
    );
    // The provider's cool-down is 1 s in the test conf: then it is tried again (and fails again).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = send(&relay, "f_status_503", false).await;
        assert_eq!(s.status, 200);
        if s.record.attempts == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never probed again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = send(&relay, "f_status_503", false).await;
    assert_eq!(
        s.record.attempts, 1,
        "the failed probe starts another cool-down"
    );
}

support::on_both_stores!(
    the_fault_matrix,
    an_upstream_that_keeps_failing_cools_down_then_is_probed
);
