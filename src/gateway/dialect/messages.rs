//! Anthropic's Messages API, on both sides: clients built for Claude (`/v1/messages`) and the
//! `anthropic` provider kind. A client's request becomes a chat-completions request for
//! validation and for upstreams that speak OpenAI; an Anthropic upstream gets the client's own
//! body when the client speaks Messages too (only `model` replaced), or a translation of the
//! chat request otherwise (system prompt, messages, images, tools and tool results,
//! `max_tokens`, temperature and stop sequences). Answers and streams are translated back event
//! by event, billed from Anthropic's own counts, cache tokens included.

use super::sse::Event;
use super::{Fault, Piece, Tally};
use crate::gateway::error::ApiError;
use crate::gateway::tokens::Usage;
use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};

/// The API version every request names.
pub const VERSION: &str = "2023-06-01";

// ── The client side: Messages requests in, Messages answers out ────────────────────────────

/// The text of a content value: a string, or blocks (parts) with `text`, joined by line feeds.
fn block_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// A Messages API request as a chat-completions body.
pub fn request_to_chat(req: &Map<String, Value>) -> Result<Bytes, ApiError> {
    let mut messages = Vec::new();
    if let Some(system) = req.get("system") {
        messages.push(json!({"role": "system", "content": block_text(system)}));
    }
    let Some(list) = req.get("messages").and_then(Value::as_array) else {
        return Err(ApiError::invalid(
            "messages",
            "`messages` is required: a list of {role, content}.",
        ));
    };
    for m in list {
        let role = m["role"].as_str().unwrap_or_default();
        if role != "user" && role != "assistant" {
            return Err(ApiError::invalid(
                "messages",
                format!("a message's role must be user or assistant, not {role:?}"),
            ));
        }
        let Some(blocks) = m["content"].as_array() else {
            messages
                .push(json!({"role": role, "content": m["content"].as_str().unwrap_or_default()}));
            continue;
        };
        let mut parts = Vec::new();
        let mut calls = Vec::new();
        for b in blocks {
            match b["type"].as_str() {
                Some("text") => parts.push(json!({"type": "text", "text": b["text"]})),
                Some("image") => {
                    let s = &b["source"];
                    let url = match s["type"].as_str() {
                        Some("base64") => format!("data:{};base64,{}", s["media_type"].as_str().unwrap_or("image/png"), s["data"].as_str().unwrap_or_default()),
                        _ => s["url"].as_str().unwrap_or_default().to_owned(),
                    };
                    parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                }
                Some("tool_use") => calls.push(json!({"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": b["input"].to_string()}})),
                Some("tool_result") => messages.push(json!({"role": "tool", "tool_call_id": b["tool_use_id"], "content": block_text(&b["content"])})),
                other => return Err(ApiError::invalid("messages", format!("content blocks of type {:?} are not supported", other.unwrap_or("?")))),
            }
        }
        if !calls.is_empty() {
            let text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
            messages.push(json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }, "tool_calls": calls}));
        } else if !parts.is_empty() {
            messages.push(json!({"role": role, "content": parts}));
        }
    }
    let mut out = Map::new();
    out.insert(
        "model".into(),
        req.get("model").cloned().unwrap_or(Value::Null),
    );
    out.insert("messages".into(), Value::Array(messages));
    match req.get("max_tokens") {
        Some(v) => {
            out.insert("max_tokens".into(), v.clone());
        }
        None => {
            return Err(ApiError::invalid(
                "max_tokens",
                "`max_tokens` is required by the Messages API.",
            ));
        }
    }
    for k in ["temperature", "top_p", "stream"] {
        if let Some(v) = req.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    if let Some(s) = req.get("stop_sequences") {
        out.insert("stop".into(), s.clone());
    }
    if let Some(tools) = req.get("tools").and_then(Value::as_array) {
        let t: Vec<Value> = tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}))
            .collect();
        out.insert("tools".into(), Value::Array(t));
    }
    if let Some(c) = req.get("tool_choice") {
        let choice = match c["type"].as_str() {
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": c["name"]}}),
            _ => json!("auto"),
        };
        out.insert("tool_choice".into(), choice);
    }
    Ok(Bytes::from(
        serde_json::to_vec(&Value::Object(out)).unwrap_or_default(),
    ))
}

fn stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// A Messages id for a chat completion's: Anthropic's own when it came from one.
fn message_id(v: &Value) -> String {
    match v["id"].as_str() {
        Some(id) if id.starts_with("msg_") => id.to_owned(),
        Some(id) => format!("msg_{id}"),
        None => "msg_relay".to_owned(),
    }
}

