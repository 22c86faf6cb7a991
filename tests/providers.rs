//! Provider kinds against their wire formats. The `anthropic` kind against Anthropic's (the mock upstream replays the
//! documented Messages API answers in `tests/fixtures/anthropic`): requests translated, answers
//! and streams translated back event by event, billed from Anthropic's own counts; fields it
//! cannot take refused before any credit is held; its overload error moving to the next upstream.

mod support;

use duang::conf::Backend;
use duang::money::NanoUsd;
use serde_json::{Value, json};
use support::relay::{PROVIDER_KEY, Relay};

fn ask(model: &str) -> Value {
    json!({"model": model, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello."}
    ]})
}

fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("each event is JSON"))
        .collect()
}

/// claude tier: $3.60 / $18.00 per 1M tokens.
fn claude_cost(input: i64, output: i64) -> NanoUsd {
    NanoUsd::from_nanos(input * 3600 + output * 18000)
}

async fn anthropic_upstreams_speak_openai_to_clients(backend: Backend) {
    let relay = Relay::start(backend, "1").await;

    // A JSON answer.
    let r = relay.post(ask("claude")).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "claude", "the tier's name");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello! How can I help you today?"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 16, "input plus cache reads");
    assert_eq!(v["usage"]["completion_tokens"], 9);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
    let seen = relay.mock.stats().await["last_request"].clone();
    assert_eq!(seen["x-api-key"], PROVIDER_KEY);
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    assert!(
        seen["authorization"].is_null(),
        "no bearer header to Anthropic"
    );
    assert_eq!(seen["body"]["model"], "claude-sonnet");
    assert_eq!(seen["body"]["system"], "Be brief.");
    assert_eq!(
        seen["body"]["messages"],
        json!([{"role": "user", "content": "Say hello."}])
    );
    assert_eq!(
        seen["body"]["max_tokens"], 1000,
        "the tier's default cap: Anthropic needs one"
    );

    // A stream: text deltas, the stop reason, [DONE]; usage only for those who ask.
    let mut body = ask("claude");
    body["stream"] = json!(true);
    let text = relay.post(body.clone()).await.text().await.expect("body");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let ev = events(&text);
    let content: String = ev
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello!");
    assert!(
        ev.iter()
            .any(|e| e["choices"][0]["finish_reason"] == "stop")
    );
    assert!(ev.iter().all(|e| e.get("usage").is_none()), "{text}");
    body["stream_options"] = json!({"include_usage": true});
    let text = relay.post(body).await.text().await.expect("body");
    let usage = events(&text)
        .into_iter()
        .find_map(|e| e.get("usage").cloned())
        .expect("usage chunk");
    assert_eq!(
        (
            usage["prompt_tokens"].as_i64(),
            usage["completion_tokens"].as_i64()
        ),
        (Some(25), Some(15))
    );

    // Tool calls, streamed as OpenAI tool_call deltas.
    let mut tools = ask("claude");
    tools["stream"] = json!(true);
    tools["tools"] = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]);
    let text = relay.post(tools).await.text().await.expect("body");
    let ev = events(&text);
    let calls: Vec<&Value> = ev
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(calls[0]["id"], "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).expect("arguments"),
        json!({"location": "San Francisco, CA"})
    );
    assert!(
        ev.iter()
            .any(|e| e["choices"][0]["finish_reason"] == "tool_calls")
    );
    let seen = relay.mock.stats().await["last_request"].clone();
    assert_eq!(seen["body"]["tools"][0]["name"], "get_weather");
    assert_eq!(
        seen["body"]["tools"][0]["input_schema"]["properties"]["location"]["type"],
        "string"
    );

    // Billed from Anthropic's counts: 16 + 9, 25 + 15 (twice), 472 + 89.
    let records = relay.usage(4).await;
    let billed: NanoUsd = records.iter().map(|u| u.billed).sum();
    let expected = [
        claude_cost(16, 9),
        claude_cost(25, 15),
        claude_cost(25, 15),
        claude_cost(472, 89),
    ];
    assert_eq!(billed, expected.into_iter().sum::<NanoUsd>());
    assert!(
        records
            .iter()
            .all(|u| u.provider.as_deref() == Some("claude"))
    );
}

