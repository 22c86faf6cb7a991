//! What every dashboard and API request passes through: the session cookie (who is this
//! browser, and is it signed in), the CSRF check on anything that changes state, and the
//! security headers on every answer.
//!
//! Every browser gets a random session id in the `duang_sid` cookie (HttpOnly, SameSite=Lax,
//! Secure when the dashboard is served over https). Signing in stores the SHA-256 of a fresh id
//! (the old one is dropped, so a planted cookie never becomes a session). The CSRF token is an
//! HMAC of the session id: forms carry it in a hidden `csrf` field, API clients in the
//! `x-csrf-token` header. An anonymous JSON call (sign-up, log-in) needs no token: a cross-site
//! page cannot send `application/json` without a CORS preflight, which we never grant.

use super::error::AdminError;
use super::server::AppState;
use crate::store::Account;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

pub const SESSION_COOKIE: &str = "duang_sid";
/// Largest form body the CSRF check reads (the forms are small).
const MAX_FORM_BYTES: usize = 64 * 1024;

/// The browser behind a request, as the middleware found it.
#[derive(Clone, Debug)]
pub struct Visitor {
    pub session_id: String,
    pub account: Option<Account>,
    pub csrf: String,
    /// Whether the signed-in account has two-factor authentication on.
    pub two_factor: bool,
    /// When this session last passed the second factor.
    pub second_factor_at: Option<i64>,
    /// Whether the session id was made for this request (the answer must set the cookie).
    fresh: bool,
}

impl Visitor {
    /// Whether a sensitive action must ask for a code: 2FA is on and the session's last code
    /// is older than `reauth` (or there was none).
    pub fn needs_second_factor(&self, reauth: std::time::Duration) -> bool {
        self.two_factor
            && self
                .second_factor_at
                .is_none_or(|at| crate::time::now_ms() - at >= reauth.as_millis() as i64)
    }
}

pub fn new_session_id() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

pub fn session_hash(session_id: &str) -> String {
    hex::encode(Sha256::digest(session_id.as_bytes()))
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .filter(|v| v.len() == 43 && URL_SAFE_NO_PAD.decode(v).is_ok())
}

/// `Set-Cookie` for the session id; `max_age_s` 0 deletes it.
pub fn session_cookie(state: &AppState, session_id: &str, max_age_s: u64) -> HeaderValue {
    let secure = if state.conf.admin.public_url.scheme() == "https" {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={session_id}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_s}{secure}"
    ))
    .expect("a session cookie is plain ASCII")
}

/// Whether the caller is the JSON API (errors as JSON) rather than a page.
pub fn is_api(path: &str) -> bool {
    path.starts_with("/api/")
}

/// The session and CSRF layer; see the module doc.
pub async fn session_layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let api = is_api(parts.uri.path());
    let (session_id, fresh) = match cookie_value(&parts.headers, SESSION_COOKIE) {
        Some(id) => (id, false),
        None => (new_session_id(), true),
    };
    let session = if fresh {
        None
    } else {
        match state
            .store
            .session_account(&session_hash(&session_id))
            .await
        {
            Ok(s) => s.filter(|s| s.account.status != crate::store::AccountStatus::Terminated),
            Err(e) => return fail(api, AdminError::from(e), None),
        }
    };
    let visitor = Visitor {
        csrf: state.signer.csrf_token(&session_id),
        session_id,
        two_factor: session.as_ref().is_some_and(|s| s.two_factor),
        second_factor_at: session.as_ref().and_then(|s| s.second_factor_at),
        account: session.map(|s| s.account),
        fresh,
    };
    let unsafe_method = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    let body = if unsafe_method {
        match csrf_checked(&state, &visitor, &parts, body, api).await {
            Ok(b) => b,
            Err(e) => return fail(api, e, Some(&visitor)),
        }
    } else {
        body
    };
    parts.extensions.insert(visitor.clone());
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    let sets_session = resp
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .any(|v| v.as_bytes().starts_with(SESSION_COOKIE.as_bytes()));
    if visitor.fresh && !sets_session {
        let ttl = state.conf.admin.session_ttl.as_secs();
        resp.headers_mut().append(
            header::SET_COOKIE,
            session_cookie(&state, &visitor.session_id, ttl),
        );
    }
    resp
}

fn fail(api: bool, e: AdminError, visitor: Option<&Visitor>) -> Response {
    if api {
        e.into_json()
    } else {
        e.into_page(visitor)
    }
}

