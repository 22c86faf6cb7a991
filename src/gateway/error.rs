//! Errors as API clients see them: OpenAI's `{"error":{"message","type","param","code"}}` with
//! the matching HTTP status. Every variant's status, `type`, `code` and metric label are decided
//! here, once, with exhaustive matches.

use crate::money::NanoUsd;
use bytes::Bytes;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// No route for this method and path.
    NotFound { path: String },
    /// A path of the OpenAI or Anthropic API this relay does not serve, and what to use instead.
    NotServed {
        path: &'static str,
        instead: &'static str,
    },
    /// The route exists but not for this method.
    MethodNotAllowed { method: String, path: String },
    /// No key in `Authorization: Bearer` or `x-api-key`.
    MissingKey,
    /// A key that is malformed, unknown, revoked or expired.
    InvalidKey { reason: String },
    /// The key was suspended by an operator.
    KeySuspended { support: String },
    /// The account is suspended or terminated.
    AccountBlocked {
        status: &'static str,
        support: String,
    },
    /// The account's e-mail is not verified yet.
    EmailNotVerified,
    /// The key may not use this tier.
    ModelNotAllowed { model: String },
    /// `model` names no tier.
    ModelNotFound { model: String, known: String },
    /// The body is not valid JSON, or a field is missing or has the wrong type or value.
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    /// The body is larger than the conf allows.
    BodyTooLarge { limit_bytes: u64 },
    /// The request line and headers are larger than `gateway.max_header_bytes`.
    HeadTooLarge { limit_bytes: usize },
    /// The client did not send the request's head (or body) within the conf's time.
    RequestTimeout { part: &'static str, limit_ms: u64 },
    /// This process holds `gateway.max_client_connections` already.
    TooManyConnections { limit: usize },
    /// The balance cannot cover the request's worst case.
    InsufficientCredits { needed: NanoUsd, available: NanoUsd },
    /// The key's own spend cap (set by its owner) cannot cover the request's worst case.
    SpendCapReached {
        cap: NanoUsd,
        spent: NanoUsd,
        /// Held under the cap by requests in flight (and usage not yet written) on every node.
        held: NanoUsd,
    },
    /// No upstream is enabled for the tier.
    NoUpstream { tier: String },
    /// Every upstream failed to connect or answered 5xx.
    UpstreamUnavailable { detail: String },
    /// Every upstream timed out before answering.
    UpstreamTimeout { detail: String },
    /// An upstream's stream ended cleanly before its terminal event.
    UpstreamIncomplete { detail: String },
    /// An upstream sent an event that is not JSON.
    UpstreamMalformed { detail: String },
    /// The upstream refused the request (4xx): its message, passed through in our shape.
    Upstream {
        status: u16,
        message: String,
        kind: String,
        param: Option<String>,
        code: Option<String>,
    },
    /// Over a rate limit (the request was not counted and costs nothing).
    RateLimited {
        which: super::limits::Which,
        limit: u64,
        retry_after_ms: u64,
    },
    /// Redis (the shared rate limiter) does not answer and `redis.on_outage = "refuse"`.
    LimiterUnavailable,
    /// The store is not reachable (a cache miss could not be resolved).
    StoreUnavailable,
    /// The gateway is shutting down and its grace time for streams ran out.
    ShuttingDown,
    /// A bug or an unexpected failure inside the gateway.
    Internal,
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::InvalidRequest { .. } => 400,
            ApiError::MissingKey | ApiError::InvalidKey { .. } => 401,
            ApiError::InsufficientCredits { .. } | ApiError::SpendCapReached { .. } => 402,
            ApiError::KeySuspended { .. }
            | ApiError::AccountBlocked { .. }
            | ApiError::EmailNotVerified
            | ApiError::ModelNotAllowed { .. } => 403,
            ApiError::NotFound { .. }
            | ApiError::NotServed { .. }
            | ApiError::ModelNotFound { .. } => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::RequestTimeout { .. } => 408,
            ApiError::BodyTooLarge { .. } => 413,
            ApiError::HeadTooLarge { .. } => 431,
            ApiError::RateLimited { .. } => 429,
            ApiError::Upstream { status, .. } => *status,
            ApiError::Internal => 500,
            ApiError::UpstreamUnavailable { .. }
            | ApiError::UpstreamIncomplete { .. }
            | ApiError::UpstreamMalformed { .. } => 502,
            ApiError::NoUpstream { .. }
            | ApiError::StoreUnavailable
            | ApiError::ShuttingDown
            | ApiError::TooManyConnections { .. }
            | ApiError::LimiterUnavailable => 503,
            ApiError::UpstreamTimeout { .. } => 504,
        }
    }

    /// OpenAI's `type` field.
    pub fn kind(&self) -> String {
        let k = match self {
            ApiError::NotFound { .. }
            | ApiError::NotServed { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::ModelNotFound { .. }
            | ApiError::InvalidRequest { .. }
            | ApiError::BodyTooLarge { .. }
            | ApiError::HeadTooLarge { .. }
            | ApiError::RequestTimeout { .. }
            | ApiError::MissingKey
            | ApiError::InvalidKey { .. } => "invalid_request_error",
            ApiError::KeySuspended { .. }
            | ApiError::AccountBlocked { .. }
            | ApiError::EmailNotVerified
            | ApiError::ModelNotAllowed { .. } => "permission_error",
            ApiError::InsufficientCredits { .. } | ApiError::SpendCapReached { .. } => {
                "insufficient_quota"
            }
            ApiError::Upstream { kind, .. } => return kind.clone(),
            ApiError::RateLimited { which, .. } => which.kind(),
            ApiError::NoUpstream { .. }
            | ApiError::UpstreamUnavailable { .. }
            | ApiError::UpstreamTimeout { .. }
            | ApiError::UpstreamIncomplete { .. }
            | ApiError::UpstreamMalformed { .. }
            | ApiError::LimiterUnavailable
            | ApiError::StoreUnavailable
            | ApiError::ShuttingDown
            | ApiError::TooManyConnections { .. }
            | ApiError::Internal => "api_error",
        };
        k.to_owned()
    }

    /// Anthropic's `error.type`, for clients of the Messages API.
    pub fn anthropic_kind(&self) -> &str {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::MethodNotAllowed { .. } => {
                "invalid_request_error"
            }
            ApiError::NotFound { .. }
            | ApiError::NotServed { .. }
            | ApiError::ModelNotFound { .. } => "not_found_error",
            ApiError::BodyTooLarge { .. } | ApiError::HeadTooLarge { .. } => "request_too_large",
            ApiError::RequestTimeout { .. } => "timeout_error",
            ApiError::MissingKey | ApiError::InvalidKey { .. } => "authentication_error",
            ApiError::KeySuspended { .. }
            | ApiError::AccountBlocked { .. }
            | ApiError::EmailNotVerified
            | ApiError::ModelNotAllowed { .. } => "permission_error",
            ApiError::InsufficientCredits { .. } | ApiError::SpendCapReached { .. } => {
                "billing_error"
            }
            ApiError::RateLimited { .. } => "rate_limit_error",
            ApiError::UpstreamTimeout { .. } => "timeout_error",
            ApiError::NoUpstream { .. }
            | ApiError::StoreUnavailable
            | ApiError::ShuttingDown
            | ApiError::TooManyConnections { .. }
            | ApiError::LimiterUnavailable => "overloaded_error",
            ApiError::UpstreamUnavailable { .. }
            | ApiError::UpstreamIncomplete { .. }
            | ApiError::UpstreamMalformed { .. }
            | ApiError::Internal => "api_error",
            // An upstream's own type when it is one of Anthropic's (it came from one), else
            // what its status means to an Anthropic client.
            ApiError::Upstream { kind, status, .. } => match kind.as_str() {
                "invalid_request_error"
                | "authentication_error"
                | "permission_error"
                | "not_found_error"
                | "request_too_large"
                | "rate_limit_error"
                | "billing_error"
                | "timeout_error"
                | "overloaded_error"
                | "api_error" => kind,
                _ if *status == 429 => "rate_limit_error",
                _ if *status >= 500 => "api_error",
                _ => "invalid_request_error",
            },
        }
    }

    /// OpenAI's `code` field: ours, or the upstream's when it refused the request.
    pub fn code(&self) -> &str {
        match self {
            ApiError::Upstream { code: Some(c), .. } => c,
            other => other.label(),
        }
    }

    /// Our own code, a low-cardinality label for metrics (never an upstream-supplied string).
    pub fn label(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } => "not_found",
            ApiError::NotServed { .. } => "endpoint_not_served",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::MissingKey | ApiError::InvalidKey { .. } => "invalid_api_key",
            ApiError::KeySuspended { .. } => "key_suspended",
            ApiError::AccountBlocked {
                status: "terminated",
                ..
            } => "account_terminated",
            ApiError::AccountBlocked { .. } => "account_suspended",
            ApiError::EmailNotVerified => "email_not_verified",
            ApiError::ModelNotAllowed { .. } => "model_not_allowed",
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::BodyTooLarge { .. } => "request_too_large",
            ApiError::HeadTooLarge { .. } => "request_header_too_large",
            ApiError::RequestTimeout { .. } => "request_timeout",
            ApiError::TooManyConnections { .. } => "too_many_connections",
            ApiError::InsufficientCredits { .. } => "insufficient_quota",
            ApiError::SpendCapReached { .. } => "spend_cap_reached",
            ApiError::NoUpstream { .. } => "no_upstream",
            ApiError::UpstreamUnavailable { .. } => "upstream_unavailable",
            ApiError::UpstreamTimeout { .. } => "upstream_timeout",
            ApiError::UpstreamIncomplete { .. } => "upstream_incomplete",
            ApiError::UpstreamMalformed { .. } => "upstream_malformed",
            ApiError::Upstream { .. } => "upstream_error",
            ApiError::StoreUnavailable => "store_unavailable",
            ApiError::ShuttingDown => "server_shutting_down",
            ApiError::RateLimited { .. } => "rate_limit_exceeded",
            ApiError::LimiterUnavailable => "rate_limiter_unavailable",
            ApiError::Internal => "internal_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::NotFound { path } => format!("Unknown request URL: {path}. Check the path (the API lives under /v1)."),
            ApiError::NotServed { path, instead } => format!("{path} is not served by this relay (see its README, \"API\"): {instead}."),
            ApiError::MethodNotAllowed { method, path } => format!("{method} is not allowed on {path}."),
            ApiError::MissingKey => "You didn't provide an API key. Send it as `Authorization: Bearer sk-relay_...`.".into(),
            ApiError::InvalidKey { reason } => reason.clone(),
            ApiError::KeySuspended { support } => format!("This API key is suspended. Contact {support} for help."),
            ApiError::AccountBlocked { status, support } => format!("This account is {status}. Contact {support} for help."),
            ApiError::EmailNotVerified => "Verify your e-mail address before using API keys: open the link in the verification mail we sent you.".into(),
            ApiError::ModelNotAllowed { model } => format!("This API key may not use the model `{model}`."),
            ApiError::ModelNotFound { model, known } => format!("The model `{model}` does not exist. Available models: {known}."),
            ApiError::InvalidRequest { message, .. } => message.clone(),
            ApiError::BodyTooLarge { limit_bytes } => format!("The request body is larger than the limit of {limit_bytes} bytes."),
            ApiError::HeadTooLarge { limit_bytes } => format!("The request line and headers are larger than the limit of {limit_bytes} bytes."),
            ApiError::RequestTimeout { part, limit_ms } => format!("The request's {part} did not arrive within {limit_ms} ms, so the connection was closed."),
            ApiError::TooManyConnections { limit } => format!("This server holds its limit of {limit} client connections. Retry shortly, or reuse a kept-alive connection."),
            ApiError::InsufficientCredits { needed, available } => format!(
                "Insufficient credits: this request can cost up to {needed} (its prompt plus its max_tokens), but your available balance is {available}. Add credits, or lower max_tokens."
            ),
            ApiError::SpendCapReached { cap, spent, held } => format!(
                "This key has reached its spend cap: it may spend {cap} and has used {} of it ({held} of that held by requests in flight or not yet recorded), so it cannot cover this request's worst case (its prompt plus its max_tokens). Raise the cap on the dashboard's API keys page, lower max_tokens, or use another key.",
                spent.checked_add(*held).unwrap_or(*spent)
            ),
            ApiError::NoUpstream { tier } => format!("No upstream is available for `{tier}` right now."),
            ApiError::UpstreamUnavailable { detail } => format!("The upstream provider is unavailable: {detail}."),
            ApiError::UpstreamTimeout { detail } => format!("The upstream provider timed out: {detail}."),
            ApiError::UpstreamIncomplete { detail } => format!("The answer is incomplete: {detail}. You are billed only for what you received; retry the request."),
            ApiError::UpstreamMalformed { detail } => format!("The answer is incomplete: {detail}, so the stream was ended there. You are billed only for what you received; retry the request."),
            ApiError::Upstream { message, .. } => message.clone(),
            ApiError::StoreUnavailable => "The service is temporarily unavailable. Try again shortly.".into(),
            ApiError::RateLimited { which, limit, retry_after_ms } => format!(
                "Rate limit reached for the {} (limit {limit}). Try again in {:.1}s; the x-ratelimit-* headers say how much is left.",
                which.describe(),
                *retry_after_ms as f64 / 1000.0
            ),
            ApiError::ShuttingDown => "The gateway is restarting and this stream ran past its grace time, so it was ended here. You are billed only for what you received; retry the request.".into(),
            ApiError::LimiterUnavailable => "Rate limits cannot be checked right now, so the request is refused. Try again shortly.".into(),
            ApiError::Internal => "Internal error.".into(),
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } => *param,
            ApiError::ModelNotFound { .. } | ApiError::ModelNotAllowed { .. } => Some("model"),
            ApiError::Upstream { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    fn value(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }

    pub fn body(&self) -> Bytes {
        Bytes::from(self.value().to_string())
    }

    /// The same error as one SSE event, for a stream that already started.
    pub fn sse_event(&self) -> Bytes {
        Bytes::from(format!("data: {}\n\n", self.value()))
    }

    /// The whole HTTP/1.1 answer, for a connection that has no request session to answer through
    /// (refused before or while its head is read): JSON body, `Connection: close`.
    pub fn raw_response(&self) -> Vec<u8> {
        let body = self.body();
        let status = self.status();
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        let retry = if status == 503 {
            "retry-after: 1\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{retry}\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// A 400 for a bad field.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let e = ApiError::NotFound {
            path: "/v2/x".into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).expect("json");
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("/v2/x"))
        );
        assert_eq!(e.status(), 404);
    }

    #[test]
    fn insufficient_credits_says_needed_and_available() {
        let e = ApiError::InsufficientCredits {
            needed: NanoUsd::from_nanos(1_500_000),
            available: NanoUsd::from_nanos(1_000),
        };
        assert_eq!(e.status(), 402);
        assert_eq!(e.code(), "insufficient_quota");
        assert!(
            e.message().contains("$0.0015") && e.message().contains("$0.000001"),
            "{}",
            e.message()
        );
        assert!(e.sse_event().starts_with(b"data: {"));
    }
}
