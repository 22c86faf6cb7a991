//! Step 3: read and validate the body, map the tier, and prepare what goes upstream.
//!
//! The body is read here, whole, up to the conf's limit (Pingora's proxy loop would forward only
//! 64 KiB of a body read in `request_filter`; we send it ourselves, see `upstream`). It is parsed
//! once; the upstream copy differs only in `model` and, for streams, `stream_options`.

use super::error::ApiError;
use crate::conf::{Conf, Tier};
use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use serde_json::{Map, Value};

/// Larger `max_tokens` values are refused as absurd.
pub const MAX_OUTPUT_TOKENS: u64 = 1_000_000;
/// Larger `n` values are refused.
pub const MAX_CHOICES: u64 = 16;

/// A validated chat-completions request.
pub struct ChatRequest {
    pub tier: usize,
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
/// client can read the answer).
pub async fn read_body(session: &mut Session, limit: u64) -> Result<Bytes, ApiError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut too_large = declared.is_some_and(|n| n > limit);
    let capacity = if too_large {
        0
    } else {
        declared.unwrap_or(4096).min(limit) as usize
    };
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

/// Parses and checks a chat-completions body against the conf's tiers.
pub fn parse_chat(conf: &Conf, body: &Bytes) -> Result<ChatRequest, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest {
        message: format!(
            "We could not parse the JSON body of your request ({e}). Send a JSON object."
        ),
        param: None,
    })?;
    let Value::Object(map) = value else {
        return Err(ApiError::InvalidRequest {
            message: "The request body must be a JSON object.".into(),
            param: None,
        });
    };
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
        body: map,
        raw: body.clone(),
        stream,
        client_wants_usage,
        max_output_tokens: per_choice * n,
        input_upper_bound: (body.len() as u64)
            .saturating_add(images.saturating_mul(t.image_input_tokens_max)),
    })
}

impl ChatRequest {
    /// The body sent to an upstream: `model` rewritten, and for streams usage always requested.
    /// Written straight from the parsed body (no copy of it, however large its messages).
    pub fn upstream_body(&self, upstream_model: &str) -> Bytes {
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
        let body = UpstreamBody {
            body: &self.body,
            model: upstream_model,
            stream_options: stream_options.as_ref(),
        };
        let mut out = Vec::with_capacity(self.input_upper_bound as usize + 64);
        let _ = serde_json::to_writer(&mut out, &body);
        Bytes::from(out)
    }

    /// Lets the parsed body go once the request has been sent.
    pub fn sent(&mut self) {
        self.body = Map::new();
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
            body: body.as_object().expect("an object").clone(),
            raw: Bytes::new(),
            stream,
            client_wants_usage: false,
            max_output_tokens: 1,
            input_upper_bound: 64,
        };
        serde_json::from_slice(&req.upstream_body(model)).expect("JSON")
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
