//! OpenAI's Responses API (`POST /v1/responses`). Upstreams that speak it (`responses_api =
//! true` on an `openai` provider) get the client's body with only `model` replaced, and their
//! events pass through; every other upstream gets the request as chat completions (text,
//! system and developer instructions, images, function tools and their calls and outputs,
//! `max_output_tokens`, structured output), and its answer comes back as a response object or
//! as the Responses API's stream events. What the relay cannot honour (stored responses,
//! `previous_response_id`, background mode, built-in tools) is refused with a 400 that names
//! the field, before anything is held.

use super::sse::Event;
use super::{Fault, Tally};
use crate::gateway::error::ApiError;
use crate::gateway::tokens::Usage;
use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};

/// Refuses what the relay cannot honour, naming the field. Checked for every upstream, so a
/// request is answered alike whichever upstream would serve it.
pub fn refuse_unsupported(req: &Map<String, Value>) -> Result<(), ApiError> {
    if req.get("store").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::invalid(
            "store",
            "This relay does not store responses: send `store: false` (or leave it out) and keep the conversation on your side.",
        ));
    }
    if req
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err(ApiError::invalid(
            "previous_response_id",
            "This relay does not store responses, so `previous_response_id` cannot be used: send the earlier turns in `input` instead.",
        ));
    }
    if req.get("conversation").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid(
            "conversation",
            "This relay does not store conversations: send the earlier turns in `input` instead.",
        ));
    }
    if req.get("background").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::invalid(
            "background",
            "Background mode is not available through this relay: send the request without `background` (stream it for long answers).",
        ));
    }
    if req.get("prompt").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid(
            "prompt",
            "Stored prompt templates are not available through this relay: send `instructions` and `input` instead.",
        ));
    }
    for t in req
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match t["type"].as_str() {
            Some("function") => {}
            other => {
                return Err(ApiError::invalid(
                    "tools",
                    format!(
                        "Built-in tools ({}) are not available through this relay; function tools are.",
                        other.unwrap_or("a tool without a type")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A content part of an input message as a chat content part.
fn part(p: &Value) -> Result<Value, ApiError> {
    match p["type"].as_str() {
        Some("input_text" | "output_text" | "text") => {
            Ok(json!({"type": "text", "text": p["text"]}))
        }
        Some("input_image") => match p["image_url"].as_str() {
            Some(url) => Ok(
                json!({"type": "image_url", "image_url": {"url": url, "detail": p.get("detail").cloned().unwrap_or(json!("auto"))}}),
            ),
            None => Err(ApiError::invalid(
                "input",
                "input_image parts need an `image_url` (a URL or a data: URL); uploaded files (`file_id`) are not available through this relay.",
            )),
        },
        Some("refusal") => Ok(json!({"type": "text", "text": p["refusal"]})),
        other => Err(ApiError::invalid(
            "input",
            format!(
                "input content parts of type {:?} are not supported (input_text and input_image are)",
                other.unwrap_or("?")
            ),
        )),
    }
}

fn content(c: &Value) -> Result<Value, ApiError> {
    match c {
        Value::String(s) => Ok(Value::String(s.clone())),
        Value::Array(parts) => {
            let parts = parts.iter().map(part).collect::<Result<Vec<_>, _>>()?;
            // A text-only message as a string: every chat upstream takes that.
            if parts.iter().all(|p| p["type"] == "text") {
                let text: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
                return Ok(Value::String(text.join("")));
            }
            Ok(Value::Array(parts))
        }
        _ => Err(ApiError::invalid(
            "input",
            "a message's `content` must be a string or a list of content parts",
        )),
    }
}

/// A Responses API request as a chat-completions body.
pub fn request_to_chat(req: &Map<String, Value>) -> Result<Bytes, ApiError> {
    refuse_unsupported(req)?;
    let mut messages: Vec<Value> = Vec::new();
    if let Some(i) = req.get("instructions").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": i}));
    }
    match req.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for item in items {
                let kind = item["type"].as_str().unwrap_or("message");
                match kind {
                    "message" => {
                        let role = item["role"].as_str().unwrap_or_default();
                        let role = match role {
                            "user" | "assistant" | "system" => role,
                            "developer" => "system",
                            other => {
                                return Err(ApiError::invalid(
                                    "input",
                                    format!(
                                        "a message's role must be user, assistant, system or developer, not {other:?}"
                                    ),
                                ));
                            }
                        };
                        messages.push(json!({"role": role, "content": content(&item["content"])?}));
                    }
                    "function_call" => {
                        let call = json!({"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"].as_str().unwrap_or("{}")}});
                        // Calls of one turn share its assistant message.
                        match messages.last_mut() {
                            Some(last)
                                if last["role"] == "assistant" && last["tool_calls"].is_array() =>
                            {
                                if let Some(calls) = last["tool_calls"].as_array_mut() {
                                    calls.push(call);
                                }
                            }
                            _ => messages.push(
                                json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                            ),
                        }
                    }
                    "function_call_output" => {
                        let output = match &item["output"] {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        messages.push(json!({"role": "tool", "tool_call_id": item["call_id"], "content": output}));
                    }
                    // Reasoning items carry an upstream's own state; a chat upstream has no use
                    // for them.
                    "reasoning" => {}
                    other => {
                        return Err(ApiError::invalid(
                            "input",
                            format!(
                                "input items of type {other:?} are not available through this relay (message, function_call and function_call_output are)"
                            ),
                        ));
                    }
                }
            }
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "input",
                "You must provide `input`: a string, or a list of input items.",
            ));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "input",
                "`input` must be a string or a list of input items.",
            ));
        }
    }
    let mut out = Map::new();
    out.insert(
        "model".into(),
        req.get("model").cloned().unwrap_or(Value::Null),
    );
    out.insert("messages".into(), Value::Array(messages));
    if let Some(m) = req.get("max_output_tokens").filter(|v| !v.is_null()) {
        out.insert("max_tokens".into(), m.clone());
    }
    for k in [
        "temperature",
        "top_p",
        "stream",
        "parallel_tool_calls",
        "user",
    ] {
        if let Some(v) = req.get(k).filter(|v| !v.is_null()) {
            out.insert(k.into(), v.clone());
        }
    }
    if let Some(effort) = req.get("reasoning").and_then(|r| r.get("effort")) {
        out.insert("reasoning_effort".into(), effort.clone());
    }
    if let Some(tools) = req.get("tools").and_then(Value::as_array) {
        let t: Vec<Value> = tools
            .iter()
            .map(|t| {
                let mut f = json!({"name": t["name"], "parameters": t.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))});
                if let Some(d) = t.get("description").filter(|d| !d.is_null()) {
                    f["description"] = d.clone();
                }
                if let Some(s) = t.get("strict").filter(|s| !s.is_null()) {
                    f["strict"] = s.clone();
                }
                json!({"type": "function", "function": f})
            })
            .collect();
        out.insert("tools".into(), Value::Array(t));
    }
    if let Some(choice) = req.get("tool_choice") {
        let c = match choice {
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
                json!({"type": "function", "function": {"name": o.get("name")}})
            }
            other => other.clone(),
        };
        out.insert("tool_choice".into(), c);
    }
    match req.get("text").and_then(|t| t.get("format")) {
        Some(f) if f["type"] == "json_schema" => {
            let mut schema = json!({"name": f["name"], "schema": f["schema"]});
            if let Some(s) = f.get("strict").filter(|s| !s.is_null()) {
                schema["strict"] = s.clone();
            }
            out.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": schema}),
            );
        }
        Some(f) if f["type"] == "json_object" => {
            out.insert("response_format".into(), json!({"type": "json_object"}));
        }
        _ => {}
    }
    Ok(Bytes::from(
        serde_json::to_vec(&Value::Object(out)).unwrap_or_default(),
    ))
}

