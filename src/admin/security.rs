//! Account security: two-factor authentication (TOTP, RFC 6238, with one-time recovery codes)
//! and the password change.
//!
//! - Enrolment: `/account/security` → "Set up" makes a secret (shown as a QR code and as text) →
//!   a code from the app confirms it → ten recovery codes, shown once.
//! - Log-in: a right password for an account with 2FA leads to a second form (a signed,
//!   five-minute ticket bound to this browser's session and the password), where a code or a
//!   recovery code finishes the log-in. The JSON API takes `totp_code` in the log-in body.
//! - Sensitive actions (creating a key, asking for a refund, changing the password) ask for a
//!   code again when the session's last one is older than `admin.two_factor_reauth_minutes`.
//! - Turning it on ends the account's other sessions (signed in with the password alone).
//! - Operators: the operator pages stay closed until the operator has turned 2FA on.
//!
//! A code is accepted once: for a step later than the last one taken (so a code seen over a
//! shoulder cannot be replayed), within one step of the server's clock. Wrong codes count
//! against a per-account limit like wrong passwords.

use super::error::{AdminError, ApiError};
use super::pages::{csrf_field, form_error, page};
use super::server::AppState;
use super::totp::{self, Secret};
use super::web::{SignedIn, Visitor, session_hash};
use crate::store::{Account, Role, TwoFactor};
use crate::time::now_ms;
use axum::Json;
use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, PreEscaped, html};
use serde::Deserialize;
use serde_json::{Value, json};

const CODE_REFUSED: &str = "That code is not right, or it was used already. Enter the current code from your authenticator app, or one of your recovery codes.";

fn code_needed() -> AdminError {
    AdminError::SecondFactor(
        "Enter the 6-digit code from your authenticator app (or a recovery code) to confirm."
            .into(),
    )
}

/// Counts one code attempt against the account's limit (wrong codes count like wrong
/// passwords); the limiter key, to clear on success.
fn take_code_attempt(state: &AppState, account_id: i64) -> Result<String, AdminError> {
    let key = format!("2fa:{account_id}");
    state.limits.login_account.take(&key).map_err(|s| {
        super::account::too_many(s, "Too many wrong authentication codes for this account")
    })?;
    Ok(key)
}

/// Whether the account has two-factor authentication on.
pub async fn is_on(state: &AppState, account_id: i64) -> Result<bool, AdminError> {
    Ok(state
        .store
        .two_factor(account_id)
        .await?
        .is_some_and(|t| t.enabled()))
}

/// For an account with 2FA on, `code` must be a good code (without one: `missing`, as a
/// [`AdminError::SecondFactor`]). Whether 2FA is on.
pub async fn require_code_if_on(
    state: &AppState,
    account_id: i64,
    code: Option<&str>,
    missing: &str,
) -> Result<bool, AdminError> {
    if !is_on(state, account_id).await? {
        return Ok(false);
    }
    match code.map(str::trim).filter(|c| !c.is_empty()) {
        Some(c) => check_code(state, account_id, c).await?,
        None => return Err(AdminError::SecondFactor(missing.into())),
    }
    Ok(true)
}

/// Checks a TOTP code or a recovery code for an account with 2FA on, and spends it.
pub async fn check_code(state: &AppState, account_id: i64, code: &str) -> Result<(), AdminError> {
    let code = code.trim();
    if code.is_empty() {
        return Err(code_needed());
    }
    let key = take_code_attempt(state, account_id)?;
    let Some(tf) = state
        .store
        .two_factor(account_id)
        .await?
        .filter(|t| t.enabled())
    else {
        return Err(AdminError::invalid(
            "totp_code",
            "Two-factor authentication is not on for this account.",
        ));
    };
    let ok = if totp::is_totp_code(code) {
        let secret = Secret::from_base32(&tf.secret).ok_or_else(|| {
            tracing::error!(account = account_id, "stored TOTP secret does not parse");
            AdminError::Internal
        })?;
        match secret.matching_step(code, now_ms() / 1000) {
            Some(step) => state.store.take_totp_step(account_id, step).await?,
            None => false,
        }
    } else {
        state
            .store
            .use_recovery_code(account_id, &totp::recovery_hash(code))
            .await?
    };
    if ok {
        state.limits.login_account.clear(&key);
        Ok(())
    } else {
        Err(AdminError::invalid("totp_code", CODE_REFUSED))
    }
}

