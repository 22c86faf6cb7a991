//! The admin's HTTP server. `app(state)` builds the router so tests can call it without a socket.
//!
//! Routes: public pages (`/`, `/pricing`, `/quickstart`, `/policies/*`), accounts (`/signup`,
//! `/login`, `/logout`, `/verify`, `/password/*`), the customer's dashboard and keys, the JSON
//! API under `/api/v1`, `/healthz`, and the local demo upstream at `/demo/v1`.

use super::limiter::Limiter;
use super::mail::Mailer;
use super::signing::Signer;
use super::stripe::StripeClient;
use super::{
    account, credits, dashboard, exports, keys_web, operator, pages, refunds, security, usage, web,
};
use crate::conf::Conf;
use crate::store::Store;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use std::sync::Arc;
use std::time::Duration;

/// Login and mail limits (in this process).
pub struct Limits {
    /// Failed log-ins per account: 5 per 15 minutes.
    pub login_account: Limiter,
    /// Log-in attempts per client address: 30 per 15 minutes.
    pub login_ip: Limiter,
    /// Verification and reset mails per account: 5 per hour.
    pub mail: Limiter,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            login_account: Limiter::new(5, Duration::from_secs(15 * 60)),
            login_ip: Limiter::new(30, Duration::from_secs(15 * 60)),
            mail: Limiter::new(5, Duration::from_secs(3600)),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub conf: Arc<Conf>,
    pub store: Store,
    pub signer: Arc<Signer>,
    pub mailer: Arc<Mailer>,
    pub limits: Arc<Limits>,
    /// `None` while `stripe.enabled` is false.
    pub stripe: Option<Arc<StripeClient>>,
    /// The Content-Security-Policy header value (it depends on the conf).
    pub csp: Arc<str>,
}

impl AppState {
    /// Builds the state: the signing key from `admin.secret_env`, or the one kept in the store
    /// (made on first start).
    pub async fn new(conf: Arc<Conf>, store: Store) -> Result<AppState, String> {
        let key = signing_key(&conf, &store).await?;
        let mailer = Mailer::new(&conf.mail)?;
        Ok(AppState {
            signer: Arc::new(Signer::new(key.as_bytes())),
            mailer: Arc::new(mailer),
            limits: Arc::new(Limits::default()),
            stripe: conf.stripe.as_ref().map(|s| Arc::new(StripeClient::new(s))),
            csp: web::content_security_policy(&conf).into(),
            conf,
            store,
        })
    }

    /// The state for a reloaded `conf`: its mailer, Stripe client and page policy made anew;
    /// the store, the signing key and the log-in limits kept.
    fn reloaded(&self, conf: Arc<Conf>) -> Result<AppState, String> {
        Ok(AppState {
            mailer: Arc::new(Mailer::new(&conf.mail)?),
            stripe: conf.stripe.as_ref().map(|s| Arc::new(StripeClient::new(s))),
            csp: web::content_security_policy(&conf).into(),
            conf,
            store: self.store.clone(),
            signer: self.signer.clone(),
            limits: self.limits.clone(),
        })
    }
}

/// The key that signs e-mailed links, CSRF tokens and reload requests: `admin.secret_env`'s, or
/// the one kept in the store (made on first start).
pub async fn signing_key(conf: &Conf, store: &Store) -> Result<String, String> {
    match &conf.admin.signing_secret {
        Some(s) => Ok(s.expose().clone()),
        None => store
            .setting_or_init("signing_key", || hex::encode(rand::random::<[u8; 32]>()))
            .await
            .map_err(|e| e.to_string()),
    }
}

/// What the router serves from: the current [`AppState`], replaced whole by a conf reload
/// (SIGHUP or `duang-admin reload`). Each request takes the state current when it arrives.
#[derive(Clone)]
pub struct Live(Arc<arc_swap::ArcSwap<AppState>>);

impl axum::extract::FromRef<Live> for AppState {
    fn from_ref(live: &Live) -> AppState {
        AppState::clone(&live.0.load())
    }
}

