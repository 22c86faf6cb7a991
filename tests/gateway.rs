//! The gateway as a process, against the mock upstream process and a real store: completions,
//! streams, bodies of any size, the error table, holds under concurrency, exact billing, and key
//! revocation reaching the gateway within a second.

mod support;

use duang::conf::Backend;
use duang::money::NanoUsd;
use duang::store::AccountStatus;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::relay::{PROVIDER_KEY, Relay, new_key};

support::on_both_stores!(
    completion_is_routed_billed_and_recorded,
    concurrent_requests_never_overdraw,
    streams_pass_through_and_the_usage_chunk_is_only_for_those_who_ask,
    stream_chunks_reach_the_client_while_the_upstream_is_still_sending,
    bodies_of_any_size_up_to_the_limit_are_forwarded,
    the_error_table,
    fallback_before_the_first_byte_and_an_sse_error_after_it,
    a_client_that_leaves_stops_the_upstream_and_pays_for_what_it_got,
    revocation_suspension_and_verification_reach_the_gateway_within_a_second,
    x_api_key_usage_without_usage_and_a_stalled_stream,
    https_upstreams_trust_the_providers_own_ca,
    a_keys_spend_cap_stops_it_before_it_is_passed,
    models_need_a_key_and_show_what_it_may_use,
    the_request_head_is_judged_before_the_body,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_layer_holds_against_slow_and_odd_clients() {
    the_http_layer_holds(Backend::Sqlite).await;
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say ok in one word."}]})
}

async fn error_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.expect("error body is JSON");
    assert!(
        v["error"]["message"].is_string()
            && v["error"].get("type").is_some()
            && v["error"].get("param").is_some()
            && v["error"].get("code").is_some(),
        "OpenAI error shape: {v}"
    );
    (status, v["error"].clone())
}

/// budget: 10 prompt tokens × 120 + completion × 480 nano-USD.
fn budget_cost(completion: i64) -> NanoUsd {
    NanoUsd::from_nanos(10 * 120 + completion * 480)
}

async fn completion_is_routed_billed_and_recorded(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let r = relay.post(chat("budget")).await;
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    // The upstream saw the tier's model, the provider's key, and the client's fields.
    let seen = relay.mock.stats().await["last_request"].clone();
    assert_eq!(seen["body"]["model"], "mock-small");
    assert_eq!(seen["authorization"], format!("Bearer {PROVIDER_KEY}"));
    assert_eq!(
        seen["body"]["messages"][0]["content"],
        "Say ok in one word."
    );

    let records = relay.usage(1).await;
    let u = &records[0];
    assert_eq!(u.request_id, request_id);
    assert_eq!(
        (
            u.tier.as_str(),
            u.provider.as_deref(),
            u.upstream_model.as_deref()
        ),
        ("budget", Some("mock"), Some("mock-small"))
    );
    assert_eq!(
        (u.input_tokens, u.output_tokens, u.http_status, u.stream),
        (10, 4, 200, false)
    );
    assert_eq!(u.billed, budget_cost(4));
    assert_eq!(u.provider_cost, NanoUsd::from_nanos(10 * 100 + 4 * 400));
    assert!(u.ttft_ms.is_some() && u.finished_at >= u.started_at);
    assert_eq!(
        relay.credit().await,
        "1".parse::<NanoUsd>()
            .expect("usd")
            .checked_sub(budget_cost(4))
            .expect("sub")
    );
    let metrics = relay.metrics_text().await;
    assert!(
        metrics.contains(
            r#"duang_requests_total{route="/v1/chat/completions",status="200",tier="budget"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            r#"duang_billed_nano_usd_total{{tier="budget"}} {}"#,
            budget_cost(4).nanos()
        )),
        "{metrics}"
    );
    assert!(metrics.contains("duang_holds_in_flight 0"));
    assert!(metrics.contains("duang_usage_queue_depth 0"), "{metrics}");
    assert!(metrics.contains("duang_time_to_first_token_seconds_bucket"));
    assert!(
        metrics.contains(
            r#"duang_upstream_first_byte_seconds_count{model="mock-small",provider="mock"} 1"#
        ),
        "{metrics}"
    );
    let ledger = relay
        .store()
        .ledger(relay.account_id, 10)
        .await
        .expect("ledger");
    assert_eq!(ledger[0].external_ref, format!("usage:{request_id}"));
    assert_eq!(ledger[0].amount, budget_cost(4).checked_neg().expect("neg"));
}

