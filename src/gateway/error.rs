//! Errors as API clients see them: OpenAI's `{"error":{"message","type","param","code"}}` with
//! the matching HTTP status. Every variant's status, `type` and `code` are decided here, once.

use bytes::Bytes;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// No route for this method and path.
    NotFound { path: String },
    /// The route exists but not for this method.
    MethodNotAllowed { method: String, path: String },
    /// A route this build does not serve yet.
    NotImplemented { what: &'static str },
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::NotImplemented { .. } => 501,
        }
    }

    /// OpenAI's `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } | ApiError::MethodNotAllowed { .. } => {
                "invalid_request_error"
            }
            ApiError::NotImplemented { .. } => "api_error",
        }
    }

    /// OpenAI's `code` field, also the low-cardinality metric label.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::NotImplemented { .. } => "not_implemented",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::NotFound { path } => {
                format!("Unknown request URL: {path}. Check the path (the API lives under /v1).")
            }
            ApiError::MethodNotAllowed { method, path } => {
                format!("{method} is not allowed on {path}.")
            }
            ApiError::NotImplemented { what } => {
                format!("{what} is not served by this build of the gateway yet.")
            }
        }
    }

    pub fn param(&self) -> Option<&'static str> {
        None
    }

    pub fn body(&self) -> Bytes {
        let v = json!({
            "error": {
                "message": self.message(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.code(),
            }
        });
        Bytes::from(v.to_string())
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
}