async fn what_anthropic_cannot_take_is_refused_first_and_its_overload_falls_back(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let before = relay.credit().await;
    let calls = relay.mock.stats().await["requests"].as_u64().unwrap_or(0);
    let mut two = ask("claude");
    two["n"] = json!(2);
    let r = relay.post(two).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["param"], "n");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("n > 1 is not supported")
    );
    assert_eq!(
        relay.mock.stats().await["requests"].as_u64().unwrap_or(0),
        calls,
        "nothing sent upstream"
    );
    assert_eq!(relay.credit().await, before, "nothing held or billed");

    // Anthropic's 529 overloaded_error moves the request on, unseen.
    let r = relay.post(ask("claude_fallback")).await;
    assert_eq!(r.status(), 200);
    let records = relay.usage(2).await;
    let served = records
        .iter()
        .find(|u| u.tier == "claude_fallback")
        .expect("record");
    assert_eq!(
        (served.attempts, served.upstream_model.as_deref()),
        (2, Some("mock-small"))
    );
}

/// Gemini's OpenAI-compatible endpoint puts `usage` in the last content chunk: it is billed from
/// there, and (as the chunk carries content) passed on.
async fn gemini_streams_and_bills_with_usage_in_the_last_chunk(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let r = relay.post(ask("gemini")).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello there!");
    let mut body = ask("gemini");
    body["stream"] = json!(true);
    let text = relay.post(body).await.text().await.expect("body");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let content: String = events(&text)
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello there!");
    let seen = relay.mock.stats().await["last_request"].clone();
    assert_eq!(seen["authorization"], format!("Bearer {PROVIDER_KEY}"));
    let records = relay.usage(2).await;
    for u in &records {
        assert_eq!((u.input_tokens, u.output_tokens), (9, 3), "{u:?}");
        assert_eq!(u.billed, NanoUsd::from_nanos(9 * 120 + 3 * 480));
    }
}

async fn messages_post(relay: &Relay, key: &str, body: Value) -> reqwest::Response {
    relay
        .client
        .post(format!("{}/v1/messages", relay.base))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .expect("request")
}

