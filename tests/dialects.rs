//! The wire formats on both sides of the seam (issue #13), against the real binaries: the
//! Responses API translated to a chat upstream and passed through to one that speaks it, the
//! Messages API passed through to an Anthropic upstream (ids, stop sequences, CRLF framing),
//! the answer's `model`, an upstream's 429 advice passed on, and CORS for browser apps. Each
//! billed to the nano-USD from the usage the upstream reported, on both stores.

mod support;

use duang::conf::Backend;
use duang::money::NanoUsd;
use serde_json::{Value, json};
use support::relay::Relay;

/// The events of an SSE body: `(event name, data)`.
fn events(body: &str) -> Vec<(Option<String>, Value)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .map(str::to_owned);
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("data");
            (
                name,
                serde_json::from_str(data).expect("each event is JSON"),
            )
        })
        .collect()
}

/// budget-priced tiers: $0.12 in, $0.48 out per 1M tokens.
fn budget(input: i64, output: i64) -> NanoUsd {
    NanoUsd::from_nanos(input * 120 + output * 480)
}

async fn the_responses_api_is_translated_or_passed_through(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let before = relay.credit().await;

    // Translated to chat completions for an upstream that speaks only those.
    let ask = json!({"model": "budget", "instructions": "Be brief.", "input": "Say ok.",
                     "max_output_tokens": 50});
    let r = relay.post_to("/v1/responses", ask.clone()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["model"], "budget");
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["content"][0]["text"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(v["usage"]["input_tokens"], 10);
    assert_eq!(v["usage"]["output_tokens"], 4);
    let seen = relay.mock.stats().await["last_request"].clone();
    assert_eq!(
        seen["body"]["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say ok."}])
    );
    assert_eq!(seen["body"]["max_tokens"], 50);

    // Streamed: the Responses API's events, from response.created to response.completed.
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let r = relay.post_to("/v1/responses", streamed).await;
    assert_eq!(r.status(), 200);
    let ev = events(&r.text().await.expect("body"));
    assert_eq!(ev[0].0.as_deref(), Some("response.created"));
    let (last_name, last) = ev.last().expect("events");
    assert_eq!(last_name.as_deref(), Some("response.completed"));
    let text: String = ev
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("response.output_text.delta"))
        .filter_map(|(_, d)| d["delta"].as_str())
        .collect();
    assert_eq!(text, "tok0 tok1 tok2 tok3 ");
    assert_eq!(last["response"]["usage"]["output_tokens"], 4);
    for (n, (name, data)) in ev.iter().enumerate() {
        assert_eq!(data["type"].as_str(), name.as_deref());
        assert_eq!(data["sequence_number"], n);
    }

    // Passed through, untouched but for `model`, to an upstream that speaks it.
    let mut native = ask.clone();
    native["model"] = json!("native");
    let r = relay.post_to("/v1/responses", native.clone()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        v["id"],
        "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"
    );
    assert_eq!(v["model"], "native");
    let seen = relay.mock.stats().await["last_request"].clone();
    assert_eq!(seen["path"], "/v1/responses");
    assert_eq!(seen["body"]["model"], "mock-responses");
    assert_eq!(seen["body"]["instructions"], "Be brief.");
    native["stream"] = json!(true);
    let r = relay.post_to("/v1/responses", native).await;
    let ev = events(&r.text().await.expect("body"));
    assert_eq!(ev.len(), 10, "the fixture's ten events");
    assert_eq!(ev[9].1["response"]["model"], "native");
    assert_eq!(ev[9].1["response"]["usage"]["output_tokens"], 11);

    // What the relay cannot honour is refused before anything is held, naming the field.
    for (field, extra) in [
        ("store", json!({"store": true})),
        (
            "previous_response_id",
            json!({"previous_response_id": "resp_1"}),
        ),
        ("background", json!({"background": true})),
        ("tools", json!({"tools": [{"type": "web_search_preview"}]})),
    ] {
        let mut body = ask.clone();
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        let r = relay.post_to("/v1/responses", body).await;
        assert_eq!(r.status(), 400, "{field}");
        let e: Value = r.json().await.expect("json");
        assert_eq!(e["error"]["param"], field);
    }

    // Billed from each answer's usage: 10 in / 4 out twice, the fixture's 36/87 and 37/11.
    // The refusals are recorded, at no cost.
    let records = relay.usage(8).await;
    let (served, refused): (Vec<_>, Vec<_>) = records.iter().partition(|u| u.http_status == 200);
    assert_eq!(served.len(), 4);
    assert!(served.iter().all(|u| u.error_code.is_none()), "{served:?}");
    assert!(
        refused
            .iter()
            .all(|u| u.http_status == 400 && u.billed == NanoUsd::ZERO)
    );
    let billed: NanoUsd = records.iter().map(|u| u.billed).sum();
    let want = [budget(10, 4), budget(10, 4), budget(36, 87), budget(37, 11)]
        .into_iter()
        .sum::<NanoUsd>();
    assert_eq!(billed, want);
    assert_eq!(relay.credit().await, before.checked_sub(want).expect("sub"));
}