/// Before a sensitive action: passes when 2FA is off or the session passed it recently enough,
/// otherwise `code` must be a good code (and the session is marked as having passed it now).
pub async fn step_up(state: &AppState, v: &Visitor, code: Option<&str>) -> Result<(), AdminError> {
    if !v.needs_second_factor(state.conf.admin.two_factor_reauth) {
        return Ok(());
    }
    let account = v.account.as_ref().ok_or(AdminError::Internal)?;
    let code = code.map(str::trim).filter(|c| !c.is_empty());
    check_code(state, account.id, code.ok_or_else(code_needed)?).await?;
    state
        .store
        .mark_second_factor(&session_hash(&v.session_id))
        .await?;
    Ok(())
}

/// The code field a sensitive form carries while [`step_up`] would ask for one.
pub fn code_field(state: &AppState, v: &Visitor) -> Markup {
    html! {
        @if v.needs_second_factor(state.conf.admin.two_factor_reauth) {
            label {
                "Authentication code (from your app, or a recovery code)"
                input type="text" name="totp_code" required inputmode="numeric" autocomplete="one-time-code" maxlength="16";
            }
        }
    }
}

/// Whether an operator may open the operator pages: 2FA on and passed in this session.
pub fn operator_cleared(v: &Visitor) -> bool {
    v.two_factor && v.second_factor_at.is_some()
}

// ── Log-in's second step ──────────────────────────────────────────────────────────────────────

const TICKET_TTL_MS: i64 = 5 * 60 * 1000;

/// What the ticket is bound to: this browser's session and the account's password (a changed
/// password kills tickets made before).
fn ticket_bound(v: &Visitor, password_hash: &str) -> String {
    format!("{}|{password_hash}", session_hash(&v.session_id))
}

pub async fn login_ticket(
    state: &AppState,
    v: &Visitor,
    account: &Account,
) -> Result<String, AdminError> {
    let hash = state
        .store
        .password_hash(account.id)
        .await?
        .unwrap_or_default();
    Ok(state.signer.link_token(
        "login-2fa",
        account.id,
        now_ms() + TICKET_TTL_MS,
        &ticket_bound(v, &hash),
    ))
}

/// Checks a log-in ticket and the code that came with it; the account it was made for.
pub async fn redeem_ticket(
    state: &AppState,
    v: &Visitor,
    ticket: &str,
    code: &str,
) -> Result<Account, AdminError> {
    let expired = || {
        AdminError::Unauthorized(
            "This log-in has expired (five minutes) or was started in another browser. Log in again."
                .into(),
        )
    };
    let t = super::signing::LinkToken::parse(ticket).map_err(|_| expired())?;
    let hash = match state.store.password_hash(t.account_id).await {
        Ok(h) => h.unwrap_or_default(),
        Err(crate::store::StoreError::NotFound { .. }) => return Err(expired()),
        Err(e) => return Err(e.into()),
    };
    state
        .signer
        .check_link("login-2fa", &t, &ticket_bound(v, &hash), now_ms())
        .map_err(|_| expired())?;
    check_code(state, t.account_id, code).await?;
    Ok(state
        .store
        .account(&crate::store::AccountRef::Id(t.account_id))
        .await?)
}

