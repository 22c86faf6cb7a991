//! Step 3: read and validate the body, map the tier, and prepare what goes upstream.
//!
//! The body is read here, whole, up to the conf's limit (Pingora's proxy loop would forward only
//! 64 KiB of a body read in `request_filter`; we send it ourselves, see `upstream`). It is parsed
//! once; the upstream copy differs only in `model` and, for streams, `stream_options`.

use super::dialect::{Dialect, messages, responses};
use super::error::ApiError;
use crate::conf::{Conf, Tier, TierKind};
use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use serde_json::{Map, Value};

/// Larger `max_tokens` values are refused as absurd.
pub const MAX_OUTPUT_TOKENS: u64 = 1_000_000;
/// Larger `n` values are refused.
pub const MAX_CHOICES: u64 = 16;

/// A validated model request, in chat-completions form whatever its dialect.
pub struct ChatRequest {
    pub tier: usize,
    /// The dialect the client speaks.
    pub client: Dialect,
    /// The client's own body when it is not chat completions: what an upstream of the same
    /// dialect gets, with only `model` replaced (let go with `body`, see [`ChatRequest::sent`]).
    pub native: Option<Box<Map<String, Value>>>,
    /// The parsed body, while upstream bodies are still to be made ([`ChatRequest::sent`] lets
    /// it go: a stream can stay open for minutes, and a long chat parsed is several times its
    /// size in bytes).
    pub body: Map<String, Value>,
    /// The body as it came (shared, not copied), for counting the prompt when no usage comes.
    pub raw: Bytes,
    pub stream: bool,
    /// The client asked for the usage chunk itself (otherwise we drop it).
    pub client_wants_usage: bool,
    /// Worst-case output tokens (max_tokens × n, or the tier's default cap × n).
    pub max_output_tokens: u64,
    /// Upper bound of input tokens: a byte-level BPE token covers at least one byte, and each
    /// image part adds the most its tier's upstreams count for one image (its URL is a few bytes
    /// of the body, the image many tokens).
    pub input_upper_bound: u64,
}

/// Image parts in the messages (`image_url`, `input_image`, `image`): what the body's length
/// does not bound.
fn image_parts(messages: &[Value]) -> u64 {
    messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_array))
        .flatten()
        .filter(|p| {
            matches!(
                p.get("type").and_then(Value::as_str),
                Some("image_url" | "input_image" | "image")
            )
        })
        .count() as u64
}

/// A too-large body is still read (and dropped) up to this much, so the client gets to read our
/// 413 instead of a broken pipe; past it the connection is simply closed.
const DRAIN_MAX: u64 = 64 * 1024 * 1024;

/// Reads the request body; a body larger than `limit` is refused with 413 (and drained, so the
/// client can read the answer). A declared `Content-Length` above the limit never gets here:
/// the service refuses it from the head (`service::refused_by_head`); this catches a chunked
/// body that grows past it.
pub async fn read_body(
    session: &mut Session,
    limit: u64,
    timeout: std::time::Duration,
) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(timeout, read_bounded(session, limit)).await {
        Ok(read) => read,
        Err(_) => {
            // What is left of the body will not be read: the connection cannot be reused.
            session.set_keepalive(None);
            Err(ApiError::RequestTimeout {
                part: "body",
                limit_ms: timeout.as_millis() as u64,
            })
        }
    }
}

async fn read_bounded(session: &mut Session, limit: u64) -> Result<Bytes, ApiError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut too_large = false;
    let capacity = declared.unwrap_or(4096).min(limit) as usize;
    let mut buf = BytesMut::with_capacity(capacity);
    let mut seen: u64 = 0;
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                seen += chunk.len() as u64;
                too_large |= seen > limit;
                if !too_large {
                    buf.extend_from_slice(&chunk);
                } else if seen > DRAIN_MAX {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) if too_large => {
                tracing::debug!(error = %e, "the client stopped sending a too-large body");
                break;
            }
            Err(e) => {
                return Err(ApiError::InvalidRequest {
                    message: format!("Could not read the request body: {e}"),
                    param: None,
                });
            }
        }
    }
    if too_large {
        return Err(ApiError::BodyTooLarge { limit_bytes: limit });
    }
    Ok(buf.freeze())
}