async fn messages_clients_on_an_anthropic_upstream_get_anthropics_answer(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let ask = json!({"model": "claude", "max_tokens": 100, "stop_sequences": ["END"],
                     "messages": [{"role": "user", "content": "Say hello."}]});
    let r = relay.post_to("/v1/messages", ask.clone()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        v["id"], "msg_01XFDUDYJgAACzvnptvVoYEL",
        "Anthropic's own id"
    );
    assert_eq!(v["stop_reason"], "stop_sequence");
    assert_eq!(v["stop_sequence"], "END");
    assert_eq!(v["model"], "claude");
    assert_eq!(v["usage"]["cache_read_input_tokens"], 4);
    let seen = relay.mock.stats().await["last_request"].clone();
    assert_eq!(seen["body"]["stop_sequences"], json!(["END"]));
    assert_eq!(seen["body"]["model"], "claude-sonnet");

    // Streams, LF- and CRLF-framed alike, pass through event by event.
    for tier in ["claude", "claude_crlf"] {
        let mut body = ask.clone();
        body["model"] = json!(tier);
        body["stream"] = json!(true);
        let r = relay.post_to("/v1/messages", body).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.expect("body").replace("\r\n", "\n");
        let ev = events(&text);
        assert_eq!(ev[0].0.as_deref(), Some("message_start"));
        assert_eq!(ev[0].1["message"]["model"], tier);
        assert!(
            ev[0].1["message"]["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("msg_") && !id.starts_with("msg_msg_"))
        );
        assert_eq!(ev.last().and_then(|e| e.0.as_deref()), Some("message_stop"));
        let said: String = ev
            .iter()
            .filter_map(|(_, d)| d["delta"]["text"].as_str())
            .collect();
        assert_eq!(said, "Hello!");
    }
    // claude: $3.60 / $18.00 per 1M; 12 + 4 cached in, 9 out; streams 25 in, 15 out.
    let records = relay.usage(3).await;
    assert!(
        records.iter().all(|u| u.error_code.is_none()),
        "{records:?}"
    );
    let billed: NanoUsd = records.iter().map(|u| u.billed).sum();
    assert_eq!(
        billed,
        NanoUsd::from_nanos((16 * 3600 + 9 * 18000) + 2 * (25 * 3600 + 15 * 18000))
    );
}

async fn the_answer_shows_the_tier_and_an_upstream_429_keeps_its_advice(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let ask = |tier: &str| json!({"model": tier, "messages": [{"role": "user", "content": "hi"}]});
    let v: Value = relay.post(ask("budget")).await.json().await.expect("json");
    assert_eq!(v["model"], "budget");
    let v: Value = relay.post(ask("named")).await.json().await.expect("json");
    assert_eq!(v["model"], "mock-small", "response_model = \"upstream\"");
    let mut body = ask("budget");
    body["stream"] = json!(true);
    let text = relay.post(body).await.text().await.expect("body");
    assert!(text.contains("\"model\":\"budget\"") && !text.contains("mock-small"));

    // The endpoints not served say so, and what to use instead.
    for path in ["/v1/completions", "/v1/messages/count_tokens"] {
        let r = relay
            .post_to(path, json!({"model": "budget", "prompt": "hi"}))
            .await;
        assert_eq!(r.status(), 404, "{path}");
        let e: Value = r.json().await.expect("json");
        assert_eq!(e["error"]["code"], "endpoint_not_served", "{path}");
        assert!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("README"))
        );
    }

    let r = relay.post(ask("f_429_only")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(r.headers()["retry-after-ms"], "6500");
}