/// Anthropic's error shape.
pub fn error_body(e: &ApiError) -> Bytes {
    Bytes::from(error_value(e).to_string())
}

fn error_value(e: &ApiError) -> Value {
    json!({"type": "error", "error": {"type": e.anthropic_kind(), "message": e.message()}})
}

/// The error that ends a stream, as Anthropic's `error` event.
pub fn error_event(e: &ApiError) -> Bytes {
    Bytes::from(event("error", error_value(e)))
}

/// A chat completion as a Messages API answer.
pub fn answer_from_chat(v: &Value) -> Value {
    let choice = &v["choices"][0];
    let m = &choice["message"];
    let mut content = Vec::new();
    if let Some(t) = m["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": t}));
    }
    for c in m["tool_calls"].as_array().into_iter().flatten() {
        let input: Value = c["function"]["arguments"]
            .as_str()
            .and_then(|a| serde_json::from_str(a).ok())
            .unwrap_or_else(|| json!({}));
        content.push(json!({"type": "tool_use", "id": c["id"], "name": c["function"]["name"], "input": input}));
    }
    json!({
        "id": message_id(v),
        "type": "message",
        "role": "assistant",
        "model": v["model"],
        "content": content,
        "stop_reason": stop_reason(choice["finish_reason"].as_str().unwrap_or("stop")),
        "stop_sequence": null,
        "usage": {"input_tokens": v["usage"]["prompt_tokens"], "output_tokens": v["usage"]["completion_tokens"]},
    })
}