fn positive_int(v: &Value, param: &'static str, max: u64) -> Result<Option<u64>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_u64() {
            Some(0) | None => Err(ApiError::invalid(
                param,
                format!("`{param}` must be a positive integer; got {n}."),
            )),
            Some(x) if x > max => Err(ApiError::invalid(
                param,
                format!("`{param}` is {x}; the largest allowed is {max}."),
            )),
            Some(x) => Ok(Some(x)),
        },
        other => Err(ApiError::invalid(
            param,
            format!("`{param}` must be an integer; got {}.", type_name(other)),
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A request body as a JSON object.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest {
        message: format!(
            "We could not parse the JSON body of your request ({e}). Send a JSON object."
        ),
        param: None,
    })?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::InvalidRequest {
            message: "The request body must be a JSON object.".into(),
            param: None,
        }),
    }
}

/// Parses and checks a request body of `client`'s dialect against the conf's tiers: the body
/// as chat completions, and the client's own body for upstreams that speak its dialect.
pub fn parse_request(conf: &Conf, client: Dialect, raw: Bytes) -> Result<ChatRequest, ApiError> {
    match client {
        Dialect::Chat => parse_chat(conf, &raw, raw.len()),
        Dialect::Embeddings => parse_embeddings(conf, raw),
        Dialect::Messages | Dialect::Responses => {
            let native = json_object(&raw)?;
            let chat = match client {
                Dialect::Messages => messages::request_to_chat(&native)?,
                _ => responses::request_to_chat(&native)?,
            };
            let mut req = parse_chat(conf, &chat, raw.len())?;
            req.client = client;
            req.native = Some(Box::new(native));
            Ok(req)
        }
    }
}

/// The tier named by a body's `model`, which must serve `kind`.
fn tier_of(conf: &Conf, map: &Map<String, Value>, kind: TierKind) -> Result<usize, ApiError> {
    let model = match map.get("model") {
        Some(Value::String(m)) => m.clone(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "model",
                "You must provide a `model` (budget, standard or premium).",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "model",
                format!("`model` must be a string; got {}.", type_name(other)),
            ));
        }
    };
    let tier = conf
        .tiers
        .iter()
        .position(|t| t.name == model)
        .ok_or_else(|| ApiError::ModelNotFound {
            model: model.clone(),
            known: conf
                .tiers
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    if conf.tiers[tier].kind != kind {
        let (what, route) = match conf.tiers[tier].kind {
            TierKind::Embeddings => ("an embeddings model", "/v1/embeddings"),
            TierKind::Chat => (
                "a chat model",
                "/v1/chat/completions, /v1/responses or /v1/messages",
            ),
        };
        let fitting: Vec<&str> = conf
            .tiers
            .iter()
            .filter(|t| t.kind == kind)
            .map(|t| t.name.as_str())
            .collect();
        return Err(ApiError::invalid(
            "model",
            format!(
                "`{}` is {what}: send it to {route}. Models for this endpoint: {}.",
                conf.tiers[tier].name,
                if fitting.is_empty() {
                    "none".to_owned()
                } else {
                    fitting.join(", ")
                }
            ),
        ));
    }
    Ok(tier)
}

/// Parses and checks an embeddings body: `input` a string, strings, or token arrays, none
/// empty; `encoding_format` and `dimensions` passed on as they are. The hold is the input bound
/// alone (the body's length: each token of a token array takes at least one byte of it too).
fn parse_embeddings(conf: &Conf, raw: Bytes) -> Result<ChatRequest, ApiError> {
    let map = json_object(&raw)?;
    let tier = tier_of(conf, &map, TierKind::Embeddings)?;
    let fine = match map.get("input") {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(items)) if !items.is_empty() => {
            items
                .iter()
                .all(|i| i.as_str().is_some_and(|s| !s.is_empty()))
                || items.iter().all(Value::is_u64)
                || items.iter().all(|i| {
                    i.as_array()
                        .is_some_and(|t| !t.is_empty() && t.iter().all(Value::is_u64))
                })
        }
        _ => false,
    };
    if !fine {
        return Err(ApiError::invalid(
            "input",
            "`input` must be a non-empty string, a list of non-empty strings, a list of token ids, or a list of such lists.",
        ));
    }
    match map.get("encoding_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f == "float" || f == "base64" => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "encoding_format",
                "`encoding_format` must be \"float\" or \"base64\".",
            ));
        }
    }
    positive_int(
        map.get("dimensions").unwrap_or(&Value::Null),
        "dimensions",
        1_000_000,
    )?;
    Ok(ChatRequest {
        tier,
        client: Dialect::Embeddings,
        input_upper_bound: raw.len() as u64,
        native: Some(Box::new(map)),
        body: Map::new(),
        raw,
        stream: false,
        client_wants_usage: false,
        max_output_tokens: 0,
    })
}

