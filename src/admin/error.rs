//! The admin's errors: one enum, its status and code decided here, shown as JSON to the API and
//! as a page to browsers. Store failures are logged and shown as a generic message.

use crate::store::StoreError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    /// Bad input in a named field.
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The input clashes with what exists (a second sign-up with one e-mail).
    Conflict {
        field: &'static str,
        message: String,
    },
    /// Not signed in, or wrong credentials.
    Unauthorized(String),
    /// The password was right (or the session is signed in) but a code from the authenticator
    /// app (or a recovery code) must come too: `totp_code` in forms and log-in bodies, the
    /// `x-totp-code` header on other API calls.
    SecondFactor(String),
    /// Signed in but not allowed (or a form without a valid CSRF token).
    Forbidden(String),
    NotFound(String),
    /// A destructive operator action that waits for the typed confirmation (`confirm`).
    NeedsConfirmation(String),
    /// Too many attempts; try again after this many seconds.
    TooMany {
        retry_after_s: u64,
        message: String,
    },
    /// A part we depend on (Stripe, or a feature the operator has not turned on) is not there.
    Unavailable(String),
    /// Something on our side; details are in the log, not in the answer.
    Internal,
}

impl AdminError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        AdminError::Invalid {
            field,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::Invalid { .. } => StatusCode::BAD_REQUEST,
            AdminError::Unauthorized(_) | AdminError::SecondFactor(_) => StatusCode::UNAUTHORIZED,
            AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict { .. } | AdminError::NeedsConfirmation(_) => StatusCode::CONFLICT,
            AdminError::TooMany { .. } => StatusCode::TOO_MANY_REQUESTS,
            AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AdminError::Invalid { .. } => "invalid_input",
            AdminError::Conflict { .. } => "conflict",
            AdminError::NeedsConfirmation(_) => "confirmation_required",
            AdminError::Unauthorized(_) => "unauthorized",
            AdminError::SecondFactor(_) => "two_factor_required",
            AdminError::Forbidden(_) => "forbidden",
            AdminError::NotFound(_) => "not_found",
            AdminError::TooMany { .. } => "too_many_attempts",
            AdminError::Unavailable(_) => "unavailable",
            AdminError::Internal => "internal_error",
        }
    }

    pub fn field(&self) -> Option<&'static str> {
        match self {
            AdminError::Invalid { field, .. } | AdminError::Conflict { field, .. } => Some(field),
            AdminError::SecondFactor(_) => Some("totp_code"),
            AdminError::NeedsConfirmation(_) => Some("confirm"),
            _ => None,
        }
    }

    pub fn message(&self) -> String {
        match self {
            AdminError::Invalid { message, .. } | AdminError::Conflict { message, .. } => {
                message.clone()
            }
            AdminError::Unauthorized(m)
            | AdminError::SecondFactor(m)
            | AdminError::NeedsConfirmation(m)
            | AdminError::Forbidden(m)
            | AdminError::NotFound(m)
            | AdminError::Unavailable(m)
            | AdminError::TooMany { message: m, .. } => m.clone(),
            AdminError::Internal => {
                "Something went wrong on our side. Please try again in a moment.".into()
            }
        }
    }

    fn retry_after(&self, r: &mut Response) {
        if let AdminError::TooMany { retry_after_s, .. } = self
            && let Ok(v) = HeaderValue::from_str(&retry_after_s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }

    /// The JSON answer: `{"error": {"message", "code", "field"}}`.
    pub fn into_json(self) -> Response {
        let body = json!({"error": {"message": self.message(), "code": self.code(), "field": self.field()}});
        let mut r = (self.status(), axum::Json(body)).into_response();
        self.retry_after(&mut r);
        r
    }

    /// A page that says what went wrong (for errors not shown inside a form). The page itself
    /// is rendered by the outer layer that has the conf (`web::security_headers`), so every
    /// error page carries the operator's brand.
    pub fn into_page(self, visitor: Option<&super::web::Visitor>) -> Response {
        let mut r = self.status().into_response();
        r.extensions_mut().insert(super::pages::PendingErrorPage {
            visitor: visitor.cloned(),
            message: self.message(),
        });
        self.retry_after(&mut r);
        r
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { what, .. } => AdminError::NotFound(format!("No such {what}.")),
            StoreError::DuplicateEmail(_) => AdminError::Conflict {
                field: "email",
                message:
                    "An account with this e-mail already exists. Log in, or reset your password."
                        .into(),
            },
            StoreError::Invalid(m) => AdminError::Invalid {
                field: "input",
                message: m,
            },
            other => {
                tracing::error!(error = %other, "store error in the admin");
                AdminError::Internal
            }
        }
    }
}

/// JSON API handlers return this so errors come back as JSON.
pub struct ApiError(pub AdminError);

impl<E: Into<AdminError>> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.0.into_json()
    }
}