pub fn code_form(
    state: &AppState,
    v: &Visitor,
    ticket: &str,
    next: &str,
    error: Option<&str>,
) -> Markup {
    page(
        state,
        "Two-factor authentication",
        Some(v),
        html! {
            section.card {
                h1 { "Enter your authentication code" }
                p { "Open your authenticator app and enter the 6-digit code it shows for this account. Lost your phone? Enter one of your recovery codes instead." }
                (form_error(error))
                form.stack method="post" action="/login/code" {
                    (csrf_field(v))
                    input type="hidden" name="ticket" value=(ticket);
                    input type="hidden" name="next" value=(next);
                    label { "Code" input type="text" name="totp_code" required autofocus inputmode="numeric" autocomplete="one-time-code" maxlength="16"; }
                    button type="submit" { "Log in" }
                }
            }
        },
    )
}

// ── The security page ─────────────────────────────────────────────────────────────────────────

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SecurityQuery {
    required: Option<String>,
    changed: Option<String>,
}

fn security_page(
    state: &AppState,
    s: &SignedIn,
    tf: Option<&TwoFactor>,
    notice: Option<&str>,
    error: Option<&str>,
) -> Markup {
    let on = tf.is_some_and(TwoFactor::enabled);
    page(
        state,
        "Account security",
        Some(&s.visitor),
        html! {
            @if let Some(n) = notice { p.success role="status" { (n) } }
            section.card #two-factor {
                h1 { "Account security" }
                h2 { "Two-factor authentication" }
                (form_error(error))
                @if on {
                    p #two-factor-status { strong { "On." } " Log-ins and sensitive actions ask for a code from your authenticator app." }
                    p { "Recovery codes left: " strong #recovery-left { (tf.map(|t| t.recovery_left).unwrap_or(0)) } ". Each works once, when your phone is not at hand." }
                    form.stack method="post" action="/account/2fa/recovery" {
                        (csrf_field(&s.visitor))
                        (code_field(state, &s.visitor))
                        button type="submit" { "Make new recovery codes" }
                    }
                    @if s.account.role == Role::Operator {
                        p.muted { "Operator accounts must keep two-factor authentication on." }
                    } @else {
                        form.stack method="post" action="/account/2fa/disable" {
                            (csrf_field(&s.visitor))
                            label { "Code (to turn it off)" input type="text" name="totp_code" required inputmode="numeric" autocomplete="one-time-code" maxlength="16"; }
                            button.danger type="submit" { "Turn two-factor authentication off" }
                        }
                    }
                } @else {
                    p #two-factor-status { strong { "Off." } " Protect your prepaid balance: with two-factor authentication, a stolen password is not enough to log in." }
                    form method="post" action="/account/2fa/setup" {
                        (csrf_field(&s.visitor))
                        button type="submit" { "Set up two-factor authentication" }
                    }
                }
            }
            section.card #password {
                h2 { "Change your password" }
                form.stack method="post" action="/account/password" {
                    (csrf_field(&s.visitor))
                    label { "Current password" input type="password" name="current_password" required autocomplete="current-password"; }
                    label { "New password (at least 10 characters, letters and digits or symbols)" input type="password" name="new_password" required minlength="10" autocomplete="new-password"; }
                    (code_field(state, &s.visitor))
                    button type="submit" { "Change the password" }
                }
                p.muted { "Changing the password logs out every other browser." }
            }
        },
    )
}

async fn show_security(
    state: &AppState,
    s: &SignedIn,
    status: StatusCode,
    notice: Option<&str>,
    error: Option<&str>,
) -> Response {
    match state.store.two_factor(s.account.id).await {
        Ok(tf) => (status, security_page(state, s, tf.as_ref(), notice, error)).into_response(),
        Err(e) => AdminError::from(e).into_page(Some(&s.visitor)),
    }
}

pub async fn security(
    State(state): State<AppState>,
    s: SignedIn,
    Query(q): Query<SecurityQuery>,
) -> Response {
    let notice = if q.required.is_some() {
        Some("Operator pages open once two-factor authentication is on for your account.")
    } else if q.changed.is_some() {
        Some("Your password is changed.")
    } else {
        None
    };
    show_security(&state, &s, StatusCode::OK, notice, None).await
}

