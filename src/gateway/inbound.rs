//! `POST /v1/messages`: Anthropic's request and stream shapes for clients built for Claude, with
//! the same keys, tiers, limits and billing. The request becomes a chat-completions request on
//! the way in; the answer, its stream and its errors go back in Anthropic's shapes.

use super::error::ApiError;
use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};

/// Which API shape the client speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientFormat {
    #[default]
    OpenAi,
    Anthropic,
}

fn text_of(content: &Value) -> String {
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

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param),
    }
}

/// A Messages API request as a chat-completions body.
pub fn to_openai(body: &[u8]) -> Result<Bytes, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest {
        message: format!(
            "We could not parse the JSON body of your request ({e}). Send a JSON object."
        ),
        param: None,
    })?;
    let Some(req) = v.as_object() else {
        return Err(invalid("body", "The request body must be a JSON object."));
    };
    let mut messages = Vec::new();
    if let Some(system) = req.get("system") {
        messages.push(json!({"role": "system", "content": text_of(system)}));
    }
    let Some(list) = req.get("messages").and_then(Value::as_array) else {
        return Err(invalid(
            "messages",
            "`messages` is required: a list of {role, content}.",
        ));
    };
    for m in list {
        let role = m["role"].as_str().unwrap_or_default();
        if role != "user" && role != "assistant" {
            return Err(invalid(
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
                Some("tool_result") => messages.push(json!({"role": "tool", "tool_call_id": b["tool_use_id"], "content": text_of(&b["content"])})),
                other => return Err(invalid("messages", format!("content blocks of type {:?} are not supported", other.unwrap_or("?")))),
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
            return Err(invalid(
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

/// A chat completion as a Messages API answer.
pub fn message(v: &Value) -> Value {
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
        "id": format!("msg_{}", v["id"].as_str().unwrap_or("relay")),
        "type": "message",
        "role": "assistant",
        "model": v["model"],
        "content": content,
        "stop_reason": stop_reason(choice["finish_reason"].as_str().unwrap_or("stop")),
        "stop_sequence": null,
        "usage": {"input_tokens": v["usage"]["prompt_tokens"], "output_tokens": v["usage"]["completion_tokens"]},
    })
}

/// Anthropic's error shape.
pub fn error_body(e: &ApiError) -> Bytes {
    let kind = match e.status() {
        400 | 404 | 413 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    Bytes::from(
        json!({"type": "error", "error": {"type": kind, "message": e.message()}}).to_string(),
    )
}

fn event(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// Turns our OpenAI chunks into Anthropic's stream events.
#[derive(Default)]
pub struct EventsFromChunks {
    carry: BytesMut,
    started: bool,
    /// The open content block: its index, and whether it is text.
    open: Option<(usize, bool)>,
    blocks: usize,
    stop: Option<&'static str>,
    usage: (u64, u64),
    done: bool,
}

impl EventsFromChunks {
    pub fn feed(&mut self, bytes: &[u8]) -> Bytes {
        self.carry.extend_from_slice(bytes);
        let mut out = String::new();
        while let Some(at) = self.carry.windows(2).position(|w| w == b"\n\n") {
            let ev = self.carry.split_to(at + 2);
            let text = String::from_utf8_lossy(&ev).into_owned();
            let data: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim)
                .collect();
            if data == "[DONE]" {
                self.close(&mut out);
            } else if let Ok(v) = serde_json::from_str::<Value>(&data) {
                self.chunk(&v, &mut out);
            }
        }
        Bytes::from(out)
    }

    fn close_block(&mut self, out: &mut String) {
        if let Some((index, _)) = self.open.take() {
            out.push_str(&event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn chunk(&mut self, v: &Value, out: &mut String) {
        if let Some(e) = v.get("error") {
            out.push_str(&event(
                "error",
                json!({"type": "error", "error": {"type": e["type"], "message": e["message"]}}),
            ));
            return;
        }
        if !self.started {
            self.started = true;
            out.push_str(&event("message_start", json!({"type": "message_start", "message": {
                "id": format!("msg_{}", v["id"].as_str().unwrap_or("relay")), "type": "message", "role": "assistant",
                "model": v["model"], "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}})));
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
                out.push_str(&event("content_block_start", json!({"type": "content_block_start", "index": self.blocks, "content_block": {"type": "text", "text": ""}})));
                self.blocks += 1;
            }
            let index = self.open.map_or(0, |o| o.0);
            out.push_str(&event("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": t}})));
        }
        for c in d["tool_calls"].as_array().into_iter().flatten() {
            if let Some(id) = c["id"].as_str() {
                self.close_block(out);
                self.open = Some((self.blocks, false));
                out.push_str(&event("content_block_start", json!({"type": "content_block_start", "index": self.blocks, "content_block": {"type": "tool_use", "id": id, "name": c["function"]["name"], "input": {}}})));
                self.blocks += 1;
            }
            if let Some(a) = c["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                let index = self.open.map_or(0, |o| o.0);
                out.push_str(&event("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": a}})));
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.stop = Some(stop_reason(f));
        }
    }

    fn close(&mut self, out: &mut String) {
        if self.done {
            return;
        }
        self.done = true;
        self.close_block(out);
        out.push_str(&event(
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": self.stop.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": {"input_tokens": self.usage.0, "output_tokens": self.usage.1}}),
        ));
        out.push_str(&event("message_stop", json!({"type": "message_stop"})));
    }
}