fn event(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

fn push_event(out: &mut BytesMut, e: &str) {
    out.extend_from_slice(e.as_bytes());
}

/// Chat-completion chunks as Anthropic's stream events.
#[derive(Default)]
pub struct Encoder {
    started: bool,
    /// The open content block: its index, and whether it is text.
    open: Option<(usize, bool)>,
    blocks: usize,
    stop: Option<&'static str>,
    usage: (u64, u64),
    done: bool,
}

impl Encoder {
    fn close_block(&mut self, out: &mut BytesMut) {
        if let Some((index, _)) = self.open.take() {
            push_event(
                out,
                &event(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": index}),
                ),
            );
        }
    }

    pub fn chunk(&mut self, v: &Value, out: &mut BytesMut) {
        if let Some(e) = v.get("error") {
            push_event(
                out,
                &event(
                    "error",
                    json!({"type": "error", "error": {"type": e["type"], "message": e["message"]}}),
                ),
            );
            return;
        }
        if !self.started {
            self.started = true;
            push_event(
                out,
                &event(
                    "message_start",
                    json!({"type": "message_start", "message": {
                "id": message_id(v), "type": "message", "role": "assistant",
                "model": v["model"], "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}),
                ),
            );
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = (
                u["prompt_tokens"].as_u64().unwrap_or(0),
                u["completion_tokens"].as_u64().unwrap_or(0),
            );
        }
        let Some(choice) = v["choices"].get(0) else {
            return;
        };
        let d = &choice["delta"];
        if let Some(t) = d["content"].as_str().filter(|t| !t.is_empty()) {
            if !matches!(self.open, Some((_, true))) {
                self.close_block(out);
                self.open = Some((self.blocks, true));
                push_event(
                    out,
                    &event(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": self.blocks, "content_block": {"type": "text", "text": ""}}),
                    ),
                );
                self.blocks += 1;
            }
            let index = self.open.map_or(0, |o| o.0);
            push_event(
                out,
                &event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": t}}),
                ),
            );
        }
        for c in d["tool_calls"].as_array().into_iter().flatten() {
            if let Some(id) = c["id"].as_str() {
                self.close_block(out);
                self.open = Some((self.blocks, false));
                push_event(
                    out,
                    &event(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": self.blocks, "content_block": {"type": "tool_use", "id": id, "name": c["function"]["name"], "input": {}}}),
                    ),
                );
                self.blocks += 1;
            }
            if let Some(a) = c["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                let index = self.open.map_or(0, |o| o.0);
                push_event(
                    out,
                    &event(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": a}}),
                    ),
                );
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.stop = Some(stop_reason(f));
        }
    }

    pub fn close(&mut self, out: &mut BytesMut) {
        if self.done {
            return;
        }
        self.done = true;
        self.close_block(out);
        push_event(
            out,
            &event(
                "message_delta",
                json!({"type": "message_delta",
            "delta": {"stop_reason": self.stop.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": {"input_tokens": self.usage.0, "output_tokens": self.usage.1}}),
            ),
        );
        push_event(out, &event("message_stop", json!({"type": "message_stop"})));
    }
}

// ── The upstream side: the `anthropic` provider kind ────────────────────────────────────────

/// OpenAI content parts → Anthropic content blocks.
fn blocks(content: &Value) -> Result<Value, ApiError> {
    match content {
        Value::String(s) => Ok(Value::String(s.clone())),
        Value::Array(parts) => {
            let mut out = Vec::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => out.push(json!({"type": "text", "text": p["text"]})),
                    Some("image_url") => {
                        let url = p["image_url"]["url"].as_str().unwrap_or_default();
                        let source = match url
                            .strip_prefix("data:")
                            .and_then(|r| r.split_once(";base64,"))
                        {
                            Some((media, data)) => {
                                json!({"type": "base64", "media_type": media, "data": data})
                            }
                            None => json!({"type": "url", "url": url}),
                        };
                        out.push(json!({"type": "image", "source": source}));
                    }
                    other => {
                        return Err(ApiError::invalid(
                            "messages",
                            format!(
                                "content parts of type {:?} cannot be sent to this tier's Anthropic upstream (text and image_url can)",
                                other.unwrap_or("?")
                            ),
                        ));
                    }
                }
            }
            Ok(Value::Array(out))
        }
        Value::Null => Ok(Value::String(String::new())),
        _ => Err(ApiError::invalid(
            "messages",
            "a message's content must be a string or a list of parts",
        )),
    }
}

/// The Messages API body for an OpenAI chat-completions body, without `model` (each upstream
/// adds its own with [`with_model`]). Fields Anthropic cannot honour are refused here, naming
/// the field, so the caller translates once, before any credit is held.
pub fn request_from_chat(
    body: &Map<String, Value>,
    stream: bool,
    default_max: u64,
) -> Result<Value, ApiError> {
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(ApiError::invalid(
            "n",
            "n > 1 is not supported by this tier's Anthropic upstream: it returns one choice per request",
        ));
    }
    if body.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::invalid(
            "logprobs",
            "logprobs are not available from this tier's Anthropic upstream",
        ));
    }
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        match role {
            "system" | "developer" => system.push(block_text(&m["content"])),
            "user" => messages.push(json!({"role": "user", "content": blocks(&m["content"])?})),
            "assistant" => {
                let mut content = Vec::new();
                let text = block_text(&m["content"]);
                if !text.is_empty() {
                    content.push(json!({"type": "text", "text": text}));
                }
                for c in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let args = c["function"]["arguments"].as_str().unwrap_or("{}");
                    let input: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
                    content.push(json!({"type": "tool_use", "id": c["id"], "name": c["function"]["name"], "input": input}));
                }
                messages.push(json!({"role": "assistant", "content": content}));
            }
            "tool" => {
                let result = json!({"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": block_text(&m["content"])});
                // Tool results go back as a user turn; consecutive ones share it.
                match messages.last_mut() {
                    Some(last)
                        if last["role"] == "user"
                            && last["content"]
                                .as_array()
                                .is_some_and(|c| c.iter().all(|b| b["type"] == "tool_result")) =>
                    {
                        if let Some(a) = last["content"].as_array_mut() {
                            a.push(result);
                        }
                    }
                    _ => messages.push(json!({"role": "user", "content": [result]})),
                }
            }
            other => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("unknown message role {other:?}"),
                ));
            }
        }
    }
    let max_tokens = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(default_max);
    let mut out = Map::new();
    out.insert("max_tokens".into(), json!(max_tokens));
    out.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    for k in ["temperature", "top_p"] {
        if let Some(v) = body.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    match body.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let t: Vec<Value> = tools
            .iter()
            .map(|t| json!({"name": t["function"]["name"], "description": t["function"]["description"], "input_schema": t["function"].get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))}))
            .collect();
        out.insert("tools".into(), Value::Array(t));
    }
    if let Some(choice) = body.get("tool_choice") {
        let c = match choice {
            Value::String(s) if s == "none" => json!({"type": "none"}),
            Value::String(s) if s == "required" => json!({"type": "any"}),
            Value::Object(o) => {
                json!({"type": "tool", "name": o.get("function").and_then(|f| f.get("name"))})
            }
            _ => json!({"type": "auto"}),
        };
        out.insert("tool_choice".into(), c);
    }
    if stream {
        out.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(out))
}