/// The Responses API's usage object, read.
pub fn usage_of(u: &Value) -> Option<Usage> {
    Some(Usage {
        input_tokens: u.get("input_tokens")?.as_u64()?,
        output_tokens: u.get("output_tokens").and_then(Value::as_u64).unwrap_or(0),
        cached_input_tokens: u["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        cache_write_tokens: 0,
        reasoning_tokens: u["output_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap_or(0),
    })
}

/// A chat completion's usage as the Responses API's.
fn usage_from_chat(u: &Value) -> Value {
    if !u.is_object() {
        return Value::Null;
    }
    let input = u["prompt_tokens"].as_u64().unwrap_or(0);
    let output = u["completion_tokens"].as_u64().unwrap_or(0);
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0)},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"].as_u64().unwrap_or(0)},
        "total_tokens": input + output,
    })
}

/// An id of ours for an output item, from the completion's.
fn item_id(prefix: &str, base: &str, n: usize) -> String {
    let base = base.strip_prefix("chatcmpl-").unwrap_or(base);
    format!("{prefix}_{base}_{n}")
}

/// The response object around `output`.
fn response(
    id: &str,
    created: i64,
    model: &Value,
    status: &str,
    output: Vec<Value>,
    usage: Value,
) -> Value {
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    json!({
        "id": format!("resp_{}", id.strip_prefix("chatcmpl-").unwrap_or(id)),
        "object": "response",
        "created_at": created,
        "status": status,
        "error": null,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "store": false,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    })
}