fn enrol_page(state: &AppState, s: &SignedIn, secret: &Secret, error: Option<&str>) -> Markup {
    let uri = secret.uri(&state.conf.brand.product_name, &s.account.email);
    let qr = qr_svg(&uri);
    let text = secret.base32();
    let grouped = text
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" ");
    page(
        state,
        "Set up two-factor authentication",
        Some(&s.visitor),
        html! {
            section.card {
                h1 { "Set up two-factor authentication" }
                ol {
                    li { "Open an authenticator app (Google Authenticator, 1Password, Authy, Aegis, …) and add an account." }
                    li { "Scan this code, or type the key below into the app." }
                    li { "Enter the 6-digit code the app then shows." }
                }
                @if let Some(svg) = qr { div.qr role="img" aria-label="QR code for your authenticator app" { (PreEscaped(svg)) } }
                p { "Key: " code #totp-secret { (grouped) } }
                p.muted { a href=(uri) { "Open in an authenticator app on this device" } }
                (form_error(error))
                form.stack method="post" action="/account/2fa/enable" {
                    (csrf_field(&s.visitor))
                    label { "Code from the app" input type="text" name="totp_code" required autofocus inputmode="numeric" autocomplete="one-time-code" maxlength="8"; }
                    button type="submit" { "Turn on two-factor authentication" }
                }
            }
        },
    )
}

fn qr_svg(data: &str) -> Option<String> {
    let code = qrcode::QrCode::new(data.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::svg::Color>()
            .min_dimensions(200, 200)
            .quiet_zone(true)
            .build(),
    )
}

fn recovery_page(state: &AppState, s: &SignedIn, codes: &[String], first: bool) -> Markup {
    page(
        state,
        "Recovery codes",
        Some(&s.visitor),
        html! {
            section.success {
                @if first {
                    h1 { "Two-factor authentication is on" }
                } @else {
                    h1 { "New recovery codes" }
                }
                p { "Keep these recovery codes somewhere safe (a password manager, or printed). Each one logs you in once if your phone is lost. They are shown only now; the old ones no longer work." }
                ul.codes #recovery-codes { @for c in codes { li { code { (c) } } } }
                p { a.button href="/account/security" { "Done" } }
            }
        },
    )
}

/// New recovery codes for an account with 2FA on, after the second factor (the old ones stop).
async fn new_recovery_codes(
    state: &AppState,
    s: &SignedIn,
    code: Option<&str>,
) -> Result<Vec<String>, AdminError> {
    if !s.visitor.two_factor {
        return Err(AdminError::invalid(
            "totp_code",
            "Two-factor authentication is not on for this account.",
        ));
    }
    step_up(state, &s.visitor, code).await?;
    let account_id = s.account.id;
    let codes = totp::recovery_codes();
    let hashes: Vec<String> = codes.iter().map(|c| totp::recovery_hash(c)).collect();
    state
        .store
        .replace_recovery_codes(account_id, &hashes)
        .await?;
    Ok(codes)
}

/// Starts an enrolment (a new secret each time; an unconfirmed one is replaced).
pub async fn begin(state: &AppState, account: &Account) -> Result<Secret, AdminError> {
    let secret = Secret::generate();
    state
        .store
        .begin_two_factor(account.id, &secret.base32())
        .await
        .map_err(|e| match e {
            crate::store::StoreError::Invalid(_) => AdminError::invalid(
                "totp_code",
                "Two-factor authentication is already on for this account.",
            ),
            other => other.into(),
        })?;
    Ok(secret)
}