/// A translated body for one upstream: its model added, serialized.
pub fn with_model(translated: &Value, model: &str) -> Bytes {
    let mut v = translated.clone();
    v["model"] = json!(model);
    Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
}

fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// All input tokens of Anthropic's usage: cache reads and writes are input tokens too.
fn input_tokens(u: &Value) -> u64 {
    u["input_tokens"].as_u64().unwrap_or(0)
        + u["cache_creation_input_tokens"].as_u64().unwrap_or(0)
        + u["cache_read_input_tokens"].as_u64().unwrap_or(0)
}

/// Anthropic's usage object, read (cache reads and writes are input tokens too).
pub fn usage_of(u: &Value) -> Option<Usage> {
    Some(Usage {
        output_tokens: u.get("output_tokens")?.as_u64()?,
        ..input_usage(u)
    })
}

/// The input side of Anthropic's usage object.
fn input_usage(u: &Value) -> Usage {
    Usage {
        input_tokens: input_tokens(u),
        output_tokens: 0,
        cached_input_tokens: u["cache_read_input_tokens"].as_u64().unwrap_or(0),
        cache_write_tokens: u["cache_creation_input_tokens"].as_u64().unwrap_or(0),
        reasoning_tokens: 0,
    }
}

/// Anthropic's usage as OpenAI's.
fn usage(u: &Value, output_tokens: u64) -> Value {
    let cached = u["cache_read_input_tokens"].as_u64().unwrap_or(0);
    let input = input_tokens(u);
    json!({
        "prompt_tokens": input,
        "completion_tokens": output_tokens,
        "total_tokens": input + output_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// Whether a 2xx answer is a message (not an error or something else).
pub fn is_message(v: &Value) -> bool {
    v["type"] == "message" && v["content"].is_array()
}

/// A Messages API answer as an OpenAI chat completion.
pub fn answer_to_chat(v: &Value) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in v["content"].as_array().into_iter().flatten() {
        match b["type"].as_str() {
            Some("text") => text.push_str(b["text"].as_str().unwrap_or_default()),
            Some("tool_use") => calls.push(json!({"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": b["input"].to_string()}})),
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({
        "id": v["id"],
        "object": "chat.completion",
        "created": crate::time::now_ms() / 1000,
        "model": v["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(v["stop_reason"].as_str().unwrap_or("end_turn"))}],
        "usage": usage(&v["usage"], v["usage"]["output_tokens"].as_u64().unwrap_or(0)),
    })
}

/// A Messages API event stream as chat-completion chunks, event by event.
#[derive(Default)]
pub struct Decoder {
    id: String,
    model: String,
    created: i64,
    input_usage: Value,
    output_tokens: u64,
    /// Anthropic content block index → OpenAI tool call index.
    tools: Vec<(u64, usize)>,
}

impl Decoder {
    fn chunk(&self, delta: Value, finish: Value) -> Piece {
        Piece::Chunk(
            json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
        )
    }

    /// One upstream event as chunks (or the end).
    pub fn decode(
        &mut self,
        ev: &Event,
        tally: &mut Tally,
        out: &mut Vec<Piece>,
    ) -> Result<(), Fault> {
        match ev.json() {
            None => Ok(()),
            Some(Err(())) => Err(Fault::Malformed),
            Some(Ok(v)) => self.event(&v, tally, out),
        }
    }

    fn event(&mut self, v: &Value, tally: &mut Tally, out: &mut Vec<Piece>) -> Result<(), Fault> {
        match v["type"].as_str().unwrap_or_default() {
            "message_start" => {
                let m = &v["message"];
                self.id = m["id"].as_str().unwrap_or("msg").to_owned();
                self.model = m["model"].as_str().unwrap_or_default().to_owned();
                self.created = crate::time::now_ms() / 1000;
                self.input_usage = m["usage"].clone();
                self.output_tokens = m["usage"]["output_tokens"].as_u64().unwrap_or(0);
                tally.input = Some(input_usage(&self.input_usage));
                out.push(self.chunk(json!({"role": "assistant", "content": ""}), Value::Null));
            }
            "content_block_start" => {
                let b = &v["content_block"];
                if b["type"] == "tool_use" {
                    let index = self.tools.len();
                    self.tools.push((v["index"].as_u64().unwrap_or(0), index));
                    out.push(self.chunk(
                        json!({"tool_calls": [{"index": index, "id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": ""}}]}),
                        Value::Null,
                    ));
                }
            }
            "content_block_delta" => {
                let d = &v["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => {
                        out.push(self.chunk(json!({"content": d["text"]}), Value::Null))
                    }
                    Some("input_json_delta") => {
                        let block = v["index"].as_u64().unwrap_or(0);
                        if let Some((_, index)) = self.tools.iter().find(|(b, _)| *b == block) {
                            out.push(self.chunk(
                                json!({"tool_calls": [{"index": index, "function": {"arguments": d["partial_json"]}}]}),
                                Value::Null,
                            ));
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(n) = v["usage"]["output_tokens"].as_u64() {
                    self.output_tokens = n;
                }
                if let Some(stop) = v["delta"]["stop_reason"].as_str() {
                    out.push(self.chunk(json!({}), json!(finish_reason(stop))));
                }
            }
            "message_stop" => {
                out.push(Piece::Chunk(json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                               "choices": [], "usage": usage(&self.input_usage, self.output_tokens)})));
                out.push(Piece::Done);
                tally.set_usage(Usage {
                    output_tokens: self.output_tokens,
                    ..input_usage(&self.input_usage)
                });
            }
            "error" => return Err(Fault::Upstream(super::chat::stream_error(&v["error"]))),
            _ => {} // ping, content_block_stop
        }
        Ok(())
    }
}

/// Messages to Messages: the event passes as it came; returns whether it ends the answer.
/// `message_start` gives the input tokens, `message_delta` the final usage.
pub fn pass(ev: &Event, tally: &mut Tally) -> Result<bool, Fault> {
    let Some(data) = ev.data() else {
        return Ok(false);
    };
    let name = ev.name().unwrap_or_default();
    match name {
        b"content_block_delta" | b"content_block_start" | b"content_block_stop" | b"ping" => {
            if serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_err() {
                return Err(Fault::Malformed);
            }
            if name == b"content_block_delta" {
                tally.content(&data, &crate::gateway::tokens::TEXT);
            }
            Ok(false)
        }
        _ => {
            let v: Value = serde_json::from_slice(&data).map_err(|_| Fault::Malformed)?;
            match v["type"].as_str().unwrap_or_default() {
                "message_start" => {
                    tally.input = Some(input_usage(&v["message"]["usage"]));
                    Ok(false)
                }
                "message_delta" => {
                    if let Some(out) = v["usage"]["output_tokens"].as_u64() {
                        // Newer streams repeat the input counts here; older ones gave them only
                        // in `message_start`.
                        let input = if v["usage"]["input_tokens"].is_u64() {
                            input_usage(&v["usage"])
                        } else {
                            tally.input.unwrap_or_default()
                        };
                        tally.set_usage(Usage {
                            output_tokens: out,
                            ..input
                        });
                    }
                    Ok(false)
                }
                "message_stop" => Ok(true),
                "error" => Err(Fault::Upstream(super::chat::stream_error(&v["error"]))),
                "content_block_delta" => {
                    tally.content(&data, &crate::gateway::tokens::TEXT);
                    Ok(false)
                }
                _ => Ok(false),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_translated() {
        let body: Map<String, Value> = serde_json::from_value(json!({
            "model": "premium",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"q\":1}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            ],
            "temperature": 0.2, "stop": "END",
            "tools": [{"type": "function", "function": {"name": "look", "description": "Look", "parameters": {"type": "object"}}}],
            "tool_choice": "required",
        })).expect("map");
        let out: Value = serde_json::from_slice(&with_model(
            &request_from_chat(&body, true, 4096).expect("ok"),
            "claude-x",
        ))
        .expect("json");
        assert_eq!(out["model"], "claude-x");
        assert_eq!(out["max_tokens"], 4096);
        assert_eq!(out["system"], "Be brief.");
        assert_eq!(out["stream"], true);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(
            out["messages"][0]["content"][1]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
        );
        assert_eq!(
            out["messages"][1]["content"][0],
            json!({"type": "tool_use", "id": "call_1", "name": "look", "input": {"q": 1}})
        );
        assert_eq!(
            out["messages"][2],
            json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"}]})
        );
        assert_eq!(out["tools"][0]["input_schema"], json!({"type": "object"}));
        assert_eq!(out["tool_choice"], json!({"type": "any"}));
        let mut two = body.clone();
        two.insert("n".into(), json!(2));
        assert!(matches!(
            request_from_chat(&two, false, 1),
            Err(ApiError::InvalidRequest {
                param: Some("n"),
                ..
            })
        ));
    }
}
