//! `duang-mock-upstream`: a local stand-in for an OpenAI-compatible provider, for tests and load
//! benchmarks. It speaks the real wire format (chat completions as JSON and as SSE, OpenAI's error
//! shape) so the gateway cannot tell it from a provider.
//!
//! It prints `listening on http://ADDR` as its first line (start it on port 0 and read the port).
//! Defaults come from flags; each request may override them with a `mock` object in its body,
//! which the gateway forwards untouched:
//!
//! ```json
//! {"model": "...", "messages": [...], "stream": true,
//!  "mock": {"ttft_ms": 50, "gap_ms": 10, "chunks": 5, "usage": false, "prompt_tokens": 12,
//!           "status": 503, "retry_after_s": 2, "fault": "reset", "fault_after": 2}}
//! ```
//!
//! Faults: `status` answers with that HTTP status and an OpenAI error body (with `retry_after_s`
//! and `retry_after_ms` as headers); `fault` is one of `reset` (cut the connection after
//! `fault_after` chunks), `malformed` (send a chunk that is not JSON), `stall` (stop sending
//! without closing), `error_body` (200 with an error object), `truncate` (end the stream
//! cleanly after `fault_after` chunks, without a finish reason or `[DONE]`), `split` (send half
//! an event, then cut the connection), `late_close` (the whole answer, then keep the connection
//! open and silent instead of ending the body).
//! `POST /v1/embeddings` answers `dimensions` (default 4) numbers per input, `i / 8` for the
//! i-th, as floats or base64 (`encoding_format`), with 3 prompt tokens per input.
//! `POST /v1/responses` replays the Responses API fixtures (`tests/fixtures/responses`), and
//! `POST /v1/messages` Anthropic's (`tests/fixtures/anthropic`; a model with `crlf` in its name
//! gets them with CRLF framing).
//! With `--tls-cert` and `--tls-key` it serves HTTPS instead (and prints `https://`).
//! `GET /_mock/stats` reports requests served, connections and streams open now, and the last request seen
//! (its body and the `authorization` header), so tests can check what the gateway sent.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use pingora::tls::{CertificateDer, PrivateKeyDer, ServerConfig, ServerTlsStream, TlsAcceptor};
use serde_json::{Value, json};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Parser, Clone)]
#[command(
    name = "duang-mock-upstream",
    about = "A mock OpenAI-compatible upstream for tests and benchmarks"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Delay before the first byte of the answer.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Delay between stream chunks.
    #[arg(long, default_value_t = 0)]
    gap_ms: u64,
    /// Content chunks per answer (one token each).
    #[arg(long, default_value_t = 8)]
    chunks: u64,
    /// Report usage (JSON `usage`; the usage chunk when the request asks for it).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    usage: bool,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    /// Streams still being sent.
    streams_open: AtomicI64,
    open_connections: AtomicI64,
    last_request: Mutex<Value>,
}

#[derive(Clone)]
struct AppState {
    args: Args,
    stats: Arc<Stats>,
}

/// Per-request knobs: the flags' defaults overridden by the body's `mock` object.
struct Knobs {
    ttft: Duration,
    gap: Duration,
    chunks: u64,
    usage: bool,
    prompt_tokens: u64,
    status: Option<u16>,
    retry_after_s: Option<u64>,
    retry_after_ms: Option<u64>,
    fault: Option<String>,
    fault_after: u64,
}

impl Knobs {
    fn new(args: &Args, req: &Value) -> Knobs {
        let m = &req["mock"];
        let num = |k: &str, d: u64| m[k].as_u64().unwrap_or(d);
        Knobs {
            ttft: Duration::from_millis(num("ttft_ms", args.ttft_ms)),
            gap: Duration::from_millis(num("gap_ms", args.gap_ms)),
            chunks: num("chunks", args.chunks),
            usage: m["usage"].as_bool().unwrap_or(args.usage),
            prompt_tokens: num("prompt_tokens", 10),
            status: m["status"].as_u64().and_then(|s| u16::try_from(s).ok()),
            retry_after_s: m["retry_after_s"].as_u64(),
            retry_after_ms: m["retry_after_ms"].as_u64(),
            fault: m["fault"].as_str().map(str::to_owned),
            fault_after: num("fault_after", 1),
        }
        .with_model_faults(req["model"].as_str().unwrap_or_default())
    }