/// Clients built for Claude call `POST /v1/messages` with the same keys, tiers and billing, and
/// get Anthropic's answer, stream and error shapes.
async fn anthropic_clients_use_v1_messages(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let ask = json!({"model": "budget", "max_tokens": 50, "system": "Be brief.",
                     "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]});
    let r = messages_post(&relay, &relay.key, ask.clone()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        (v["type"].as_str(), v["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "tok0 tok1 tok2 tok3 "}])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"], json!({"input_tokens": 10, "output_tokens": 4}));
    let seen = relay.mock.stats().await["last_request"].clone();
    assert_eq!(
        seen["body"]["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(seen["body"]["max_tokens"], 50);
    assert_eq!(seen["body"]["model"], "mock-small");

    let mut stream = ask.clone();
    stream["stream"] = json!(true);
    let text = messages_post(&relay, &relay.key, stream)
        .await
        .text()
        .await
        .expect("body");
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"message_start"), "{text}");
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    assert!(names.contains(&"content_block_start") && names.contains(&"content_block_stop"));
    let data: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("json"))
        .collect();
    let said: String = data
        .iter()
        .filter_map(|d| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(said, "tok0 tok1 tok2 tok3 ");
    let delta = data
        .iter()
        .find(|d| d["type"] == "message_delta")
        .expect("message_delta");
    assert_eq!(delta["usage"]["output_tokens"], 4);
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert!(
        !text.contains("chat.completion"),
        "nothing of OpenAI's shape leaks: {text}"
    );

    // Errors in Anthropic's shape.
    let mut no_max = ask.clone();
    no_max.as_object_mut().expect("object").remove("max_tokens");
    let r = messages_post(&relay, &relay.key, no_max).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        (v["type"].as_str(), v["error"]["type"].as_str()),
        (Some("error"), Some("invalid_request_error"))
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("max_tokens")
    );
    let r = messages_post(&relay, "sk-relay_not-a-key", ask).await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["type"], "authentication_error");

    // Billed like any request of the tier (the refused key left no record: it is nobody's).
    let records = relay.usage(3).await;
    let billed: NanoUsd = records.iter().map(|u| u.billed).sum();
    assert_eq!(billed, NanoUsd::from_nanos(2 * (10 * 120 + 4 * 480)));
}

/// A reseller's prepaid upstream credit: recorded with `duang-admin upstream-credit add` (a
/// reference is never recorded twice, an unknown provider is refused), counted down by the
/// provider cost of every request exactly, a mail to the operators once below the conf's
/// threshold, and once spent the provider leaves routing: its tier falls back to the next
/// upstream, and the metrics say so.
async fn prepaid_upstream_credit_is_counted_down_and_leaves_routing_when_spent(backend: Backend) {
    let relay = Relay::start(backend, "5").await;
    let cli = |args: &[&str]| support::run(support::ADMIN_BIN, &relay.conf, args, None);
    let prepay = |provider: &str, usd: &str, reference: &str| {
        cli(&[
            "upstream-credit",
            "add",
            provider,
            "--usd",
            usd,
            "--ref",
            reference,
        ])
    };
    let added = prepay("prepaid", "0.00001", "inv-1");
    assert_eq!(added.code, 0, "{}", added.stderr);
    assert!(
        added.stdout.contains("prepaid credit left $0.00001"),
        "{}",
        added.stdout
    );
    let again = prepay("prepaid", "0.00001", "inv-1");
    assert_ne!(again.code, 0);
    assert!(
        again.stderr.contains("already recorded"),
        "{}",
        again.stderr
    );
    let unknown = prepay("nobody", "5", "x");
    assert_ne!(unknown.code, 0);
    assert!(
        unknown.stderr.contains("no provider named \"nobody\""),
        "{}",
        unknown.stderr
    );

    // The admin's view and its mail, on the same store and conf.
    let outbox = relay.dir().join("outbox");
    let text = std::fs::read_to_string(&relay.conf).expect("conf")
        + &format!(
            "\n[smtp]\noutbox_dir = {:?}\n",
            outbox.display().to_string()
        );
    let conf = support::parse_conf(&text, &[("DUANG_TEST_MOCK_KEY", PROVIDER_KEY)]).expect("conf");
    let operator = relay
        .store()
        .create_account(&duang::store::NewAccount {
            email: "ops@example.com".into(),
            password_hash: None,
            role: duang::store::Role::Operator,
            verified: true,
        })
        .await
        .expect("operator");
    let state =
        duang::admin::server::AppState::new(std::sync::Arc::new(conf), relay.store().clone())
            .await
            .expect("admin state");
    let mails = || support::admin::mails_to(&outbox, &operator.email);
    assert!(
        duang::admin::notify::prepaid_pass(&state)
            .await
            .expect("pass")
            .is_empty()
    );

    // Each request costs the provider 10 × $0.10 + 4 × $0.40 per million tokens: 2,600 nano-USD.
    let left = || async {
        relay
            .store()
            .provider_credits()
            .await
            .expect("credits")
            .into_iter()
            .find(|c| c.provider == "prepaid")
            .expect("prepaid")
            .remaining
    };
    // Who answered a request to the prepaid tier (from its usage record).
    let answered_by = || async {
        let r = relay.post(ask("prepaid")).await;
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
        let _ = r.text().await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let page = relay
                .store()
                .usage_page(relay.account_id, None, 1000)
                .await
                .expect("usage");
            if let Some(u) = page.into_iter().find(|u| u.request_id == id) {
                return u;
            }
            assert!(std::time::Instant::now() < deadline, "{id} never recorded");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    for n in 1..=4 {
        let u = answered_by().await;
        assert_eq!(
            u.provider.as_deref(),
            Some("prepaid"),
            "credit was left: {u:?}"
        );
        assert_eq!(u.provider_cost, NanoUsd::from_nanos(2_600));
        assert_eq!(
            left().await,
            NanoUsd::from_nanos(10_000 - 2_600 * n),
            "exact to the nano-USD"
        );
        if n == 2 {
            // 4,800 left, below the conf's 5,000: the operators are told, once.
            assert_eq!(
                duang::admin::notify::prepaid_pass(&state)
                    .await
                    .expect("pass"),
                ["prepaid"]
            );
            assert!(
                duang::admin::notify::prepaid_pass(&state)
                    .await
                    .expect("pass")
                    .is_empty()
            );
            let m = mails();
            assert_eq!(m.len(), 1);
            assert!(
                m[0].contains("Prepaid credit at prepaid is low"),
                "{}",
                m[0]
            );
        }
    }
    // Spent ($-0.0000004): the gateway reads the credit every 5 s; then the tier falls back.
    let routed = |on: bool| {
        let relay = &relay;
        async move {
            let want = format!(
                "duang_upstream_prepaid_left_routing{{provider=\"prepaid\"}} {}",
                i32::from(!on)
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !relay.metrics_text().await.contains(&want) {
                assert!(std::time::Instant::now() < deadline, "never saw {want}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    routed(false).await;
    for _ in 0..3 {
        let u = answered_by().await;
        assert_eq!(
            u.provider.as_deref(),
            Some("mock"),
            "back on a spent provider"
        );
    }
    assert_eq!(left().await, NanoUsd::from_nanos(-400));
    let metrics = relay.metrics_text().await;
    let remaining = -400;
    assert!(
        metrics.contains(&format!(
            "duang_upstream_prepaid_remaining_nano_usd{{provider=\"prepaid\"}} {remaining}"
        )) && metrics.contains("duang_upstream_prepaid_left_routing{provider=\"prepaid\"} 1")
            && metrics
                .contains("duang_upstream_prepaid_alert_below_nano_usd{provider=\"prepaid\"} 5000"),
        "{metrics}"
    );
    let listed = cli(&["upstream-credit", "list"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert!(
        listed.stdout.contains("prepaid")
            && listed
                .stdout
                .contains(&NanoUsd::from_nanos(remaining).to_string()),
        "{}",
        listed.stdout
    );
    let page = duang::admin::upstream_credit::prepaid_json(&state)
        .await
        .expect("json");
    assert_eq!(page[0]["out_of_routing"], true);
    assert_eq!(page[0]["remaining_nano_usd"], remaining);

    // Topped up: routed again at the next read.
    let topped = prepay("prepaid", "1", "inv-2");
    assert_eq!(topped.code, 0, "{}", topped.stderr);
    routed(true).await;
    assert_eq!(answered_by().await.provider.as_deref(), Some("prepaid"));
    // Retention deleting every raw usage record gives no credit back: spend is read from the
    // roll-ups, which it keeps.
    let before = left().await;
    relay
        .store()
        .apply_usage_retention(
            duang::time::now_ms() + 400 * 86_400_000,
            Some(std::time::Duration::from_secs(86_400)),
            1_000,
            std::time::Duration::ZERO,
        )
        .await
        .expect("retention");
    assert!(
        relay
            .store()
            .usage_page(relay.account_id, None, 10)
            .await
            .expect("usage")
            .is_empty()
    );
    assert_eq!(left().await, before);
    assert!(
        duang::admin::notify::prepaid_pass(&state)
            .await
            .expect("pass")
            .is_empty()
    );
}

support::on_both_stores!(
    prepaid_upstream_credit_is_counted_down_and_leaves_routing_when_spent,
    anthropic_clients_use_v1_messages,
    gemini_streams_and_bills_with_usage_in_the_last_chunk,
    anthropic_upstreams_speak_openai_to_clients,
    what_anthropic_cannot_take_is_refused_first_and_its_overload_falls_back,
);