/// Confirms the pending enrolment with a code; the recovery codes, to show once.
pub async fn enable(
    state: &AppState,
    v: &Visitor,
    account: &Account,
    code: &str,
) -> Result<Vec<String>, AdminError> {
    let pending = state
        .store
        .two_factor(account.id)
        .await?
        .filter(|t| !t.enabled())
        .ok_or_else(|| {
            AdminError::invalid(
                "totp_code",
                "There is no set-up waiting for a code: start it again.",
            )
        })?;
    let secret = Secret::from_base32(&pending.secret).ok_or(AdminError::Internal)?;
    let key = take_code_attempt(state, account.id)?;
    let step = secret
        .matching_step(code, now_ms() / 1000)
        .ok_or_else(|| {
            AdminError::invalid(
                "totp_code",
                "That code does not match. Check that the phone's clock is right and enter the code the app shows now.",
            )
        })?;
    let codes = totp::recovery_codes();
    let hashes: Vec<String> = codes.iter().map(|c| totp::recovery_hash(c)).collect();
    let actor = "self";
    if !state
        .store
        .enable_two_factor(account.id, step, &hashes, actor)
        .await?
    {
        return Err(AdminError::invalid(
            "totp_code",
            "There is no set-up waiting for a code: start it again.",
        ));
    }
    state.limits.login_account.clear(&key);
    let this = session_hash(&v.session_id);
    state.store.mark_second_factor(&this).await?;
    // Browsers signed in with the password alone (someone else's, perhaps) must log in again.
    state.store.end_other_sessions(account.id, &this).await?;
    Ok(codes)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CodeForm {
    totp_code: Option<String>,
}

impl CodeForm {
    fn code(&self) -> &str {
        self.totp_code.as_deref().unwrap_or_default()
    }
}

pub async fn setup_submit(State(state): State<AppState>, s: SignedIn) -> Response {
    match begin(&state, &s.account).await {
        Ok(secret) => enrol_page(&state, &s, &secret, None).into_response(),
        Err(e) => show_security(&state, &s, e.status(), None, Some(&e.message())).await,
    }
}

pub async fn enable_submit(
    State(state): State<AppState>,
    s: SignedIn,
    Form(f): Form<CodeForm>,
) -> Response {
    match enable(&state, &s.visitor, &s.account, f.code()).await {
        Ok(codes) => recovery_page(&state, &s, &codes, true).into_response(),
        Err(e) => {
            // Show the same secret again with the error, while it is pending.
            let pending = state.store.two_factor(s.account.id).await.ok().flatten();
            match pending
                .filter(|t| !t.enabled())
                .and_then(|t| Secret::from_base32(&t.secret))
            {
                Some(secret) => (
                    e.status(),
                    enrol_page(&state, &s, &secret, Some(&e.message())),
                )
                    .into_response(),
                None => show_security(&state, &s, e.status(), None, Some(&e.message())).await,
            }
        }
    }
}

pub async fn recovery_submit(
    State(state): State<AppState>,
    s: SignedIn,
    Form(f): Form<CodeForm>,
) -> Response {
    match new_recovery_codes(&state, &s, f.totp_code.as_deref()).await {
        Ok(codes) => recovery_page(&state, &s, &codes, false).into_response(),
        Err(e) => show_security(&state, &s, e.status(), None, Some(&e.message())).await,
    }
}

/// Turns 2FA off: always with a fresh code (not the session's recent one). Operators cannot.
pub async fn disable(state: &AppState, s: &SignedIn, code: &str) -> Result<(), AdminError> {
    if s.account.role == Role::Operator {
        return Err(AdminError::Forbidden(
            "Operator accounts must keep two-factor authentication on.".into(),
        ));
    }
    check_code(state, s.account.id, code).await?;
    state
        .store
        .disable_two_factor(s.account.id, "self", None)
        .await?;
    Ok(())
}

pub async fn disable_submit(
    State(state): State<AppState>,
    s: SignedIn,
    Form(f): Form<CodeForm>,
) -> Response {
    match disable(&state, &s, f.code()).await {
        Ok(()) => {
            let mut s = s;
            s.visitor.two_factor = false;
            show_security(
                &state,
                &s,
                StatusCode::OK,
                Some("Two-factor authentication is off."),
                None,
            )
            .await
        }
        Err(e) => show_security(&state, &s, e.status(), None, Some(&e.message())).await,
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PasswordForm {
    current_password: String,
    new_password: String,
    totp_code: Option<String>,
}

/// Changes the password: the current one, the second factor when on, a strong new one. Every
/// session of the account ends; the caller starts a fresh one for this browser.
pub async fn change_password(
    state: &AppState,
    v: &Visitor,
    account: &Account,
    f: &PasswordForm,
) -> Result<(), AdminError> {
    let stored = state.store.password_hash(account.id).await?;
    let current = f.current_password.clone();
    let ok = tokio::task::spawn_blocking(move || {
        stored.is_some_and(|h| crate::password::verify(&current, &h))
    })
    .await
    .map_err(|_| AdminError::Internal)?;
    if !ok {
        return Err(AdminError::invalid(
            "current_password",
            "The current password is wrong.",
        ));
    }
    step_up(state, v, f.totp_code.as_deref()).await?;
    let hash = super::account::hash_password(f.new_password.clone()).await?;
    state.store.set_password(account.id, &hash, "self").await?;
    Ok(())
}

pub async fn password_submit(
    State(state): State<AppState>,
    s: SignedIn,
    Form(f): Form<PasswordForm>,
) -> Response {
    match change_password(&state, &s.visitor, &s.account, &f).await {
        // Every session ended with the change; this browser gets a new one (2FA just passed
        // or not on).
        Ok(()) => {
            match super::account::start_session(
                &state,
                &s.visitor,
                &s.account,
                s.visitor.two_factor,
            )
            .await
            {
                Ok((_, cookie)) => {
                    super::account::signed_in_redirect(cookie, "/account/security?changed=1")
                }
                Err(e) => e.into_page(Some(&s.visitor)),
            }
        }
        Err(e) => show_security(&state, &s, e.status(), None, Some(&e.message())).await,
    }
}

// ── JSON API ──────────────────────────────────────────────────────────────────────────────────

fn two_factor_json(tf: Option<&TwoFactor>) -> Value {
    json!({
        "enabled": tf.is_some_and(TwoFactor::enabled),
        "recovery_codes_left": tf.filter(|t| t.enabled()).map(|t| t.recovery_left).unwrap_or(0),
    })
}

pub async fn api_status(
    State(state): State<AppState>,
    s: SignedIn,
) -> Result<Json<Value>, ApiError> {
    let tf = state.store.two_factor(s.account.id).await?;
    Ok(Json(two_factor_json(tf.as_ref())))
}

/// Starts an enrolment: the secret and the `otpauth://` link to give the app.
pub async fn api_setup(
    State(state): State<AppState>,
    s: SignedIn,
) -> Result<Json<Value>, ApiError> {
    let secret = begin(&state, &s.account).await?;
    Ok(Json(json!({
        "secret": secret.base32(),
        "otpauth_uri": secret.uri(&state.conf.brand.product_name, &s.account.email),
    })))
}

pub async fn api_enable(
    State(state): State<AppState>,
    s: SignedIn,
    Json(f): Json<CodeForm>,
) -> Result<Json<Value>, ApiError> {
    let codes = enable(&state, &s.visitor, &s.account, f.code()).await?;
    Ok(Json(json!({"enabled": true, "recovery_codes": codes})))
}

pub async fn api_disable(
    State(state): State<AppState>,
    s: SignedIn,
    Json(f): Json<CodeForm>,
) -> Result<Json<Value>, ApiError> {
    disable(&state, &s, f.code()).await?;
    Ok(Json(two_factor_json(None)))
}

pub async fn api_recovery(
    State(state): State<AppState>,
    s: SignedIn,
    Json(f): Json<CodeForm>,
) -> Result<Json<Value>, ApiError> {
    let codes = new_recovery_codes(&state, &s, f.totp_code.as_deref()).await?;
    Ok(Json(json!({"recovery_codes": codes})))
}