/// What a reload did: the new conf's warnings, or why it was refused (the running conf stays).
pub type Reloaded = Result<Vec<String>, String>;

impl Live {
    pub fn new(state: AppState) -> Live {
        Live(Arc::new(arc_swap::ArcSwap::from_pointee(state)))
    }

    pub fn state(&self) -> AppState {
        AppState::clone(&self.0.load())
    }

    /// Rereads the conf file the admin started with: refused, with the messages a start gives,
    /// when it does not validate or changes a setting only a restart applies.
    pub fn reload(&self) -> Reloaded {
        let current = self.state();
        let path = std::path::Path::new(&current.conf.source);
        let new = Conf::load(path).map_err(|e| e.to_string())?;
        if let Some(refusal) = current.conf.reload_refusal(&new) {
            return Err(refusal);
        }
        let warnings = new.warnings.clone();
        let next = current.reloaded(Arc::new(new))?;
        self.0.store(Arc::new(next));
        Ok(warnings)
    }

    /// Reloads, logging the outcome.
    pub fn reload_logged(&self) -> Reloaded {
        let r = self.reload();
        match &r {
            Ok(warnings) => {
                for w in warnings {
                    tracing::warn!("{w}");
                }
                tracing::info!("admin: conf reloaded");
            }
            Err(reason) => tracing::error!("admin: conf reload refused: {reason}"),
        }
        r
    }
}

/// The purpose a reload request's token is signed for (see `duang-admin reload`).
pub const RELOAD_TOKEN_PURPOSE: &str = "conf-reload";

/// `POST /-/reload`, from `duang-admin reload`: authorized by a short-lived token signed with
/// the admin's signing key (which only the operator's machines hold), answered like the
/// gateway's: 200 `reloaded` with warnings, 409 `refused` with the reason.
async fn reload_submit(
    State(live): State<Live>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let state = live.state();
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| super::signing::LinkToken::parse(t.trim()).ok());
    let authorized = token.is_some_and(|t| {
        state
            .signer
            .check_link(RELOAD_TOKEN_PURPOSE, &t, "", crate::time::now_ms())
            .is_ok()
    });
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({
                "status": "unauthorized",
                "reason": "a reload needs a token signed with the admin's key: run `duang-admin reload`",
            })),
        )
            .into_response();
    }
    let l = live.clone();
    let r = tokio::task::spawn_blocking(move || l.reload_logged())
        .await
        .unwrap_or_else(|e| Err(format!("the reload failed: {e}")));
    match r {
        Ok(warnings) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "status": "reloaded", "warnings": warnings })),
        )
            .into_response(),
        Err(reason) => (
            StatusCode::CONFLICT,
            axum::Json(serde_json::json!({ "status": "refused", "reason": reason })),
        )
            .into_response(),
    }
}

pub fn app(state: AppState) -> Router {
    live_app(Live::new(state))
}