    /// Faults named by the model, so that one upstream of a tier fails and the next does not
    /// (the gateway sends each upstream its own model name): `fault-status-500`,
    /// `fault-status-429-retry-2`, `fault-status-429-retryms-1500`, `fault-reset`, `fault-truncate`,
    /// `fault-split`, `fault-late_close`, `fault-malformed`, `fault-stall`,
    /// `fault-error_body`, `fault-nousage`, `fault-slow-1000` (milliseconds before answering).
    fn with_model_faults(mut self, model: &str) -> Knobs {
        let Some(spec) = model.strip_prefix("fault-") else {
            return self;
        };
        let parts: Vec<&str> = spec.split('-').collect();
        let mut i = 0;
        while i < parts.len() {
            let next = parts.get(i + 1).and_then(|v| v.parse::<u64>().ok());
            match parts[i] {
                "status" => {
                    self.status = next.and_then(|v| u16::try_from(v).ok());
                    i += 1;
                }
                "retry" => {
                    self.retry_after_s = next;
                    i += 1;
                }
                "retryms" => {
                    self.retry_after_ms = next;
                    i += 1;
                }
                "slow" => {
                    self.ttft = Duration::from_millis(next.unwrap_or(1000));
                    i += 1;
                }
                "nousage" => self.usage = false,
                f @ ("reset" | "malformed" | "stall" | "error_body" | "truncate" | "split"
                | "late_close") => self.fault = Some(f.to_owned()),
                _ => {}
            }
            i += 1;
        }
        self
    }
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&args.listen).await?;
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        println!("listening on {scheme}://{}", listener.local_addr()?);
        let stats = Arc::new(Stats::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/messages", post(messages))
            .route("/v1/responses", post(responses))
            .route("/v1/embeddings", post(embeddings))
            .route("/_mock/stats", get(stats_handler))
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(AppState {
                args,
                stats: stats.clone(),
            });
        axum::serve(
            CountingListener {
                inner: listener,
                tls,
                stats,
            },
            app,
        )
        .await
    })
}

const GEMINI_MESSAGE: &str = include_str!("../tests/fixtures/gemini/message.json");
const GEMINI_STREAM: &str = include_str!("../tests/fixtures/gemini/stream.sse");

/// Gemini's OpenAI-compatible answers (`tests/fixtures/gemini`), for models named
/// `gemini-fixture…`.
fn gemini_fixture(req: &Value) -> Option<Response> {
    let model = req["model"]
        .as_str()
        .filter(|m| m.starts_with("gemini-fixture"))?;
    if req["stream"].as_bool() != Some(true) {
        let text = GEMINI_MESSAGE.replace("MODEL", model);
        return Some(([(header::CONTENT_TYPE, "application/json")], text).into_response());
    }
    Some(
        (
            [(header::CONTENT_TYPE, "text/event-stream")],
            GEMINI_STREAM.replace("MODEL", model),
        )
            .into_response(),
    )
}

const ANTHROPIC_MESSAGE: &str = include_str!("../tests/fixtures/anthropic/message.json");
const ANTHROPIC_STREAM: &str = include_str!("../tests/fixtures/anthropic/stream.sse");
const ANTHROPIC_TOOL_STREAM: &str = include_str!("../tests/fixtures/anthropic/tool_stream.sse");

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