fn text_item(id: String, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn call_item(id: String, call_id: &Value, name: &Value, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": arguments, "status": status})
}

/// A whole chat completion as a response object.
pub fn answer_from_chat(v: &Value) -> Value {
    let base = v["id"].as_str().unwrap_or("relay");
    let choice = &v["choices"][0];
    let m = &choice["message"];
    let mut output = Vec::new();
    if let Some(t) = m["content"].as_str().filter(|t| !t.is_empty()) {
        output.push(text_item(item_id("msg", base, 0), t, "completed"));
    }
    for c in m["tool_calls"].as_array().into_iter().flatten() {
        let n = output.len();
        output.push(call_item(
            item_id("fc", base, n),
            &c["id"],
            &c["function"]["name"],
            c["function"]["arguments"].as_str().unwrap_or("{}"),
            "completed",
        ));
    }
    let status = if choice["finish_reason"] == "length" {
        "incomplete"
    } else {
        "completed"
    };
    response(
        base,
        v["created"]
            .as_i64()
            .unwrap_or_else(|| crate::time::now_ms() / 1000),
        &v["model"],
        status,
        output,
        usage_from_chat(&v["usage"]),
    )
}

/// The error that ends a stream: the Responses API's `error` event, with the error object the
/// SDKs raise from.
pub fn error_event(e: &ApiError, sequence_number: u64) -> Bytes {
    let data = json!({
        "type": "error",
        "code": e.code(),
        "message": e.message(),
        "param": e.param(),
        "sequence_number": sequence_number,
        "error": {"message": e.message(), "type": e.kind(), "param": e.param(), "code": e.code()},
    });
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

/// Responses to Responses: the event passes as it came; returns whether it ends the answer.
pub fn pass(ev: &Event, tally: &mut Tally) -> Result<bool, Fault> {
    let Some(data) = ev.data() else {
        return Ok(false);
    };
    let name = ev.name().unwrap_or_default();
    if name == b"response.output_text.delta" || name == b"response.function_call_arguments.delta" {
        if serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_err() {
            return Err(Fault::Malformed);
        }
        tally.content(&data, &crate::gateway::tokens::DELTA);
        return Ok(false);
    }
    let v: Value = serde_json::from_slice(&data).map_err(|_| Fault::Malformed)?;
    match v["type"].as_str().unwrap_or_default() {
        "response.completed" | "response.incomplete" => {
            if let Some(u) = usage_of(&v["response"]["usage"]) {
                tally.set_usage(u);
            }
            Ok(true)
        }
        "response.failed" => {
            if let Some(u) = usage_of(&v["response"]["usage"]) {
                tally.set_usage(u);
            }
            let e = &v["response"]["error"];
            Err(Fault::Upstream(ApiError::Upstream {
                status: 502,
                message: e["message"]
                    .as_str()
                    .unwrap_or("The upstream response failed.")
                    .to_owned(),
                kind: "api_error".into(),
                param: None,
                code: e["code"].as_str().map(str::to_owned),
            }))
        }
        "error" => Err(Fault::Upstream(ApiError::Upstream {
            status: 502,
            message: v["message"]
                .as_str()
                .unwrap_or("The upstream provider reported an error mid-stream.")
                .to_owned(),
            kind: "api_error".into(),
            param: None,
            code: v["code"].as_str().map(str::to_owned),
        })),
        "response.output_text.delta" | "response.function_call_arguments.delta" => {
            tally.content(&data, &crate::gateway::tokens::DELTA);
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// One output item being streamed.
struct Item {
    id: String,
    /// The chat tool call's index, for function calls; `None` for the text.
    tool: Option<u64>,
    call_id: Value,
    name: Value,
    text: String,
}

/// Chat-completion chunks as the Responses API's stream events.
#[derive(Default)]
pub struct Encoder {
    seq: u64,
    started: bool,
    id: String,
    created: i64,
    model: Value,
    items: Vec<Item>,
    finish: Option<String>,
    usage: Value,
}

impl Encoder {
    fn emit(&mut self, out: &mut BytesMut, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.extend_from_slice(format!("event: {kind}\ndata: {data}\n\n").as_bytes());
    }

    fn response(&self, status: &str, output: Vec<Value>) -> Value {
        response(
            &self.id,
            self.created,
            &self.model,
            status,
            output,
            self.usage.clone(),
        )
    }

    fn item(&self, n: usize, status: &str) -> Value {
        let it = &self.items[n];
        match it.tool {
            None => text_item(it.id.clone(), &it.text, status),
            Some(_) => call_item(it.id.clone(), &it.call_id, &it.name, &it.text, status),
        }
    }

    pub fn chunk(&mut self, v: &Value, out: &mut BytesMut) {
        if !self.started {
            self.started = true;
            self.id = v["id"].as_str().unwrap_or("relay").to_owned();
            self.created = v["created"]
                .as_i64()
                .unwrap_or_else(|| crate::time::now_ms() / 1000);
            self.model = v["model"].clone();
            let r = self.response("in_progress", Vec::new());
            self.emit(out, "response.created", json!({"response": r}));
            self.emit(out, "response.in_progress", json!({"response": r}));
        }
        if v["usage"].is_object() {
            self.usage = usage_from_chat(&v["usage"]);
        }
        let Some(choice) = v["choices"].get(0) else {
            return;
        };
        let d = &choice["delta"];
        if let Some(t) = d["content"].as_str().filter(|t| !t.is_empty()) {
            let n = match self.items.iter().position(|i| i.tool.is_none()) {
                Some(n) => n,
                None => {
                    let n = self.items.len();
                    self.items.push(Item {
                        id: item_id("msg", &self.id, n),
                        tool: None,
                        call_id: Value::Null,
                        name: Value::Null,
                        text: String::new(),
                    });
                    let mut item = self.item(n, "in_progress");
                    item["content"] = json!([]);
                    self.emit(
                        out,
                        "response.output_item.added",
                        json!({"output_index": n, "item": item}),
                    );
                    let id = self.items[n].id.clone();
                    self.emit(out, "response.content_part.added", json!({"item_id": id, "output_index": n, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}));
                    n
                }
            };
            self.items[n].text.push_str(t);
            let id = self.items[n].id.clone();
            self.emit(out, "response.output_text.delta", json!({"item_id": id, "output_index": n, "content_index": 0, "delta": t, "logprobs": []}));
        }
        for c in d["tool_calls"].as_array().into_iter().flatten() {
            let index = c["index"].as_u64().unwrap_or(0);
            let n = match self.items.iter().position(|i| i.tool == Some(index)) {
                Some(n) => n,
                None => {
                    let n = self.items.len();
                    self.items.push(Item {
                        id: item_id("fc", &self.id, n),
                        tool: Some(index),
                        call_id: c["id"].clone(),
                        name: c["function"]["name"].clone(),
                        text: String::new(),
                    });
                    let item = self.item(n, "in_progress");
                    self.emit(
                        out,
                        "response.output_item.added",
                        json!({"output_index": n, "item": item}),
                    );
                    n
                }
            };
            if let Some(a) = c["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                self.items[n].text.push_str(a);
                let id = self.items[n].id.clone();
                self.emit(
                    out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": n, "delta": a}),
                );
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_owned());
        }
    }

    pub fn close(&mut self, out: &mut BytesMut) {
        if !self.started {
            self.chunk(&json!({}), out);
        }
        let mut output = Vec::new();
        for n in 0..self.items.len() {
            let id = self.items[n].id.clone();
            let text = self.items[n].text.clone();
            match self.items[n].tool {
                None => {
                    self.emit(out, "response.output_text.done", json!({"item_id": id, "output_index": n, "content_index": 0, "text": text, "logprobs": []}));
                    self.emit(out, "response.content_part.done", json!({"item_id": id, "output_index": n, "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}}));
                }
                Some(_) => {
                    self.emit(
                        out,
                        "response.function_call_arguments.done",
                        json!({"item_id": id, "output_index": n, "arguments": text}),
                    );
                }
            }
            let item = self.item(n, "completed");
            self.emit(
                out,
                "response.output_item.done",
                json!({"output_index": n, "item": item}),
            );
            output.push(item);
        }
        let (status, kind) = if self.finish.as_deref() == Some("length") {
            ("incomplete", "response.incomplete")
        } else {
            ("completed", "response.completed")
        };
        let r = self.response(status, output);
        self.emit(out, kind, json!({"response": r}));
    }

    pub fn error_event(&mut self, e: &ApiError) -> Bytes {
        let ev = error_event(e, self.seq);
        self.seq += 1;
        ev
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Dialect, Stream};
    use super::*;

    #[test]
    fn requests_become_chat_completions() {
        let req: Map<String, Value> = serde_json::from_value(json!({
            "model": "budget",
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            ],
            "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
            "max_output_tokens": 50,
        }))
        .expect("map");
        let chat: Value =
            serde_json::from_slice(&request_to_chat(&req).expect("ok")).expect("json");
        assert_eq!(
            chat["messages"][0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(
            chat["messages"][1],
            json!({"role": "system", "content": "Use tools."})
        );
        assert_eq!(
            chat["messages"][2],
            json!({"role": "user", "content": "Weather in Paris?"})
        );
        assert_eq!(
            chat["messages"][3]["tool_calls"][0]["function"]["name"],
            "weather"
        );
        assert_eq!(
            chat["messages"][4],
            json!({"role": "tool", "tool_call_id": "call_1", "content": "sunny"})
        );
        assert_eq!(chat["tools"][0]["function"]["name"], "weather");
        assert_eq!(chat["max_tokens"], 50);
        for (field, body) in [
            ("store", json!({"store": true})),
            (
                "previous_response_id",
                json!({"previous_response_id": "resp_1"}),
            ),
            ("background", json!({"background": true})),
            ("tools", json!({"tools": [{"type": "web_search"}]})),
        ] {
            let mut r = req.clone();
            r.extend(body.as_object().expect("object").clone());
            match request_to_chat(&r) {
                Err(ApiError::InvalidRequest { param, .. }) => assert_eq!(param, Some(field)),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_chat_stream_becomes_response_events() {
        let chunks = concat!(
            "data: {\"id\":\"chatcmpl-1\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_9\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"created\":5,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":6}}\n\n",
            "data: [DONE]\n\n",
        );
        for cut in 0..=chunks.len() {
            let mut s = Stream::new(Dialect::Responses, Dialect::Chat, false, Some(b"budget"));
            let mut out = BytesMut::new();
            s.feed(&chunks.as_bytes()[..cut], &mut out).expect("ok");
            s.feed(&chunks.as_bytes()[cut..], &mut out).expect("ok");
            s.finish(&mut out).expect("whole");
            let text = String::from_utf8(out.to_vec()).expect("utf8");
            let events: Vec<Value> = text
                .split("\n\n")
                .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
                .map(|d| serde_json::from_str(d).expect("json"))
                .collect();
            let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
            assert_eq!(kinds.first(), Some(&"response.created"));
            assert_eq!(kinds.last(), Some(&"response.completed"));
            let seq: Vec<u64> = events
                .iter()
                .filter_map(|e| e["sequence_number"].as_u64())
                .collect();
            assert_eq!(seq, (0..events.len() as u64).collect::<Vec<_>>());
            let text: String = events
                .iter()
                .filter(|e| e["type"] == "response.output_text.delta")
                .filter_map(|e| e["delta"].as_str())
                .collect();
            assert_eq!(text, "Hello");
            let done = &events[events.len() - 1]["response"];
            assert_eq!(done["model"], "budget");
            assert_eq!(done["usage"]["input_tokens"], 4);
            assert_eq!(done["usage"]["output_tokens"], 6);
            assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
            assert_eq!(done["output"][1]["type"], "function_call");
            assert_eq!(done["output"][1]["call_id"], "call_9");
            assert_eq!(done["output"][1]["arguments"], "{\"a\":1}");
            assert_eq!(s.tally.usage.map(|u| u.output_tokens), Some(6));
        }
    }
}