/// Parses and checks a chat-completions body against the conf's tiers. `client_len` is the
/// length of the body as the client sent it (in another dialect, it may be longer).
fn parse_chat(conf: &Conf, body: &Bytes, client_len: usize) -> Result<ChatRequest, ApiError> {
    let map = json_object(body)?;
    let tier = tier_of(conf, &map, TierKind::Chat)?;
    let images = match map.get("messages") {
        Some(Value::Array(msgs)) if !msgs.is_empty() => {
            for (i, m) in msgs.iter().enumerate() {
                if !m.get("role").is_some_and(Value::is_string) {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("`messages[{i}]` must be an object with a string `role`."),
                    ));
                }
            }
            image_parts(msgs)
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must not be empty.",
            ));
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "messages",
                "You must provide `messages`, a list of chat messages.",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "messages",
                format!("`messages` must be an array; got {}.", type_name(other)),
            ));
        }
    };
    let stream = match map.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::invalid(
                "stream",
                format!("`stream` must be a boolean; got {}.", type_name(other)),
            ));
        }
    };
    let client_wants_usage = map
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_tokens = positive_int(
        map.get("max_tokens").unwrap_or(&Value::Null),
        "max_tokens",
        MAX_OUTPUT_TOKENS,
    )?;
    let max_completion = positive_int(
        map.get("max_completion_tokens").unwrap_or(&Value::Null),
        "max_completion_tokens",
        MAX_OUTPUT_TOKENS,
    )?;
    let n = positive_int(map.get("n").unwrap_or(&Value::Null), "n", MAX_CHOICES)?.unwrap_or(1);
    let t: &Tier = &conf.tiers[tier];
    let per_choice = max_completion
        .or(max_tokens)
        .unwrap_or(u64::from(t.default_max_output_tokens.get()));
    Ok(ChatRequest {
        tier,
        client: Dialect::Chat,
        native: None,
        body: map,
        raw: body.clone(),
        stream,
        client_wants_usage,
        max_output_tokens: per_choice * n,
        input_upper_bound: (body.len().max(client_len) as u64)
            .saturating_add(images.saturating_mul(t.image_input_tokens_max)),
    })
}

impl ChatRequest {
    /// The body sent to an upstream that speaks `speaks`: the client's own body when it
    /// speaks the client's dialect, else the chat body; `model` rewritten, and for chat streams
    /// usage always requested. Written straight from the parsed body (no copy of it, however
    /// large its messages).
    pub fn upstream_body(&self, speaks: Dialect, upstream_model: &str) -> Bytes {
        if speaks == self.client
            && let Some(native) = &self.native
        {
            return write_body(native, upstream_model, None, self.input_upper_bound);
        }
        let stream_options = if self.stream {
            match self.body.get("stream_options") {
                None => Some(Map::new()),
                Some(Value::Object(o)) => Some(o.clone()),
                // Not an object: passed on as it is (the upstream says what it thinks of it).
                Some(_) => None,
            }
            .map(|mut o| {
                o.insert("include_usage".into(), Value::Bool(true));
                Value::Object(o)
            })
        } else {
            None
        };
        write_body(
            &self.body,
            upstream_model,
            stream_options.as_ref(),
            self.input_upper_bound,
        )
    }