/// Anthropic's Messages API: replays the recorded fixtures (`tests/fixtures/anthropic`).
async fn messages(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    s.stats.requests.fetch_add(1, Ordering::SeqCst);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body is not JSON",
        );
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let Ok(mut last) = s.stats.last_request.lock() {
        *last = json!({
            "body": req,
            "body_bytes": body.len(),
            "x-api-key": header("x-api-key"),
            "anthropic-version": header("anthropic-version"),
            "authorization": header("authorization"),
        });
    }
    if header("anthropic-version").is_none() {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    if !req["max_tokens"].is_u64() || !req["messages"].is_array() {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "max_tokens and messages are required",
        );
    }
    let model = req["model"].as_str().unwrap_or("claude").to_owned();
    if model == "fault-overloaded" {
        return anthropic_error(
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            "Overloaded",
        );
    }
    if req["stream"].as_bool() != Some(true) {
        let mut v: Value =
            serde_json::from_str(&ANTHROPIC_MESSAGE.replace("MODEL", &model)).unwrap_or_default();
        // A request with stop sequences stops at its first one.
        if let Some(stop) = req["stop_sequences"].get(0) {
            v["stop_reason"] = json!("stop_sequence");
            v["stop_sequence"] = stop.clone();
        }
        return axum::Json(v).into_response();
    }
    let crlf = model.contains("crlf");
    let fixture = if req["tools"].is_array() {
        ANTHROPIC_TOOL_STREAM
    } else {
        ANTHROPIC_STREAM
    };
    let events: Vec<Bytes> = fixture
        .replace("MODEL", &model)
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let e = format!("{e}\n\n");
            Bytes::from(if crlf { e.replace('\n', "\r\n") } else { e })
        })
        .collect();
    let gap = Knobs::new(&s.args, &json!({})).gap;
    let stream = futures_util::stream::unfold(events.into_iter(), move |mut it| async move {
        let next = it.next()?;
        pause(gap).await;
        Some((Ok::<_, io::Error>(next), it))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Sleeps, but not at all for zero: a zero-length tokio sleep still waits for the next timer tick
/// (about a millisecond), which would swamp every latency figure.
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

async fn stats_handler(State(s): State<AppState>) -> impl IntoResponse {
    let last = s
        .stats
        .last_request
        .lock()
        .map(|v| v.clone())
        .unwrap_or(Value::Null);
    axum::Json(json!({
        "requests": s.stats.requests.load(Ordering::SeqCst),
        "open_connections": s.stats.open_connections.load(Ordering::SeqCst),
        "streams_open": s.stats.streams_open.load(Ordering::SeqCst),
        "last_request": last,
    }))
}

fn error_response(status: StatusCode, message: &str, k: &Knobs) -> Response {
    let body = json!({"error": {"message": message, "type": "mock_error", "param": null, "code": status.as_u16().to_string()}});
    let mut r = (status, axum::Json(body)).into_response();
    if let Some(s) = k.retry_after_s {
        r.headers_mut().insert(header::RETRY_AFTER, s.into());
    }
    if let Some(ms) = k.retry_after_ms {
        r.headers_mut().insert("retry-after-ms", ms.into());
    }
    r
}

/// OpenAI's embeddings, with vectors anyone can check.
async fn embeddings(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    use base64::Engine;
    let Some(req) = seen(&s, "/v1/embeddings", &headers, &body) else {
        return not_json(&s);
    };
    let n = match &req["input"] {
        Value::Array(items) if items.iter().all(Value::is_u64) => 1,
        Value::Array(items) => items.len(),
        _ => 1,
    };
    let dims = req["dimensions"].as_u64().unwrap_or(4) as usize;
    let v: Vec<f32> = (0..dims).map(|i| i as f32 / 8.0).collect();
    let embedding = if req["encoding_format"] == "base64" {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        json!(v)
    };
    let data: Vec<Value> = (0..n)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": embedding}))
        .collect();
    axum::Json(json!({
        "object": "list", "data": data, "model": req["model"],
        "usage": {"prompt_tokens": 3 * n, "total_tokens": 3 * n},
    }))
    .into_response()
}

/// Counts an OpenAI-style request and keeps it for `/_mock/stats` (its path, body and
/// `authorization`); `None` for a body that is not JSON (answer it with [`not_json`]).
fn seen(s: &AppState, path: &str, headers: &HeaderMap, body: &[u8]) -> Option<Value> {
    s.stats.requests.fetch_add(1, Ordering::SeqCst);
    let req = serde_json::from_slice::<Value>(body).ok()?;
    if let Ok(mut last) = s.stats.last_request.lock() {
        *last = json!({
            "path": path,
            "body": req,
            "body_bytes": body.len(),
            "authorization": headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()),
        });
    }
    Some(req)
}

fn not_json(s: &AppState) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "mock: body is not JSON",
        &Knobs::new(&s.args, &json!({})),
    )
}

