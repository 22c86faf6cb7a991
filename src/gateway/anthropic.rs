//! The `anthropic` provider kind: Anthropic's native Messages API behind the OpenAI shape our
//! clients speak. Requests are translated (system prompt, messages, images, tools and tool
//! results, `max_tokens`, temperature and stop sequences), answers and streams translated back
//! (content blocks, tool calls, stop reasons, and `usage` from Anthropic's own counts, cache
//! tokens included), event by event.

use super::error::ApiError;
use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};

/// The API version every request names.
pub const VERSION: &str = "2023-06-01";

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param),
    }
}

/// The text of an OpenAI content value (a string, or parts with `text`).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

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
                        return Err(invalid(
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
        _ => Err(invalid(
            "messages",
            "a message's content must be a string or a list of parts",
        )),
    }
}

/// The Messages API body for an OpenAI chat-completions body, without `model` (each upstream
/// adds its own with [`with_model`]). Fields Anthropic cannot honour are refused here, naming
/// the field, so the caller translates once, before any credit is held.
pub fn translate(
    body: &Map<String, Value>,
    stream: bool,
    default_max: u64,
) -> Result<Value, ApiError> {
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(invalid(
            "n",
            "n > 1 is not supported by this tier's Anthropic upstream: it returns one choice per request",
        ));
    }
    if body.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(invalid(
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
            "system" | "developer" => system.push(text_of(&m["content"])),
            "user" => messages.push(json!({"role": "user", "content": blocks(&m["content"])?})),
            "assistant" => {
                let mut content = Vec::new();
                let text = text_of(&m["content"]);
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
                let result = json!({"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": text_of(&m["content"])});
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
                return Err(invalid(
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

/// Anthropic's usage as OpenAI's (cache reads and writes are input tokens too).
fn usage(u: &Value, output_tokens: u64) -> Value {
    let cached = u["cache_read_input_tokens"].as_u64().unwrap_or(0);
    let input = u["input_tokens"].as_u64().unwrap_or(0)
        + u["cache_creation_input_tokens"].as_u64().unwrap_or(0)
        + cached;
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
pub fn response(v: &Value) -> Value {
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

/// Turns a Messages API event stream into OpenAI chunks, event by event.
#[derive(Default)]
pub struct StreamTranslator {
    carry: BytesMut,
    id: String,
    model: String,
    created: i64,
    input_usage: Value,
    output_tokens: u64,
    /// Anthropic content block index → OpenAI tool call index.
    tools: Vec<(u64, usize)>,
}

impl StreamTranslator {
    fn chunk(&self, delta: Value, finish: Value) -> String {
        let c = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {c}\n\n")
    }

    /// Takes bytes from the upstream; returns OpenAI SSE bytes for the whole events among them.
    pub fn feed(&mut self, bytes: &[u8]) -> Bytes {
        self.carry.extend_from_slice(bytes);
        let mut out = String::new();
        while let Some(at) = self.carry.windows(2).position(|w| w == b"\n\n") {
            let event = self.carry.split_to(at + 2);
            let text = String::from_utf8_lossy(&event).replace('\r', "");
            let data: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim)
                .collect();
            if let Ok(v) = serde_json::from_str::<Value>(&data) {
                self.event(&v, &mut out);
            }
        }
        Bytes::from(out)
    }

    fn event(&mut self, v: &Value, out: &mut String) {
        match v["type"].as_str().unwrap_or_default() {
            "message_start" => {
                let m = &v["message"];
                self.id = m["id"].as_str().unwrap_or("msg").to_owned();
                self.model = m["model"].as_str().unwrap_or_default().to_owned();
                self.created = crate::time::now_ms() / 1000;
                self.input_usage = m["usage"].clone();
                self.output_tokens = m["usage"]["output_tokens"].as_u64().unwrap_or(0);
                out.push_str(&self.chunk(json!({"role": "assistant", "content": ""}), Value::Null));
            }
            "content_block_start" => {
                let b = &v["content_block"];
                if b["type"] == "tool_use" {
                    let index = self.tools.len();
                    self.tools.push((v["index"].as_u64().unwrap_or(0), index));
                    out.push_str(&self.chunk(
                        json!({"tool_calls": [{"index": index, "id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": ""}}]}),
                        Value::Null,
                    ));
                }
            }
            "content_block_delta" => {
                let d = &v["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => {
                        out.push_str(&self.chunk(json!({"content": d["text"]}), Value::Null))
                    }
                    Some("input_json_delta") => {
                        let block = v["index"].as_u64().unwrap_or(0);
                        if let Some((_, index)) = self.tools.iter().find(|(b, _)| *b == block) {
                            out.push_str(&self.chunk(
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
                    out.push_str(&self.chunk(json!({}), json!(finish_reason(stop))));
                }
            }
            "message_stop" => {
                let u = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                               "choices": [], "usage": usage(&self.input_usage, self.output_tokens)});
                out.push_str(&format!("data: {u}\n\ndata: [DONE]\n\n"));
            }
            "error" => {
                let e = &v["error"];
                let body = json!({"error": {"message": e["message"], "type": e["type"], "param": null, "code": "upstream_error"}});
                out.push_str(&format!("data: {body}\n\n"));
            }
            _ => {} // ping, content_block_stop
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
            &translate(&body, true, 4096).expect("ok"),
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
            translate(&two, false, 1),
            Err(ApiError::InvalidRequest {
                param: Some("n"),
                ..
            })
        ));
    }
}