async fn read_events(r: reqwest::Response) -> Vec<String> {
    let text = r.text().await.expect("body");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn streams_pass_through_and_the_usage_chunk_is_only_for_those_who_ask(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let mut body = chat("budget");
    body["stream"] = json!(true);
    let r = relay.post(body.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    // Chunked framing, so the connection is reusable after the stream.
    assert_eq!(r.headers()["transfer-encoding"], "chunked");
    let events = read_events(r).await;
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"));
    assert!(
        !events.iter().any(|e| e.contains("\"usage\"")),
        "usage chunk dropped: {events:?}"
    );
    let content: usize = events.iter().filter(|e| e.contains("tok")).count();
    assert_eq!(content, 4);
    // We asked the upstream for usage anyway, and billed from it.
    assert_eq!(
        relay.mock.stats().await["last_request"]["body"]["stream_options"]["include_usage"],
        true
    );

    body["stream_options"] = json!({"include_usage": true});
    let events = read_events(relay.post(body).await).await;
    assert!(
        events.iter().any(|e| e.contains("\"usage\"")),
        "usage chunk kept when asked"
    );
    let records = relay.usage(2).await;
    assert!(
        records
            .iter()
            .all(|u| u.stream && u.output_tokens == 4 && u.billed == budget_cost(4))
    );
}

async fn stream_chunks_reach_the_client_while_the_upstream_is_still_sending(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let mut body = chat("budget");
    body["stream"] = json!(true);
    body["mock"] = json!({"chunks": 6, "gap_ms": 150});
    let mut r = relay.post(body).await;
    let mut first_content_seen_while_open = None;
    let mut text = String::new();
    while let Some(chunk) = r.chunk().await.expect("chunk") {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if first_content_seen_while_open.is_none() && text.contains("tok0") {
            // The first token is here: the upstream must still be sending the rest.
            first_content_seen_while_open =
                Some(relay.mock.stats().await["streams_open"].as_i64() == Some(1));
        }
    }
    assert_eq!(
        first_content_seen_while_open,
        Some(true),
        "the first chunk arrived only after the upstream finished"
    );
    assert!(text.contains("tok5") && text.ends_with("data: [DONE]\n\n"));
}

async fn bodies_of_any_size_up_to_the_limit_are_forwarded(backend: Backend) {
    let relay = Relay::start(backend, "100").await;
    for size in [1024usize, 200 * 1024, 5 * 1024 * 1024] {
        let mut body = chat("budget");
        body["messages"][0]["content"] = json!("x".repeat(size));
        let r = relay.post(body).await;
        assert_eq!(r.status(), 200, "body of {size} bytes");
        let seen = relay.mock.stats().await["last_request"]["body_bytes"]
            .as_u64()
            .expect("bytes");
        assert!(
            seen as usize > size,
            "the upstream got {seen} bytes of a {size}-byte message"
        );
    }
    let mut body = chat("budget");
    body["messages"][0]["content"] = json!("x".repeat(7 * 1024 * 1024));
    let (status, e) = error_of(relay.post(body).await).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (413, Some("request_too_large"))
    );
}

async fn the_error_table(backend: Backend) {
    let relay = Relay::start(backend, "0.0003").await;
    let valid = chat("budget").to_string().into_bytes();

    let (s, e) = error_of(relay.post_raw(valid.clone(), None).await).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("invalid_api_key")));
    let (s, e) = error_of(
        relay
            .post_raw(
                valid.clone(),
                Some("sk-relay_0000000000000000000000000000000000000000"),
            )
            .await,
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (401, Some("invalid_api_key")));
    let (s, _) = error_of(relay.post_raw(valid.clone(), Some("not-a-key")).await).await;
    assert_eq!(s, 401);
    let (s, e) = error_of(
        relay
            .post_raw(b"{not json".to_vec(), Some(&relay.key))
            .await,
    )
    .await;
    assert_eq!(
        (s, e["type"].as_str()),
        (400, Some("invalid_request_error"))
    );
    let (s, e) = error_of(relay.post(json!({"model": "budget"})).await).await;
    assert_eq!((s, e["param"].as_str()), (400, Some("messages")));
    let (s, e) = error_of(
        relay
            .post(json!({"model": "budget", "messages": "hi"}))
            .await,
    )
    .await;
    assert_eq!((s, e["param"].as_str()), (400, Some("messages")));
    let (s, e) = error_of(relay.post(json!({"model": "budget", "messages": [{"role": "user", "content": "x"}], "stream": "yes"})).await).await;
    assert_eq!((s, e["param"].as_str()), (400, Some("stream")));
    for bad in [json!(-5), json!(0), json!(1.5), json!(50_000_000)] {
        let mut b = chat("budget");
        b["max_tokens"] = bad.clone();
        let (s, e) = error_of(relay.post(b).await).await;
        assert_eq!(
            (s, e["param"].as_str()),
            (400, Some("max_tokens")),
            "max_tokens {bad}"
        );
    }
    let (s, e) = error_of(relay.post(chat("gpt-4o")).await).await;
    assert_eq!(
        (s, e["code"].as_str(), e["param"].as_str()),
        (404, Some("model_not_found"), Some("model"))
    );
    assert!(e["message"].as_str().is_some_and(|m| m.contains("budget")));
    // $0.0003 cannot cover 1,000 output tokens at $0.48/M plus the prompt: 402, saying both amounts.
    let (s, e) = error_of(relay.post(chat("budget")).await).await;
    assert_eq!(
        (s, e["code"].as_str(), e["type"].as_str()),
        (402, Some("insufficient_quota"), Some("insufficient_quota"))
    );
    let m = e["message"].as_str().expect("message");
    assert!(
        m.contains("$0.0003") && m.contains("up to $0.000489"),
        "{m}"
    );
    // A small max_tokens fits.
    let mut small = chat("budget");
    small["max_tokens"] = json!(100);
    assert_eq!(relay.post(small.clone()).await.status(), 200);
    // Upstream unreachable → 502; timed out → 504; its own 4xx passed through in our shape.
    let (s, e) = error_of(relay.post(json!({"model": "unreachable", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})).await).await;
    assert_eq!((s, e["code"].as_str()), (502, Some("upstream_unavailable")));
    let mut slow = chat("slow");
    slow["max_tokens"] = json!(1);
    slow["mock"] = json!({"ttft_ms": 2000});
    let (s, e) = error_of(relay.post(slow).await).await;
    assert_eq!((s, e["code"].as_str()), (504, Some("upstream_timeout")));
    let mut refused = small.clone();
    refused["mock"] = json!({"status": 400});
    let (s, e) = error_of(relay.post(refused).await).await;
    assert_eq!(
        (s, e["message"].as_str()),
        (400, Some("mock: injected failure"))
    );
    // Failures before any output cost nothing: only the one successful request was billed.
    let records = relay.usage(14).await;
    let billed: Vec<_> = records.iter().filter(|r| r.billed.is_positive()).collect();
    assert_eq!(billed.len(), 1, "{records:#?}");
    assert_eq!(
        relay.credit().await,
        "0.0003"
            .parse::<NanoUsd>()
            .expect("usd")
            .checked_sub(budget_cost(4))
            .expect("sub")
    );
}

