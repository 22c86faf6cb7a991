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
        let key = match &conf.admin.signing_secret {
            Some(s) => s.expose().clone(),
            None => store
                .setting_or_init("signing_key", || hex::encode(rand::random::<[u8; 32]>()))
                .await
                .map_err(|e| e.to_string())?,
        };
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
}

pub fn app(state: AppState) -> Router {
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
            state.clone(),
            web::session_layer,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/static/app.css", get(pages::stylesheet))
        // Browsers ask for it whatever the page says; nothing to show.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        // Outside the session layer: Stripe signs its requests instead of sending a CSRF token.
        .route("/stripe/webhook", post(credits::webhook))
        .nest("/demo/v1", super::demo::router())
        .merge(site)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            web::security_headers,
        ))
        .with_state(state)
}

/// The JSON API, from the table that also describes it (`openapi.rs`).
fn api_router() -> Router<AppState> {
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
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let notices = tokio::spawn(super::notify::low_balance_loop(
        state.clone(),
        Duration::from_secs(60),
    ));
    let retention = tokio::spawn(super::retention::usage_retention_loop(
        state.clone(),
        Duration::from_secs(3600),
    ));
    let served = axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    notices.abort();
    retention.abort();
    served
}
