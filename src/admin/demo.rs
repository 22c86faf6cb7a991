//! The LOCAL DEMO upstream: an OpenAI-compatible chat-completions endpoint with a canned answer,
//! and an embeddings endpoint with made-up vectors, so the quick start reaches every endpoint
//! (the Responses and Messages APIs through the gateway's translation) without internet or
//! provider keys. It is labelled as a demo in every
//! answer and in the conf, and drops out of a tier as soon as a real provider there is enabled.

use super::server::Live;
use axum::Router;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

const ANSWER: &str = "Hello from the Duang Duang LOCAL DEMO upstream. Set a provider key in the \
                      environment (see conf/duang.toml) to get real model answers.";

pub fn router() -> Router<Live> {
    Router::new()
        .route("/chat/completions", post(chat))
        .route("/embeddings", post(embeddings))
        .route("/models", get(models))
        // Chat bodies with long histories are large; the gateway enforces the real limit.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
}

async fn models() -> impl IntoResponse {
    axum::Json(json!({"object": "list", "data": [
        {"id": "demo-budget", "object": "model", "created": 0, "owned_by": "duang-demo"},
        {"id": "demo-standard", "object": "model", "created": 0, "owned_by": "duang-demo"},
        {"id": "demo-premium", "object": "model", "created": 0, "owned_by": "duang-demo"},
        {"id": "demo-embeddings", "object": "model", "created": 0, "owned_by": "duang-demo"},
    ]}))
}

/// A rough token count for the demo's usage figures: one token per four bytes of text.
fn rough_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

async fn chat(body: axum::body::Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        let err = json!({"error": {"message": "the body is not valid JSON", "type": "invalid_request_error", "param": null, "code": null}});
        return (StatusCode::BAD_REQUEST, axum::Json(err)).into_response();
    };
    let model = req["model"].as_str().unwrap_or("demo").to_owned();
    let prompt_tokens = rough_tokens(&req["messages"].to_string());
    let words: Vec<&str> = ANSWER.split_inclusive(' ').collect();
    let completion_tokens = words.len() as u64;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    let id = format!("chatcmpl-demo{}", crate::time::now_ms());
    if req["stream"].as_bool() != Some(true) {
        return axum::Json(json!({
            "id": id, "object": "chat.completion", "created": crate::time::now_ms() / 1000,
            "model": model, "system_fingerprint": "duang-demo",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let include_usage = req["stream_options"]["include_usage"].as_bool() == Some(true);
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut out = String::new();
    let mut event = |v: Value| out.push_str(&format!("data: {v}\n\n"));
    event(chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ));
    for w in &words {
        event(chunk(json!({"content": w}), Value::Null));
    }
    event(chunk(json!({}), json!("stop")));
    if include_usage {
        event(
            json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage}),
        );
    }
    out.push_str("data: [DONE]\n\n");
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from(out))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Made-up embeddings: `dimensions` (default 16) numbers from a hash of each input, the same for
/// the same text, as floats or as base64 of little-endian f32 (`encoding_format`), with usage.
async fn embeddings(body: axum::body::Bytes) -> Response {
    use base64::Engine;
    use sha2::Digest;
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        let err = json!({"error": {"message": "the body is not valid JSON", "type": "invalid_request_error", "param": null, "code": null}});
        return (StatusCode::BAD_REQUEST, axum::Json(err)).into_response();
    };
    let inputs: Vec<String> = match &req["input"] {
        Value::Array(items) => items.iter().map(Value::to_string).collect(),
        other => vec![other.to_string()],
    };
    let dims = req["dimensions"].as_u64().unwrap_or(16).clamp(1, 4096) as usize;
    let base64 = req["encoding_format"] == "base64";
    let mut data = Vec::new();
    let mut tokens = 0;
    for (index, text) in inputs.iter().enumerate() {
        tokens += rough_tokens(text);
        let digest = sha2::Sha256::digest(text.as_bytes());
        let v: Vec<f32> = (0..dims)
            .map(|i| f32::from(digest[i % 32]) / 255.0 - 0.5)
            .collect();
        let embedding = if base64 {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            json!(v)
        };
        data.push(json!({"object": "embedding", "index": index, "embedding": embedding}));
    }
    axum::Json(json!({
        "object": "list", "data": data, "model": req["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}