async fn browser_apps_get_cors_from_allowed_origins_only(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let preflight = |origin: &str| {
        relay
            .client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/chat/completions", relay.base),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, x-stainless-os",
            )
            .send()
    };
    let r = preflight("https://chat.example").await.expect("preflight");
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://chat.example");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .expect("ascii")
            .contains("POST")
    );
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type, x-stainless-os"
    );
    assert_eq!(h["access-control-max-age"], "300");
    let r = preflight("https://evil.example").await.expect("preflight");
    assert_eq!(r.status(), 405);
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let r = relay
        .client
        .post(format!("{}/v1/chat/completions", relay.base))
        .bearer_auth(&relay.key)
        .header("origin", "https://chat.example")
        .json(&json!({"model": "budget", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://chat.example"
    );
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(exposed.contains("x-request-id") && exposed.contains("x-ratelimit-remaining-requests"));
}

async fn embeddings_are_priced_per_input_token(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let before = relay.credit().await;
    let r = relay
        .post_to(
            "/v1/embeddings",
            json!({"model": "embed", "input": ["one", "two"], "dimensions": 3}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["model"], "embed");
    assert_eq!(v["data"][1]["embedding"], json!([0.0, 0.125, 0.25]));
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    let seen = relay.mock.stats().await["last_request"].clone();
    assert_eq!(seen["path"], "/v1/embeddings");
    assert_eq!(seen["body"]["model"], "mock-embed");
    assert_eq!(seen["body"]["dimensions"], 3);
    // base64 passes through as the upstream wrote it; token ids are input too.
    let r = relay
        .post_to(
            "/v1/embeddings",
            json!({"model": "embed", "input": [1, 2, 3], "encoding_format": "base64"}),
        )
        .await;
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["data"][0]["embedding"], "AAAAAAAAAD4AAIA+AADAPg==");
    // The wrong kind of model for the endpoint, either way, says which to use.
    for (path, body) in [
        ("/v1/embeddings", json!({"model": "budget", "input": "x"})),
        (
            "/v1/chat/completions",
            json!({"model": "embed", "messages": [{"role": "user", "content": "x"}]}),
        ),
        ("/v1/embeddings", json!({"model": "embed", "input": []})),
        (
            "/v1/embeddings",
            json!({"model": "embed", "input": "x", "encoding_format": "int8"}),
        ),
    ] {
        let r = relay.post_to(path, body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.expect("json");
        assert!(e["error"]["param"].is_string(), "{e}");
    }
    // embed: $0.02 per 1M input tokens = 20 nano-USD per token; 6 + 3 tokens.
    let records = relay.usage(6).await;
    let billed: NanoUsd = records.iter().map(|u| u.billed).sum();
    assert_eq!(billed, NanoUsd::from_nanos(9 * 20));
    let served: Vec<_> = records.iter().filter(|u| u.http_status == 200).collect();
    assert_eq!(served.len(), 2);
    assert!(
        served
            .iter()
            .all(|u| u.output_tokens == 0 && u.tier == "embed")
    );
    assert_eq!(
        relay.credit().await,
        before.checked_sub(NanoUsd::from_nanos(180)).expect("sub")
    );
}

/// Cached input is recorded and priced apart where the conf says: the provider's cached-input
/// price for our cost, the tier's own cached-input price for the customer.
async fn cached_input_is_recorded_and_priced_apart(backend: Backend) {
    let relay = Relay::start(backend, "1").await;
    let ask = json!({"model": "claude_cached", "max_tokens": 100,
                     "messages": [{"role": "user", "content": "Say hello."}]});
    // The fixture's usage: 12 fresh input tokens, 4 read from the cache, 9 output.
    let r = relay.post_to("/v1/messages", ask.clone()).await;
    assert_eq!(r.status(), 200);
    let r = relay.post(ask).await;
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
    let records = relay.usage(2).await;
    for u in &records {
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.cache_write_tokens,
                u.output_tokens
            ),
            (16, 4, 0, 9)
        );
        // The customer: $3.60 fresh, $0.36 cached, $18.00 out per 1M.
        assert_eq!(
            u.billed,
            NanoUsd::from_nanos(12 * 3600 + 4 * 360 + 9 * 18000)
        );
        // Us: $3.00 fresh, $0.30 cached, $15.00 out.
        assert_eq!(
            u.provider_cost,
            NanoUsd::from_nanos(12 * 3000 + 4 * 300 + 9 * 15000)
        );
    }
}

support::on_both_stores!(
    cached_input_is_recorded_and_priced_apart,
    embeddings_are_priced_per_input_token,
    the_responses_api_is_translated_or_passed_through,
    messages_clients_on_an_anthropic_upstream_get_anthropics_answer,
    the_answer_shows_the_tier_and_an_upstream_429_keeps_its_advice,
    browser_apps_get_cors_from_allowed_origins_only,
);