/// The router over a [`Live`] state (what `serve` runs, so a reload reaches every handler).
pub fn live_app(live: Live) -> Router {
    let site = Router::new()
        .route("/", get(pages::home))
        .route("/pricing", get(pages::pricing))
        .route("/quickstart", get(pages::quickstart))
        .route("/policies/{slug}", get(pages::policy))
        .route(
            "/signup",
            get(account::signup_page).post(account::signup_submit),
        )
        .route(
            "/login",
            get(account::login_page).post(account::login_submit),
        )
        .route("/login/code", post(account::login_code_submit))
        .route("/logout", post(account::logout_submit))
        .route("/account/security", get(security::security))
        .route("/account/2fa/setup", post(security::setup_submit))
        .route("/account/2fa/enable", post(security::enable_submit))
        .route("/account/2fa/recovery", post(security::recovery_submit))
        .route("/account/2fa/disable", post(security::disable_submit))
        .route("/account/password", post(security::password_submit))
        .route("/verify", get(account::verify_page))
        .route("/verify/resend", post(account::resend_submit))
        .route(
            "/password/forgot",
            get(account::forgot_page).post(account::forgot_submit),
        )
        .route(
            "/password/reset",
            get(account::reset_page).post(account::reset_submit),
        )
        .route("/dashboard", get(dashboard::dashboard))
        .route(
            "/keys",
            get(keys_web::list_page).post(keys_web::create_submit),
        )
        .route("/keys/{id}/revoke", post(keys_web::revoke_submit))
        .route("/usage", get(usage::usage_page))
        .route("/usage.csv", get(usage::usage_csv))
        .route("/credits", get(credits::credits))
        .route("/credits/checkout", post(credits::checkout_submit))
        .route("/credits/success", get(credits::success))
        .route("/credits/receipts", get(credits::receipts))
        .route("/credits/receipts/{session_id}", get(credits::receipt))
        .route(
            "/refunds",
            get(refunds::refunds_page).post(refunds::refund_submit),
        )
        .route("/operator", get(operator::accounts))
        .route("/operator/accounts/{id}", get(operator::account))
        .route(
            "/operator/accounts/{id}/status",
            post(operator::account_status_submit),
        )
        .route(
            "/operator/accounts/{id}/credits",
            post(operator::credits_submit),
        )
        .route(
            "/operator/keys/{id}/status",
            post(operator::key_status_submit),
        )
        .route(
            "/operator/accounts/{id}/limits",
            post(operator::limits_submit),
        )
        .route(
            "/operator/accounts/{id}/throttle",
            post(operator::throttle_submit),
        )
        .route(
            "/operator/keys/{id}/throttle",
            post(operator::key_throttle_submit),
        )
        .route("/operator/refunds", get(refunds::queue))
        .route(
            "/operator/refunds/{id}/approve",
            post(refunds::approve_submit),
        )
        .route(
            "/operator/refunds/{id}/decline",
            post(refunds::decline_submit),
        )
        .route("/operator/revenue", get(operator::revenue))
        .route("/operator/upstreams", get(operator::upstreams))
        .route("/operator/audit", get(exports::audit_page))
        .route("/operator/audit.csv", get(exports::audit_csv))
        .route("/operator/exports/ledger.csv", get(exports::ledger_csv))
        .route("/operator/exports/usage.csv", get(exports::usage_csv))
        .merge(api_router())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            live.clone(),
            web::session_layer,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/static/app.css", get(pages::stylesheet))
        // Browsers ask for it whatever the page says; nothing to show.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        // Outside the session layer: Stripe signs its requests instead of sending a CSRF token.
        .route("/stripe/webhook", post(credits::webhook))
        // Outside the session layer too: `duang-admin reload` signs its request.
        .route("/-/reload", post(reload_submit))
        .nest("/demo/v1", super::demo::router())
        .merge(site)
        .layer(axum::middleware::from_fn_with_state(
            live.clone(),
            web::security_headers,
        ))
        .with_state(live)
}

/// The JSON API, from the table that also describes it (`openapi.rs`).
fn api_router() -> Router<Live> {
    super::openapi::routes()
        .into_iter()
        .fold(Router::new(), |r, route| r.route(route.path, route.handler))
}

async fn not_found(uri: axum::http::Uri, visitor: web::Visitor) -> axum::response::Response {
    let e = super::error::AdminError::NotFound(format!("Nothing lives at {}.", uri.path()));
    if web::is_api(uri.path()) {
        e.into_json()
    } else {
        e.into_page(Some(&visitor))
    }
}

/// Healthy when the store answers.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match sqlx::query("SELECT 1").execute(state.store.pool()).await {
        Ok(_) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok"})),
        ),
        Err(e) => {
            tracing::error!(error = %e, "health check: store unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({"status": "store unavailable"})),
            )
        }
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    live: Live,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let notices = tokio::spawn(super::notify::low_balance_loop(
        live.clone(),
        Duration::from_secs(60),
    ));
    let retention = tokio::spawn(super::retention::usage_retention_loop(
        live.clone(),
        Duration::from_secs(3600),
    ));
    let served = axum::serve(
        listener,
        live_app(live).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    notices.abort();
    retention.abort();
    served
}