async fn fallback_before_the_first_byte_and_an_sse_error_after_it(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    // premium's first pick is a dead address; the mock behind it answers.
    let r = relay.post(chat("premium")).await;
    assert_eq!(r.status(), 200);
    let records = relay.usage(1).await;
    assert_eq!(
        (records[0].provider.as_deref(), records[0].attempts),
        (Some("mock"), 2)
    );
    // A stream cut by the upstream ends with an SSE error event, and bills what was delivered.
    let mut body = chat("budget");
    body["stream"] = json!(true);
    body["mock"] = json!({"chunks": 4, "fault": "reset", "fault_after": 2});
    let events = read_events(relay.post(body).await).await;
    let last = events.last().expect("events");
    assert!(last.starts_with("data: {\"error\""), "{events:?}");
    assert_eq!(events.iter().filter(|e| e.contains("tok")).count(), 2);
    let records = relay.usage(2).await;
    let cut = records.iter().find(|r| r.stream).expect("stream record");
    assert!(
        cut.output_tokens >= 2 && cut.billed.is_positive(),
        "{cut:?}"
    );
    assert_eq!(cut.error_code.as_deref(), Some("upstream_unavailable"));
    relay.credit().await;
}

async fn a_client_that_leaves_stops_the_upstream_and_pays_for_what_it_got(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let mut body = chat("budget");
    body["stream"] = json!(true);
    body["mock"] = json!({"chunks": 200, "gap_ms": 20});
    let mut r = relay.post(body).await;
    let mut text = String::new();
    while !text.contains("tok2") {
        let chunk = r.chunk().await.expect("chunk").expect("more");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(r);
    relay
        .client
        .get(format!("{}/healthz", relay.base))
        .send()
        .await
        .expect("still serving");
    // The gateway closes the upstream stream: the mock's sender stops.
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.mock.stats().await["streams_open"].as_i64() != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the upstream stream was left running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let records = relay.usage(1).await;
    let u = &records[0];
    assert_eq!(u.error_code.as_deref(), Some("client_disconnected"));
    assert!(u.output_tokens >= 3 && u.output_tokens < 200, "{u:?}");
    assert!(u.billed.is_positive());
    relay.credit().await;
}

async fn concurrent_requests_never_overdraw(backend: Backend) {
    // Each request holds 10 + its body bytes of input and 1,000 output tokens at most: about
    // $0.0005; $0.005 covers about ten of them at once.
    let relay = Relay::start(backend, "0.005").await;
    let before = relay.credit().await;
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let client = relay.client.clone();
            let url = format!("{}/v1/chat/completions", relay.base);
            let key = relay.key.clone();
            tokio::spawn(async move {
                client
                    .post(url)
                    .bearer_auth(key)
                    .json(&chat("budget"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.expect("task").expect("response") {
            200 => ok += 1,
            402 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ok + refused, 200);
    assert!(ok >= 9, "at least the covered requests succeed: {ok}");
    let records = relay.usage(200).await;
    let billed = NanoUsd::checked_sum(records.iter().map(|r| r.billed)).expect("sum");
    assert_eq!(billed, NanoUsd::from_nanos(budget_cost(4).nanos() * ok));
    let after = relay.credit().await;
    assert!(!after.is_negative());
    assert_eq!(after, before.checked_sub(billed).expect("sub"));
}

/// Polls until the gateway answers `status` for the key, and returns how long that took.
async fn until_status(relay: &Relay, key: &str, status: u16) -> Duration {
    let start = Instant::now();
    loop {
        let r = relay
            .post_raw(chat("budget").to_string().into_bytes(), Some(key))
            .await;
        if r.status().as_u16() == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "status {status} never came"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn revocation_suspension_and_verification_reach_the_gateway_within_a_second(
    backend: Backend,
) {
    let relay = Relay::start(backend, "1").await;
    assert_eq!(relay.post(chat("budget")).await.status(), 200);
    relay
        .store()
        .revoke_key(relay.key_id, "test", None)
        .await
        .expect("revoke");
    let took = until_status(&relay, &relay.key, 401).await;
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");

    let (key2, _) = new_key(relay.store(), relay.account_id).await;
    assert_eq!(
        relay
            .post_raw(chat("budget").to_string().into_bytes(), Some(&key2))
            .await
            .status(),
        200
    );
    relay
        .store()
        .set_account_status(
            relay.account_id,
            AccountStatus::Suspended,
            "test",
            Some("AUP"),
        )
        .await
        .expect("suspend");
    let took = until_status(&relay, &key2, 403).await;
    assert!(took < Duration::from_secs(1), "suspension took {took:?}");
    let (s, e) = error_of(
        relay
            .post_raw(chat("budget").to_string().into_bytes(), Some(&key2))
            .await,
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (403, Some("account_suspended")));
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("support@duang-duang.com"))
    );

    // An unverified account's keys get 403 that says so.
    let other = relay
        .store()
        .create_account(&duang::store::NewAccount {
            email: "new@example.com".into(),
            password_hash: None,
            role: duang::store::Role::Customer,
            verified: false,
        })
        .await
        .expect("account");
    let (key3, _) = new_key(relay.store(), other.id).await;
    let (s, e) = error_of(
        relay
            .post_raw(chat("budget").to_string().into_bytes(), Some(&key3))
            .await,
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (403, Some("email_not_verified")));
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("Verify your e-mail"))
    );
}

async fn x_api_key_usage_without_usage_and_a_stalled_stream(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    // Clients that send `x-api-key` instead of a bearer token.
    let r = relay
        .client
        .post(format!("{}/v1/chat/completions", relay.base))
        .header("x-api-key", &relay.key)
        .json(&chat("budget"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);

    // An upstream that reports no usage: the gateway counts the text with tiktoken.
    let mut body = chat("budget");
    body["mock"] = json!({"usage": false, "chunks": 5});
    let v: Value = relay.post(body.clone()).await.json().await.expect("json");
    assert!(v.get("usage").is_none_or(Value::is_null), "{v}");
    body["stream"] = json!(true);
    let events = read_events(relay.post(body).await).await;
    assert!(!events.iter().any(|e| e.contains("\"usage\"")));
    let records = relay.usage(3).await;
    let counted = duang::gateway::tokens::count_tokens("tok0 tok1 tok2 tok3 tok4 ") as i64;
    let prompt = duang::gateway::tokens::count_tokens("Say ok in one word.\n") as i64;
    for r in records.iter().filter(|r| r.output_tokens != 4) {
        assert_eq!(
            (r.input_tokens, r.output_tokens),
            (prompt, counted),
            "{r:?}"
        );
        assert_eq!(r.billed, NanoUsd::from_nanos(prompt * 120 + counted * 480));
    }

    // A stream that stalls past the provider's idle timeout (1.5 s) ends with an SSE error.
    let mut body = chat("budget");
    body["stream"] = json!(true);
    body["mock"] = json!({"chunks": 4, "fault": "stall", "fault_after": 2});
    let events = read_events(relay.post(body).await).await;
    let last = events.last().expect("events");
    assert!(last.contains("upstream_timeout"), "{events:?}");
    assert_eq!(events.iter().filter(|e| e.contains("tok")).count(), 2);
    relay.credit().await;
}

/// `tiers.secure` reaches the mock over HTTPS, trusting the test CA named in the provider's
/// `ca_file`; `tiers.untrusted` is the same server without it, so its certificate is refused.
async fn https_upstreams_trust_the_providers_own_ca(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    for _ in 0..2 {
        let r = relay.post(chat("secure")).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["model"], "secure", "the tier's name, not the upstream's");
        assert_eq!(v["usage"]["completion_tokens"], 4);
    }
    let mut body = chat("secure");
    body["stream"] = json!(true);
    let r = relay.post(body).await;
    assert_eq!(r.status(), 200);
    let events = read_events(r).await;
    assert_eq!(events.iter().filter(|e| e.contains("tok")).count(), 4);
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"));

    let (status, e) = error_of(relay.post(chat("untrusted")).await).await;
    assert_eq!(status, 502);
    assert_eq!(e["code"], "upstream_unavailable");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(message.contains("TLS handshake failed"), "{message}");

    let records = relay.usage(4).await;
    let served: Vec<_> = records
        .iter()
        .map(|u| (u.provider.as_deref(), u.http_status))
        .collect();
    assert_eq!(
        served
            .iter()
            .filter(|s| **s == (Some("secure"), 200))
            .count(),
        3,
        "{served:?}"
    );
    // The refused attempt cost nothing.
    assert_eq!(
        records
            .iter()
            .filter(|u| u.http_status == 502)
            .map(|u| u.billed)
            .sum::<NanoUsd>(),
        NanoUsd::ZERO
    );
}

async fn a_keys_spend_cap_stops_it_before_it_is_passed(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let mut body = chat("budget");
    body["max_tokens"] = json!(4);
    let bytes = body.to_string().into_bytes();
    // The hold is the worst case: every body byte a token at the input price, plus max_tokens
    // at the output price; each answer bills 10 input and 4 output tokens.
    let worst = bytes.len() as i64 * 120 + 4 * 480;
    let billed = budget_cost(4).nanos();
    let cap = NanoUsd::from_nanos(billed + worst + 1_000);
    let (key, key_id) = relay.capped_key(cap).await;
    for _ in 0..2 {
        let r = relay.post_raw(bytes.clone(), Some(&key)).await;
        assert_eq!(r.status(), 200);
    }
    // Spent 2 × billed; a third worst case would pass the cap.
    let (status, e) = error_of(relay.post_raw(bytes.clone(), Some(&key)).await).await;
    assert_eq!(status, 402);
    assert_eq!(
        (e["code"].as_str(), e["type"].as_str()),
        (Some("spend_cap_reached"), Some("insufficient_quota"))
    );
    let message = e["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("it may spend {cap}"))
            && message.contains(&format!(
                "has used {} of it",
                NanoUsd::from_nanos(2 * billed)
            ))
            && message.contains("held by requests in flight"),
        "{message}"
    );
    // The account's other keys are not capped.
    let r = relay.post_raw(bytes.clone(), Some(&relay.key)).await;
    assert_eq!(r.status(), 200);
    let records = relay.usage(4).await;
    let spent: NanoUsd = records
        .iter()
        .filter(|u| u.key_id == key_id)
        .map(|u| u.billed)
        .sum();
    assert_eq!(spent, NanoUsd::from_nanos(2 * billed));
    assert!(spent <= cap);

    // A key that already spent (as another node or an earlier run wrote it) starts from there.
    let (key2, key2_id) = relay.capped_key(NanoUsd::from_nanos(worst + 5_000)).await;
    let mut earlier = records[0].clone();
    earlier.request_id = "earlier-run".into();
    earlier.key_id = key2_id;
    earlier.billed = NanoUsd::from_nanos(5_001);
    relay
        .store()
        .insert_usage_batch(&[earlier])
        .await
        .expect("usage");
    let (status, e) = error_of(relay.post_raw(bytes, Some(&key2)).await).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (402, Some("spend_cap_reached"))
    );
    relay.credit().await;
}

/// `GET /v1/models` and `/v1/models/{id}` need a valid key and show only what it may use.
async fn models_need_a_key_and_show_what_it_may_use(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let get = |path: &str, key: Option<&str>| {
        let mut r = relay.client.get(format!("{}{path}", relay.base));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    // Readiness, free and without a key: started, worker running, store answering.
    let r = get("/readyz", None).await.expect("readyz");
    assert_eq!(r.status(), 200);
    let ready: Value = r.json().await.expect("json");
    assert_eq!(
        (&ready["status"], &ready["store"]),
        (&json!("ready"), &json!("ok")),
        "{ready}"
    );
    assert!(
        ready["worker_beat_age_ms"]
            .as_i64()
            .is_some_and(|a| a < 30_000),
        "{ready}"
    );
    for key in [None, Some("sk-relay_not-a-real-key-at-all-000000000000")] {
        let (s, e) = error_of(get("/v1/models", key).await.expect("models")).await;
        assert_eq!((s, e["code"].as_str()), (401, Some("invalid_api_key")));
    }
    let all: Value = get("/v1/models", Some(&relay.key))
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = all["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"budget") && ids.contains(&"premium"),
        "{ids:?}"
    );
    // A key limited to one tier sees that tier only.
    let m = duang::keys::generate();
    relay
        .store()
        .create_key(
            &duang::store::NewKey {
                account_id: relay.account_id,
                name: "budget only".into(),
                allowed_models: Some(vec!["budget".into()]),
                ..Default::default()
            },
            &m.hash,
            &m.display_prefix,
        )
        .await
        .expect("key");
    let limited = m.plaintext.expose().clone();
    let listed: Value = get("/v1/models", Some(&limited))
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
    let one: Value = get("/v1/models/budget", Some(&limited))
        .await
        .expect("model")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (one["id"].as_str(), one["object"].as_str()),
        (Some("budget"), Some("model"))
    );
    for id in ["premium", "no-such-tier"] {
        let (s, e) = error_of(
            get(&format!("/v1/models/{id}"), Some(&limited))
                .await
                .expect("model"),
        )
        .await;
        assert_eq!(
            (s, e["code"].as_str()),
            (404, Some("model_not_found")),
            "{id}"
        );
    }
    // A suspended account's key lists nothing.
    relay
        .store()
        .set_account_status(
            relay.account_id,
            AccountStatus::Suspended,
            "test",
            Some("AUP"),
        )
        .await
        .expect("suspend");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get("/v1/models", Some(&relay.key)).await.expect("models");
        if r.status() == 403 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a suspended account still lists models"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends raw bytes on a fresh connection, half-closes it, and reads until the gateway closes it
/// (a guard of 10 s against a gateway that never answers).
async fn raw_exchange(base: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    // Nothing more comes from this client: the body a head declared is never sent.
    s.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "no answer, or the connection was kept open: {}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// What the request head alone decides, on a real socket: a declared body over the limit is
/// answered 413 before any of it is sent (and the connection closed), and an HTTP/1.1 request
/// without `Host` is a 400; HTTP/1.0 needs no `Host`.
async fn the_request_head_is_judged_before_the_body(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let too_big = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{{\"model\":",
        relay.key
    );
    let answer = raw_exchange(&relay.base, too_big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.contains("request_too_large"), "{answer}");
    let no_host = raw_exchange(
        &relay.base,
        b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(no_host.starts_with("HTTP/1.1 400"), "{no_host}");
    assert!(no_host.contains("Host header"), "{no_host}");
    let old = raw_exchange(&relay.base, b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(old.contains(" 200 "), "{old}");
    assert_eq!(
        relay.mock.stats().await["requests"],
        0,
        "nothing reached the upstream"
    );

    // An idle kept-alive connection is closed after `gateway.keepalive_idle_s` (1 s here): the
    // answer comes, the connection stays open for the next request, then the gateway closes it.
    let node = relay
        .node_on_store(&relay.t.url, "keepalive_idle_s = 1")
        .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(node.base.trim_start_matches("http://"))
        .await
        .expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("connection: close"),
        "kept alive: {text}"
    );
    assert_eq!(
        closed,
        Ok(true),
        "the idle connection was closed by the gateway"
    );
}

/// Reads from `s` until the gateway closes the connection (a guard of 10 s against one that
/// never does): what it said, and whether it closed.
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// Reads one whole answer with a `content-length` from a kept-alive connection.
async fn read_one_answer(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().expect("length"))
                })
                .expect("content-length");
            if got.len() >= end + 4 + len {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(n > 0, "closed before a whole answer: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// The HTTP layer's bounds, on real sockets (1 s for a head and for a body, 2 KiB heads, four
/// connections): a head trickled byte by byte is cut off with 408 while it is still coming; a
/// kept-alive connection idle for longer than that still takes its next request (the head's
/// clock starts at its first byte); an oversized head gets 431; a body that stops coming gets
/// 408; the fifth connection gets 503 `too_many_connections` and a closed one frees its place;
/// pipelined requests are answered in order, bodies included; CONNECT and unparsable heads are
/// refused.
async fn the_http_layer_holds(backend: Backend) {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let relay = Relay::start(backend, "1").await;
    let node = relay
        .node_on_store(
            &relay.t.url,
            "header_read_timeout_ms = 1000\nbody_read_timeout_ms = 1000\nmax_header_bytes = 2048\nmax_client_connections = 4",
        )
        .await;
    let addr = node.base.trim_start_matches("http://").to_owned();

    // Slowloris: one byte every 100 ms never completes the head; the gateway answers 408 and
    // closes while the client is still sending.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    let head = b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Slow: ";
    let started = Instant::now();
    let mut cut = false;
    for i in 0..100 {
        let byte = if i < head.len() { head[i] } else { b'a' };
        if s.write_all(&[byte]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let (said, closed) = read_until_closed(&mut s).await;
    assert!(closed, "the trickling connection was closed: {said}");
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("request_timeout"), "{said}");
    assert!(
        cut || started.elapsed() <= Duration::from_secs(4),
        "the gateway waited for the trickle to end"
    );

    // A kept-alive connection: idle for 1.5 s (past the head timeout, inside keepalive_idle_s)
    // between two requests, both answered.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .expect("write");
    assert!(read_one_answer(&mut s).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let (said, _) = read_until_closed(&mut s).await;
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");

    // A head over max_header_bytes.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Big: {}\r\n\r\n",
        "b".repeat(3000)
    );
    s.write_all(big.as_bytes()).await.expect("write");
    let (said, closed) = read_until_closed(&mut s).await;
    assert!(closed && said.starts_with("HTTP/1.1 431"), "{said}");
    assert!(said.contains("request_header_too_large"), "{said}");

    // A body that stops coming: 408 after body_read_timeout_ms, then the connection closes.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"model\":",
        relay.key
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let (said, closed) = read_until_closed(&mut s).await;
    assert!(closed && said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("\"code\":\"request_timeout\""), "{said}");
    assert!(said.contains("body"), "{said}");

    // Four connections held open (kept alive after one request each); the fifth is refused.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
            .await
            .expect("write");
        assert!(read_one_answer(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .expect("write");
    let (said, closed) = read_until_closed(&mut s).await;
    assert!(closed && said.starts_with("HTTP/1.1 503"), "{said}");
    assert!(said.contains("too_many_connections"), "{said}");
    assert!(
        said.to_ascii_lowercase().contains("retry-after: 1"),
        "{said}"
    );
    let metrics = node.metrics_text().await;
    assert!(
        metrics.contains("duang_client_connections 4")
            && metrics.contains("duang_client_connections_refused_total 1"),
        "{metrics}"
    );
    // One closes: its place is given back once the gateway sees it go.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let (said, _) = read_until_closed(&mut s).await;
        if said.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(said.starts_with("HTTP/1.1 503"), "{said}");
        assert!(
            Instant::now() < deadline,
            "the closed connection's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Pipelining: three requests in one write (two with bodies), three answers in order.
    let mut s = held.pop().expect("a held connection");
    let body = serde_json::to_string(&chat("budget")).expect("json");
    let one = |last: bool| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
            relay.key,
            body.len(),
            if last { "Connection: close\r\n" } else { "" }
        )
    };
    let pipelined = format!(
        "{}GET /readyz HTTP/1.1\r\nHost: relay\r\n\r\n{}",
        one(false),
        one(true)
    );
    s.write_all(pipelined.as_bytes()).await.expect("write");
    let (said, closed) = read_until_closed(&mut s).await;
    assert!(closed, "{said}");
    let answers: Vec<&str> = said.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 3, "{said}");
    assert!(answers[0].starts_with("200") && answers[0].contains("chat.completion"));
    assert!(answers[1].starts_with("200") && answers[1].contains("\"status\":\"ready\""));
    assert!(answers[2].starts_with("200") && answers[2].contains("chat.completion"));

    drop(held);

    // What the connection loop answers itself: CONNECT is never proxied (405), a head that is
    // not HTTP gets 400; both close the connection. (A 503 means the held connections' places
    // are not given back yet.)
    for (head, status) in [
        (
            "CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n",
            "405",
        ),
        ("GET /healthz HTTP/1.1\r\nHost relay\r\n\r\n", "400"),
    ] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let said = loop {
            let mut s = TcpStream::connect(&addr).await.expect("connect");
            s.write_all(head.as_bytes()).await.expect("write");
            let (said, closed) = read_until_closed(&mut s).await;
            assert!(closed, "{said}");
            if !said.starts_with("HTTP/1.1 503") || Instant::now() > deadline {
                break said;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            said.starts_with(&format!("HTTP/1.1 {status}")),
            "{head:?}: {said}"
        );
    }
}