const CSRF_REFUSED: &str =
    "This form has expired or came from another site. Reload the page and try again.";

/// Checks the CSRF token of a state-changing request and gives the body back for the handler.
async fn csrf_checked(
    state: &AppState,
    visitor: &Visitor,
    parts: &Parts,
    body: Body,
    api: bool,
) -> Result<Body, AdminError> {
    let refused = || AdminError::Forbidden(CSRF_REFUSED.into());
    if let Some(token) = parts.headers.get("x-csrf-token") {
        let ok = token
            .to_str()
            .is_ok_and(|t| state.signer.check_csrf(&visitor.session_id, t));
        return if ok { Ok(body) } else { Err(refused()) };
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match content_type.as_str() {
        "application/x-www-form-urlencoded" => {
            let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
                .await
                .map_err(|_| AdminError::invalid("body", "The form is too large."))?;
            let token = url::form_urlencoded::parse(&bytes)
                .find(|(k, _)| k == "csrf")
                .map(|(_, v)| v.into_owned());
            match token {
                Some(t) if state.signer.check_csrf(&visitor.session_id, &t) => {
                    Ok(Body::from(bytes))
                }
                _ => Err(refused()),
            }
        }
        "application/json" if api && visitor.account.is_none() => Ok(body),
        _ => Err(refused()),
    }
}

/// The Content-Security-Policy of every page. `form-action` also governs where a form's answer
/// may redirect, so the buy-credits form must be allowed to land on Stripe's hosted Checkout
/// page (and on the origin of `stripe.api_base_url` when that is not Stripe's own, e.g. a
/// local fake in tests).
pub fn content_security_policy(conf: &crate::conf::Conf) -> String {
    let mut form_action = String::from("'self'");
    if let Some(stripe) = &conf.stripe {
        form_action.push_str(" https://checkout.stripe.com");
        let api = &stripe.api_base_url;
        if api.host_str() != Some("api.stripe.com") {
            form_action.push(' ');
            form_action.push_str(api.origin().ascii_serialization().as_str());
        }
    }
    format!(
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action {form_action}; base-uri 'none'"
    )
}

/// Headers on every answer of the admin: no sniffing, no framing, no referrer leaking a link
/// token to another site, scripts and styles from ourselves only.
pub async fn security_headers(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    if let Some(p) = resp
        .extensions_mut()
        .remove::<super::pages::PendingErrorPage>()
    {
        let page =
            super::pages::error_page(&state.conf, p.visitor.as_ref(), resp.status(), &p.message);
        let (mut parts, _) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        resp = Response::from_parts(parts, Body::from(page.into_string()));
    }
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, "x-content-type-options", "nosniff");
    set(h, "x-frame-options", "DENY");
    set(h, "referrer-policy", "same-origin");
    if let Ok(csp) = HeaderValue::from_str(&state.csp) {
        h.insert("content-security-policy", csp);
    }
    if state.conf.admin.public_url.scheme() == "https" {
        set(h, "strict-transport-security", "max-age=31536000");
    }
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    resp
}

/// The visitor, for any handler behind the session layer.
impl<S: Send + Sync> FromRequestParts<S> for Visitor {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Visitor>().cloned().ok_or_else(|| {
            tracing::error!(path = %parts.uri.path(), "a handler that needs a visitor runs outside the session layer");
            AdminError::Internal.into_json()
        })
    }
}

/// A signed-in visitor. Pages send anyone else to the login page; the API answers 401.
pub struct SignedIn {
    pub visitor: Visitor,
    pub account: Account,
}

impl<S: Send + Sync> FromRequestParts<S> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &S) -> Result<Self, Self::Rejection> {
        let visitor = Visitor::from_request_parts(parts, s).await?;
        match visitor.account.clone() {
            Some(account) => Ok(SignedIn { visitor, account }),
            None if is_api(parts.uri.path()) => {
                Err(AdminError::Unauthorized("Log in first.".into()).into_json())
            }
            None => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/dashboard");
                let target = format!(
                    "/login?next={}",
                    url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
                );
                Err(Redirect::to(&target).into_response())
            }
        }
    }
}

/// The client's address for login limits: the socket peer (a proxy in front should be
/// configured to pass the real address through PROXY protocol or not at all).
pub fn client_ip(parts_ext: &axum::http::Extensions) -> String {
    parts_ext
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}