/// A body sent as `parts`, then held open and silent until the client gives up (`late_close`).
fn held_open(content_type: &'static str, parts: Vec<Bytes>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(parts.len().max(1));
    tokio::spawn(async move {
        for p in parts {
            if tx.send(Ok(p)).await.is_err() {
                return;
            }
        }
        tx.closed().await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

const RESPONSES_JSON: &str = include_str!("../tests/fixtures/responses/response.json");
const RESPONSES_STREAM: &str = include_str!("../tests/fixtures/responses/stream.sse");

/// OpenAI's Responses API: replays the recorded fixtures (`tests/fixtures/responses`).
async fn responses(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(req) = seen(&s, "/v1/responses", &headers, &body) else {
        return not_json(&s);
    };
    if req["input"].is_null() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "mock: input is required",
            &Knobs::new(&s.args, &json!({})),
        );
    }
    let model = req["model"].as_str().unwrap_or("mock").to_owned();
    if req["stream"].as_bool() != Some(true) {
        let text = RESPONSES_JSON.replace("MODEL", &model);
        return ([(header::CONTENT_TYPE, "application/json")], text).into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        RESPONSES_STREAM.replace("MODEL", &model),
    )
        .into_response()
}

async fn chat(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(req) = seen(&s, "/v1/chat/completions", &headers, &body) else {
        return not_json(&s);
    };
    let k = Knobs::new(&s.args, &req);
    if let Some(r) = gemini_fixture(&req) {
        return r;
    }
    pause(k.ttft).await;
    if let Some(status) = k.status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error_response(status, "mock: injected failure", &k);
    }
    let model = req["model"].as_str().unwrap_or("mock").to_owned();
    let usage = json!({
        "prompt_tokens": k.prompt_tokens,
        "completion_tokens": k.chunks,
        "total_tokens": k.prompt_tokens + k.chunks,
    });
    if k.fault.as_deref() == Some("error_body") {
        return axum::Json(json!({"error": {"message": "mock: upstream error in a 200", "type": "server_error", "param": null, "code": null}})).into_response();
    }
    // `tool_choice: "required"`: a call of the first tool, `{"city":"Paris"}`.
    let tool = (req["tool_choice"] == "required")
        .then(|| req["tools"][0]["function"]["name"].as_str())
        .flatten()
        .map(str::to_owned);
    if let Some(name) = tool {
        return tool_call(&model, &name, req["stream"].as_bool() == Some(true), usage);
    }
    if req["stream"].as_bool() != Some(true) {
        let content: String = (0..k.chunks).map(|i| format!("tok{i} ")).collect();
        let mut v = json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        });
        if k.usage {
            v["usage"] = usage.clone();
        }
        match k.fault.as_deref() {
            // The whole answer, its body's end held back.
            Some("late_close") => {
                let text = v.to_string();
                let (a, b) = text.split_at(text.len() / 2);
                return held_open(
                    "application/json",
                    vec![Bytes::from(a.to_owned()), Bytes::from(b.to_owned())],
                );
            }
            // A JSON answer that is not JSON.
            Some("malformed") => {
                return (
                    [(header::CONTENT_TYPE, "application/json")],
                    "{\"id\": \"chatcmpl-mock\", \"choices\": [",
                )
                    .into_response();
            }
            // Part of an answer, then the connection breaks or goes silent.
            Some(f @ ("reset" | "stall")) => {
                let reset = f == "reset";
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(2);
                tokio::spawn(async move {
                    let _ = tx
                        .send(Ok(Bytes::from_static(b"{\"id\": \"chatcmpl-mock\", ")))
                        .await;
                    pause(Duration::from_millis(50)).await;
                    if reset {
                        let _ = tx
                            .send(Err(io::Error::new(
                                io::ErrorKind::ConnectionReset,
                                "mock reset",
                            )))
                            .await;
                    } else {
                        tx.closed().await;
                    }
                });
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|item| (item, rx))
                });
                return Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from_stream(stream))
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
            }
            _ => {}
        }
        return axum::Json(v).into_response();
    }
    let include_usage = k.usage && req["stream_options"]["include_usage"].as_bool() == Some(true);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(4);
    let stats = s.stats.clone();
    stats.streams_open.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        let _open = StreamOpen(stats);
        let chunk = |delta: Value, finish: Value| {
            Bytes::from(format!(
                "data: {}\n\n",
                json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            ))
        };
        if tx
            .send(Ok(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )))
            .await
            .is_err()
        {
            return;
        }
        for i in 0..k.chunks {
            if i > 0 {
                pause(k.gap).await;
            }
            if i == k.fault_after {
                match k.fault.as_deref() {
                    Some(f @ ("reset" | "split")) => {
                        if f == "split" {
                            // Half an event first.
                            let _ = tx
                                .send(Ok(Bytes::from_static(
                                    b"data: {\"id\":\"chatcmpl-mock\",\"choi",
                                )))
                                .await;
                        }
                        // Let what was sent leave the socket first: an error drops whatever
                        // the server still had buffered.
                        pause(Duration::from_millis(100)).await;
                        let _ = tx
                            .send(Err(io::Error::new(
                                io::ErrorKind::ConnectionReset,
                                "mock reset",
                            )))
                            .await;
                        return;
                    }
                    Some("stall") => {
                        // Keep the connection open and silent until the client gives up.
                        tx.closed().await;
                        return;
                    }
                    Some("malformed") => {
                        let _ = tx
                            .send(Ok(Bytes::from_static(b"data: {not json\n\n")))
                            .await;
                    }
                    // A clean end, early: no finish reason, no usage, no [DONE].
                    Some("truncate") => return,
                    _ => {}
                }
            }
            if tx
                .send(Ok(chunk(
                    json!({"content": format!("tok{i} ")}),
                    Value::Null,
                )))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Ok(chunk(json!({}), json!("stop")))).await;
        if include_usage {
            let v = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage});
            let _ = tx.send(Ok(Bytes::from(format!("data: {v}\n\n")))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        if k.fault.as_deref() == Some("late_close") {
            tx.closed().await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A chat answer that calls tool `name` with `{"city":"Paris"}`, as JSON or as a stream whose
/// arguments arrive in two parts.
fn tool_call(model: &str, name: &str, stream: bool, usage: Value) -> Response {
    if !stream {
        return axum::Json(json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_mock", "type": "function", "function": {"name": name, "arguments": "{\"city\":\"Paris\"}"}}]},
                "finish_reason": "tool_calls"}],
            "usage": usage,
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        let v = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {v}\n\n")
    };
    let mut body = chunk(
        json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_mock", "type": "function", "function": {"name": name, "arguments": ""}}]}),
        Value::Null,
    );
    for part in ["{\"city\":", "\"Paris\"}"] {
        body.push_str(&chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}),
            Value::Null,
        ));
    }
    body.push_str(&chunk(json!({}), json!("tool_calls")));
    let u = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage});
    body.push_str(&format!("data: {u}\n\ndata: [DONE]\n\n"));
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

/// Counts a stream as open until its sending task ends, however it ends.
struct StreamOpen(Arc<Stats>);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.streams_open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> io::Result<TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    let bad =
        |e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(&e))?;
    pingora::tls::install_default_crypto_provider();
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| bad(&e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener whose connections count themselves open until dropped; with TLS when asked.
struct CountingListener {
    inner: TcpListener,
    tls: Option<TlsAcceptor>,
    stats: Arc<Stats>,
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<ServerTlsStream<TcpStream>>),
}

struct CountedStream {
    inner: Conn,
    stats: Arc<Stats>,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.stats.open_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

impl axum::serve::Listener for CountingListener {
    type Io = CountedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let inner = match &self.tls {
                        None => Conn::Plain(stream),
                        // A client that refuses our certificate ends here; wait for the next one.
                        Some(tls) => {
                            match tokio::time::timeout(Duration::from_secs(5), tls.accept(stream))
                                .await
                            {
                                Ok(Ok(s)) => Conn::Tls(Box::new(s)),
                                _ => continue,
                            }
                        }
                    };
                    self.stats.open_connections.fetch_add(1, Ordering::SeqCst);
                    return (
                        CountedStream {
                            inner,
                            stats: self.stats.clone(),
                        },
                        addr,
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