    /// Lets the parsed bodies go once the request has been sent.
    pub fn sent(&mut self) {
        self.body = Map::new();
        self.native = None;
    }

    /// Input tokens when an upstream reports no usage: the prompt's text counted with tiktoken,
    /// or the token ids an embeddings request sent.
    pub fn counted_input_tokens(&self) -> u64 {
        if self.client == Dialect::Embeddings {
            let body: Value = serde_json::from_slice(&self.raw).unwrap_or_default();
            return match &body["input"] {
                Value::String(s) => super::tokens::count_tokens(s),
                Value::Array(items) => items
                    .iter()
                    .map(|i| match i {
                        Value::String(s) => super::tokens::count_tokens(s),
                        Value::Array(ids) => ids.len() as u64,
                        _ => 1,
                    })
                    .sum(),
                _ => 0,
            };
        }
        super::tokens::count_tokens(&self.prompt_text())
    }

    /// The prompt's text, for counting input tokens when an upstream reports no usage (rare, so
    /// the body is parsed again rather than kept parsed).
    pub fn prompt_text(&self) -> String {
        let mut out = String::new();
        let body: Value = serde_json::from_slice(&self.raw).unwrap_or_default();
        if let Some(Value::Array(msgs)) = body.get("messages") {
            for m in msgs {
                match m.get("content") {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            if let Some(t) = p.get("text").and_then(Value::as_str) {
                                out.push_str(t);
                            }
                        }
                    }
                    _ => {}
                }
                out.push('\n');
            }
        }
        out
    }
}

fn write_body(
    body: &Map<String, Value>,
    model: &str,
    stream_options: Option<&Value>,
    size: u64,
) -> Bytes {
    let body = UpstreamBody {
        body,
        model,
        stream_options,
    };
    let mut out = Vec::with_capacity(size.min(64 * 1024 * 1024) as usize + 64);
    let _ = serde_json::to_writer(&mut out, &body);
    Bytes::from(out)
}

/// The client's body with `model` (and, for streams, `stream_options`) replaced.
struct UpstreamBody<'a> {
    body: &'a Map<String, Value>,
    model: &'a str,
    stream_options: Option<&'a Value>,
}

impl serde::Serialize for UpstreamBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.body {
            match (k.as_str(), self.stream_options) {
                ("model", _) => m.serialize_entry(k, self.model)?,
                ("stream_options", Some(o)) => m.serialize_entry(k, o)?,
                _ => m.serialize_entry(k, v)?,
            }
        }
        // `model` is always there (parse_chat requires it); `stream_options` may be new.
        if let Some(o) = self.stream_options
            && !self.body.contains_key("stream_options")
        {
            m.serialize_entry("stream_options", o)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn upstream(body: &Value, stream: bool, model: &str) -> Value {
        let req = ChatRequest {
            tier: 0,
            client: Dialect::Chat,
            native: None,
            body: body.as_object().expect("an object").clone(),
            raw: Bytes::new(),
            stream,
            client_wants_usage: false,
            max_output_tokens: 1,
            input_upper_bound: 64,
        };
        serde_json::from_slice(&req.upstream_body(Dialect::Chat, model)).expect("JSON")
    }

    #[test]
    fn the_upstream_body_has_the_upstream_model_and_asks_streams_for_usage() {
        let body = json!({
            "model": "budget",
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.5,
            "tools": [{"type": "function", "function": {"name": "f"}}],
        });
        let mut want = body.clone();
        want["model"] = json!("mock-small");
        assert_eq!(upstream(&body, false, "mock-small"), want);
        want["stream_options"] = json!({"include_usage": true});
        assert_eq!(upstream(&body, true, "mock-small"), want);

        let mut own = body.clone();
        own["stream_options"] = json!({"include_usage": false, "other": 1});
        let mut want = own.clone();
        want["model"] = json!("m2");
        want["stream_options"] = json!({"include_usage": true, "other": 1});
        assert_eq!(upstream(&own, true, "m2"), want);
    }
}
