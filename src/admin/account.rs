//! Sign-up, e-mail verification, log-in and log-out, and password reset: the business steps
//! first, then the page handlers and the JSON handlers that call them.

use super::error::{AdminError, ApiError};
use super::notify::{self, Letter};
use super::pages::{csrf_field, form_error, page};
use super::server::AppState;
use super::signing::{LinkError, LinkToken};
use super::web::{SignedIn, Visitor, client_ip, new_session_id, session_cookie, session_hash};
use crate::store::{Account, AccountRef, AccountStatus, NewAccount, Role};
use crate::time::now_ms;
use axum::extract::{Query, State};
use axum::http::{Extensions, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

const VERIFY_TTL: Duration = Duration::from_secs(48 * 3600);
const RESET_TTL: Duration = Duration::from_secs(3600);

// ── The steps ─────────────────────────────────────────────────────────────────────────────────

fn check_email(email: &str) -> Result<String, AdminError> {
    if crate::email::is_valid(email) {
        Ok(crate::email::normalize(email))
    } else {
        Err(AdminError::invalid(
            "email",
            "Enter a valid e-mail address, like name@example.com.",
        ))
    }
}

pub(super) async fn hash_password(password: String) -> Result<String, AdminError> {
    crate::password::check_strength(&password)
        .map_err(|e| AdminError::invalid("password", capitalise(&e.to_string())))?;
    tokio::task::spawn_blocking(move || crate::password::hash(&password))
        .await
        .map_err(|_| AdminError::Internal)
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => format!("{}{}.", f.to_uppercase(), c.as_str().trim_end_matches('.')),
        None => String::new(),
    }
}

/// What sign-up says, whether the address was new or already had an account: the answer must
/// not tell anyone which addresses have accounts.
pub const SIGNED_UP: &str = "Check your mailbox: we sent a link to confirm your address. Open it, then log in with your e-mail and password.";

/// Signs up: a new address gets a customer account and the verification link; an address that
/// already has an account gets a mail telling its owner (log in, or reset the password) and no
/// change. Both answer alike and take alike long (the password is hashed either way).
pub async fn register(state: &AppState, email: &str, password: String) -> Result<(), AdminError> {
    let email = check_email(email)?;
    let hash = hash_password(password).await?;
    let created = state
        .store
        .create_account(&NewAccount {
            email: email.clone(),
            password_hash: Some(hash),
            role: Role::Customer,
            verified: false,
        })
        .await;
    match created {
        // The account exists either way; a mail that fails can be sent again from the dashboard.
        Ok(account) => {
            if let Err(e) = send_verification(state, &account).await {
                tracing::error!(account = account.id, error = ?e, "verification mail not sent");
            }
        }
        Err(crate::store::StoreError::DuplicateEmail(_)) => {
            if let Err(e) = send_already_registered(state, &email).await {
                tracing::error!(error = ?e, "already-registered mail not sent");
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Tells the owner of an address that someone signed up with it again (at most as often as the
/// other account mails).
async fn send_already_registered(state: &AppState, email: &str) -> Result<(), AdminError> {
    let account = state
        .store
        .account(&AccountRef::Email(email.to_owned()))
        .await?;
    if account.status == AccountStatus::Terminated
        || state
            .limits
            .mail
            .take(&format!("mail:{}", account.id))
            .is_err()
    {
        return Ok(());
    }
    let letter = Letter::new("You already have an account")
        .para(format!(
            "Someone (hopefully you) tried to create a {} account with this address, but it already has one.",
            state.conf.brand.product_name
        ))
        .link("Log in", notify::url(state, "/login"))
        .link(
            "Forgot your password? Choose a new one",
            notify::url(state, "/password/forgot"),
        )
        .para("If it was not you, ignore this mail: nothing was changed.");
    notify::send(state, &account.email, "signup-existing", letter).await
}

pub async fn send_verification(state: &AppState, account: &Account) -> Result<(), AdminError> {
    if account.is_verified() {
        return Ok(());
    }
    let key = format!("mail:{}", account.id);
    state
        .limits
        .mail
        .take(&key)
        .map_err(|s| too_many(s, "Too many mails sent to this address"))?;
    let expires = now_ms() + VERIFY_TTL.as_millis() as i64;
    let token = state
        .signer
        .link_token("verify", account.id, expires, &account.email);
    let link = link(state, "/verify", &token);
    let letter = Letter::new("Confirm your e-mail address")
        .para(format!("Welcome to {}.", state.conf.brand.product_name))
        .link(
            "Confirm your e-mail address by opening this link within 48 hours",
            link,
        )
        .para("Until you do, you can log in but cannot buy credits or use API keys. If you did not sign up, ignore this mail.");
    notify::send(state, &account.email, "verify", letter).await
}

fn link(state: &AppState, path: &str, token: &str) -> String {
    format!(
        "{}?token={}",
        notify::url(state, path),
        url::form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>()
    )
}

pub(super) fn too_many(retry_after_s: u64, what: &str) -> AdminError {
    AdminError::TooMany {
        retry_after_s,
        message: format!(
            "{what}. Try again in {} minute(s).",
            retry_after_s.div_ceil(60)
        ),
    }
}

fn link_refused(e: LinkError, what: &str) -> AdminError {
    match e {
        LinkError::Expired => AdminError::invalid(
            "token",
            format!("This {what} link has expired. Ask for a new one."),
        ),
        LinkError::Invalid => AdminError::invalid(
            "token",
            format!("This {what} link is not valid: it was changed, or it has already been used."),
        ),
    }
}

pub async fn verify_email(state: &AppState, token: &str) -> Result<Account, AdminError> {
    let t = LinkToken::parse(token).map_err(|e| link_refused(e, "verification"))?;
    let account = match state.store.account(&AccountRef::Id(t.account_id)).await {
        Ok(a) => a,
        Err(crate::store::StoreError::NotFound { .. }) => {
            return Err(link_refused(LinkError::Invalid, "verification"));
        }
        Err(e) => return Err(e.into()),
    };
    state
        .signer
        .check_link("verify", &t, &account.email, now_ms())
        .map_err(|e| link_refused(e, "verification"))?;
    Ok(state.store.mark_verified(account.id).await?)
}

/// Checks a log-in; counts failures per account and attempts per address. Both are taken before
/// the password is checked (a guess counts while it is being hashed, so concurrent guesses
/// cannot all slip under the limit); a right password gives the account's places back.
pub async fn authenticate(
    state: &AppState,
    email: &str,
    password: &str,
    ip: &str,
) -> Result<Account, AdminError> {
    let email = crate::email::normalize(email);
    let by_ip = format!("ip:{ip}");
    let by_account = format!("account:{email}");
    state
        .limits
        .login_ip
        .take(&by_ip)
        .map_err(|s| too_many(s, "Too many log-in attempts from your network"))?;
    state
        .limits
        .login_account
        .take(&by_account)
        .map_err(|s| too_many(s, "Too many failed log-ins for this account"))?;
    let account = match state.store.account(&AccountRef::Email(email.clone())).await {
        Ok(a) => Some(a),
        Err(crate::store::StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let stored = match &account {
        Some(a) => state.store.password_hash(a.id).await?,
        None => None,
    };
    let password = password.to_owned();
    // A missing account or password still costs one hash, so timing does not tell them apart.
    let ok = tokio::task::spawn_blocking(move || match stored {
        Some(h) => crate::password::verify(&password, &h),
        None => {
            let _ = crate::password::verify(&password, DUMMY_HASH);
            false
        }
    })
    .await
    .map_err(|_| AdminError::Internal)?;
    match account {
        Some(a) if ok => {
            if a.status == AccountStatus::Terminated {
                return Err(terminated(state));
            }
            state.limits.login_account.clear(&by_account);
            Ok(a)
        }
        // The failure was counted when it was taken.
        _ => Err(AdminError::Unauthorized(
            "The e-mail or the password is wrong.".into(),
        )),
    }
}

/// An argon2id hash of a random password, verified against when there is no account.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$KJ3ZgOM6Cz6yNqMmiR4Hc2s4bY0I0HVDdJTvTn9Fymo";

/// Starts a session for `account` under a fresh id; the `Set-Cookie` carries it.
pub async fn start_session(
    state: &AppState,
    old: &Visitor,
    account: &Account,
    second_factor: bool,
) -> Result<(String, HeaderValue), AdminError> {
    let _ = state
        .store
        .delete_session(&session_hash(&old.session_id))
        .await;
    let id = new_session_id();
    let ttl = state.conf.admin.session_ttl;
    state
        .store
        .create_session(
            &session_hash(&id),
            account.id,
            now_ms() + ttl.as_millis() as i64,
            second_factor,
        )
        .await?;
    let cookie = session_cookie(state, &id, ttl.as_secs());
    Ok((id, cookie))
}

pub async fn end_session(state: &AppState, visitor: &Visitor) -> Result<HeaderValue, AdminError> {
    state
        .store
        .delete_session(&session_hash(&visitor.session_id))
        .await?;
    Ok(session_cookie(state, "", 0))
}

/// Mails a reset link when the address has an account; says nothing either way.
pub async fn request_reset(state: &AppState, email: &str) -> Result<(), AdminError> {
    let email = check_email(email)?;
    let account = match state.store.account(&AccountRef::Email(email)).await {
        Ok(a) if a.status != AccountStatus::Terminated => a,
        Ok(_) | Err(crate::store::StoreError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let key = format!("mail:{}", account.id);
    if state.limits.mail.take(&key).is_err() {
        return Ok(());
    }
    let bound = state
        .store
        .password_hash(account.id)
        .await?
        .unwrap_or_default();
    let expires = now_ms() + RESET_TTL.as_millis() as i64;
    let token = state
        .signer
        .link_token("reset", account.id, expires, &bound);
    let letter = Letter::new("Reset your password")
        .para(format!(
            "Someone (hopefully you) asked to reset the password of your {} account.",
            state.conf.brand.product_name
        ))
        .link(
            "Choose a new password within one hour here",
            link(state, "/password/reset", &token),
        )
        .para("If it was not you, ignore this mail: your password stays as it is.");
    notify::send(state, &account.email, "reset", letter).await
}

pub async fn reset_password(
    state: &AppState,
    token: &str,
    password: String,
    totp_code: Option<&str>,
) -> Result<Account, AdminError> {
    let t = LinkToken::parse(token).map_err(|e| link_refused(e, "reset"))?;
    let bound = match state.store.password_hash(t.account_id).await {
        Ok(h) => h.unwrap_or_default(),
        Err(crate::store::StoreError::NotFound { .. }) => {
            return Err(link_refused(LinkError::Invalid, "reset"));
        }
        Err(e) => return Err(e.into()),
    };
    state
        .signer
        .check_link("reset", &t, &bound, now_ms())
        .map_err(|e| link_refused(e, "reset"))?;
    // The mailbox alone does not change the password of an account with 2FA on.
    super::security::require_code_if_on(
        state,
        t.account_id,
        totp_code,
        "This account has two-factor authentication on: enter a code from your authenticator app, or a recovery code.",
    )
    .await?;
    let hash = hash_password(password).await?;
    state
        .store
        .set_password(t.account_id, &hash, "self")
        .await?;
    // Whoever can read the mailbox has now proved the address too.
    Ok(state.store.mark_verified(t.account_id).await?)
}

/// Only same-origin paths: `next=https://evil.example`, `//evil.example`, `/\evil.example` or a
/// path with a tab or line break in it (`/\t/evil.example`, which browsers read as
/// `//evil.example`) must not turn the log-in into a redirector; anything else goes to the
/// dashboard. Visible ASCII only, so the path is always a valid `Location`.
pub fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n[1..].starts_with(['/', '\\'])
                && n.len() <= 2048
                && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') =>
        {
            n
        }
        _ => "/dashboard",
    }
}

pub fn account_json(state: &AppState, a: &Account) -> Value {
    json!({
        "id": a.id,
        "email": a.email,
        "email_verified": a.is_verified(),
        "status": a.status.as_str(),
        "role": a.role.as_str(),
        "balance_usd": a.credit().decimal(),
        "balance_nano_usd": a.credit().nanos(),
        "low_balance": a.credit() < state.conf.admin.low_balance_warning,
        "created_at_ms": a.created_at,
    })
}

// ── Pages ─────────────────────────────────────────────────────────────────────────────────────

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Credentials {
    email: String,
    password: String,
    next: Option<String>,
    /// The second factor, for the JSON log-in of an account with 2FA on.
    totp_code: Option<String>,
}

fn signup_form(state: &AppState, v: &Visitor, email: &str, error: Option<&str>) -> Markup {
    page(
        state,
        "Sign up",
        Some(v),
        html! {
            section.card {
                h1 { "Create your account" }
                (form_error(error))
                form.stack method="post" action="/signup" {
                    (csrf_field(v))
                    label { "E-mail" input type="email" name="email" value=(email) required autocomplete="email"; }
                    label { "Password (at least 10 characters, letters and digits or symbols)" input type="password" name="password" required minlength="10" autocomplete="new-password"; }
                    button type="submit" { "Sign up" }
                }
                p.muted { "By signing up you accept the " a href="/policies/terms" { "Terms of Service" } " and the " a href="/policies/acceptable-use" { "Acceptable Use Policy" } ". Already have an account? " a href="/login" { "Log in" } "." }
            }
        },
    )
}

pub async fn signup_page(State(state): State<AppState>, v: Visitor) -> Response {
    if v.account.is_some() {
        return Redirect::to("/dashboard").into_response();
    }
    signup_form(&state, &v, "", None).into_response()
}

pub async fn signup_submit(
    State(state): State<AppState>,
    v: Visitor,
    Form(f): Form<Credentials>,
) -> Response {
    match register(&state, &f.email, f.password).await {
        Ok(()) => page(
            &state,
            "Check your mailbox",
            Some(&v),
            html! {
                section.card {
                    h1 { "Check your mailbox" }
                    p.success #signed-up role="status" { (SIGNED_UP) }
                    p.muted { "No mail after a few minutes? Look in the spam folder, or " a href="/signup" { "sign up again" } "." }
                    p { a.button href="/login" { "Log in" } }
                }
            },
        )
        .into_response(),
        Err(e) => (
            e.status(),
            signup_form(&state, &v, &f.email, Some(&e.message())),
        )
            .into_response(),
    }
}

pub(super) fn signed_in_redirect(cookie: HeaderValue, to: &str) -> Response {
    let mut r = Redirect::to(to).into_response();
    r.headers_mut().append(header::SET_COOKIE, cookie);
    r
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LoginQuery {
    next: Option<String>,
    reset: Option<String>,
}

fn login_form(
    state: &AppState,
    v: &Visitor,
    email: &str,
    next: &str,
    error: Option<&str>,
    notice: Option<&str>,
) -> Markup {
    page(
        state,
        "Log in",
        Some(v),
        html! {
            section.card {
                h1 { "Log in" }
                @if let Some(n) = notice { p.success { (n) } }
                (form_error(error))
                form.stack method="post" action="/login" {
                    (csrf_field(v))
                    input type="hidden" name="next" value=(next);
                    label { "E-mail" input type="email" name="email" value=(email) required autocomplete="email"; }
                    label { "Password" input type="password" name="password" required autocomplete="current-password"; }
                    button type="submit" { "Log in" }
                }
                p.muted { a href="/password/forgot" { "Forgot your password?" } " · New here? " a href="/signup" { "Create an account" } }
            }
        },
    )
}

pub async fn login_page(
    State(state): State<AppState>,
    v: Visitor,
    Query(q): Query<LoginQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref()).to_owned();
    if v.account.is_some() {
        return Redirect::to(&next).into_response();
    }
    let notice = q
        .reset
        .is_some()
        .then_some("Your password is changed. Log in with the new one.");
    login_form(&state, &v, "", &next, None, notice).into_response()
}

pub async fn login_submit(
    State(state): State<AppState>,
    v: Visitor,
    ext: Extensions,
    Form(f): Form<Credentials>,
) -> Response {
    let next = safe_next(f.next.as_deref()).to_owned();
    match authenticate(&state, &f.email, &f.password, &client_ip(&ext)).await {
        Ok(account) => match second_step(&state, &v, &account).await {
            Ok(Some(ticket)) => {
                super::security::code_form(&state, &v, &ticket, &next, None).into_response()
            }
            Ok(None) => match start_session(&state, &v, &account, false).await {
                Ok((_, cookie)) => signed_in_redirect(cookie, &next),
                Err(e) => e.into_page(Some(&v)),
            },
            Err(e) => e.into_page(Some(&v)),
        },
        Err(e) => {
            let mut r = (
                e.status(),
                login_form(&state, &v, &f.email, &next, Some(&e.message()), None),
            )
                .into_response();
            if let AdminError::TooMany { retry_after_s, .. } = e {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            r
        }
    }
}

/// A ticket for the second step of the log-in when the account has 2FA on.
async fn second_step(
    state: &AppState,
    v: &Visitor,
    account: &Account,
) -> Result<Option<String>, AdminError> {
    if super::security::is_on(state, account.id).await? {
        Ok(Some(
            super::security::login_ticket(state, v, account).await?,
        ))
    } else {
        Ok(None)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CodeLogin {
    ticket: String,
    totp_code: String,
    next: Option<String>,
}

/// The log-in's second step: the ticket from the first and a code.
pub async fn login_code_submit(
    State(state): State<AppState>,
    v: Visitor,
    Form(f): Form<CodeLogin>,
) -> Response {
    let next = safe_next(f.next.as_deref()).to_owned();
    let signed = async {
        let account = super::security::redeem_ticket(&state, &v, &f.ticket, &f.totp_code).await?;
        if account.status == AccountStatus::Terminated {
            return Err(terminated(&state));
        }
        start_session(&state, &v, &account, true).await
    }
    .await;
    match signed {
        Ok((_, cookie)) => signed_in_redirect(cookie, &next),
        Err(e @ AdminError::Unauthorized(_)) => {
            let mut r = login_form(&state, &v, "", &next, Some(&e.message()), None).into_response();
            *r.status_mut() = e.status();
            r
        }
        Err(e) => {
            let mut r =
                super::security::code_form(&state, &v, &f.ticket, &next, Some(&e.message()))
                    .into_response();
            *r.status_mut() = e.status();
            if let AdminError::TooMany { retry_after_s, .. } = e {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            r
        }
    }
}

fn terminated(state: &AppState) -> AdminError {
    AdminError::Forbidden(format!(
        "This account has been terminated under the Acceptable Use Policy. Contact {}.",
        state.conf.admin.support_email
    ))
}

pub async fn logout_submit(State(state): State<AppState>, v: Visitor) -> Response {
    match end_session(&state, &v).await {
        Ok(cookie) => signed_in_redirect(cookie, "/"),
        Err(e) => e.into_page(Some(&v)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TokenQuery {
    token: String,
}

pub async fn verify_page(
    State(state): State<AppState>,
    v: Visitor,
    Query(q): Query<TokenQuery>,
) -> Response {
    match verify_email(&state, &q.token).await {
        Ok(a) => page(&state, "E-mail verified", Some(&v), html! {
            section.card {
                h1 { "Your e-mail is verified" }
                p { (a.email) " is confirmed. You can now buy credits and use your API keys." }
                p { @if v.account.is_some() { a.button href="/dashboard" { "Go to the dashboard" } } @else { a.button href="/login" { "Log in" } } }
            }
        }).into_response(),
        Err(e) => e.into_page(Some(&v)),
    }
}

pub async fn resend_submit(State(state): State<AppState>, s: SignedIn) -> Response {
    match send_verification(&state, &s.account).await {
        Ok(()) => Redirect::to("/dashboard?sent=1").into_response(),
        Err(e) => e.into_page(Some(&s.visitor)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct EmailForm {
    email: String,
}

fn forgot_form(state: &AppState, v: &Visitor, error: Option<&str>, sent: bool) -> Markup {
    page(
        state,
        "Reset your password",
        Some(v),
        html! {
            section.card {
                h1 { "Reset your password" }
                @if sent { p.success { "If an account uses that address, we sent it a link to choose a new password. It works for one hour." } }
                (form_error(error))
                form.stack method="post" action="/password/forgot" {
                    (csrf_field(v))
                    label { "E-mail" input type="email" name="email" required autocomplete="email"; }
                    button type="submit" { "Send the link" }
                }
            }
        },
    )
}

pub async fn forgot_page(State(state): State<AppState>, v: Visitor) -> Markup {
    forgot_form(&state, &v, None, false)
}

pub async fn forgot_submit(
    State(state): State<AppState>,
    v: Visitor,
    Form(f): Form<EmailForm>,
) -> Response {
    match request_reset(&state, &f.email).await {
        Ok(()) => forgot_form(&state, &v, None, true).into_response(),
        Err(e) => (
            e.status(),
            forgot_form(&state, &v, Some(&e.message()), false),
        )
            .into_response(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ResetForm {
    token: String,
    password: String,
    totp_code: Option<String>,
}

fn reset_form(state: &AppState, v: &Visitor, token: &str, error: Option<&str>) -> Markup {
    page(
        state,
        "Choose a new password",
        Some(v),
        html! {
            section.card {
                h1 { "Choose a new password" }
                (form_error(error))
                form.stack method="post" action="/password/reset" {
                    (csrf_field(v))
                    input type="hidden" name="token" value=(token);
                    label { "New password" input type="password" name="password" required minlength="10" autocomplete="new-password"; }
                    label { "Authentication code (only if you turned on two-factor authentication)" input type="text" name="totp_code" inputmode="numeric" autocomplete="one-time-code" maxlength="16"; }
                    button type="submit" { "Set the password" }
                }
            }
        },
    )
}

pub async fn reset_page(
    State(state): State<AppState>,
    v: Visitor,
    Query(q): Query<TokenQuery>,
) -> Markup {
    reset_form(&state, &v, &q.token, None)
}

pub async fn reset_submit(
    State(state): State<AppState>,
    v: Visitor,
    Form(f): Form<ResetForm>,
) -> Response {
    match reset_password(&state, &f.token, f.password, f.totp_code.as_deref()).await {
        Ok(_) => Redirect::to("/login?reset=1").into_response(),
        Err(e) => (
            e.status(),
            reset_form(&state, &v, &f.token, Some(&e.message())),
        )
            .into_response(),
    }
}

// ── JSON API ──────────────────────────────────────────────────────────────────────────────────

fn with_cookie(status: StatusCode, body: Value, cookie: HeaderValue) -> Response {
    let mut r = (status, Json(body)).into_response();
    r.headers_mut().append(header::SET_COOKIE, cookie);
    r
}

pub async fn api_signup(
    State(state): State<AppState>,
    Json(f): Json<Credentials>,
) -> Result<Response, ApiError> {
    register(&state, &f.email, f.password).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"status": "verification_sent", "message": SIGNED_UP})),
    )
        .into_response())
}

pub async fn api_login(
    State(state): State<AppState>,
    v: Visitor,
    ext: Extensions,
    Json(f): Json<Credentials>,
) -> Result<Response, ApiError> {
    let account = authenticate(&state, &f.email, &f.password, &client_ip(&ext)).await?;
    let account = state.store.with_leases(account).await?;
    let two_factor = super::security::require_code_if_on(
        &state,
        account.id,
        f.totp_code.as_deref(),
        "This account has two-factor authentication on: send `totp_code` (a code from the authenticator app, or a recovery code) with the e-mail and password.",
    )
    .await?;
    let (id, cookie) = start_session(&state, &v, &account, two_factor).await?;
    Ok(with_cookie(
        StatusCode::OK,
        json!({"account": account_json(&state, &account), "csrf_token": state.signer.csrf_token(&id)}),
        cookie,
    ))
}

pub async fn api_logout(State(state): State<AppState>, v: Visitor) -> Result<Response, ApiError> {
    let cookie = end_session(&state, &v).await?;
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().append(header::SET_COOKIE, cookie);
    Ok(r)
}

pub async fn api_me(State(state): State<AppState>, s: SignedIn) -> Json<Value> {
    Json(json!({"account": account_json(&state, &s.account), "csrf_token": s.visitor.csrf}))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TokenBody {
    token: String,
    password: String,
    totp_code: Option<String>,
}

pub async fn api_verify(
    State(state): State<AppState>,
    Json(b): Json<TokenBody>,
) -> Result<Json<Value>, ApiError> {
    let a = verify_email(&state, &b.token).await?;
    Ok(Json(json!({"account": account_json(&state, &a)})))
}

pub async fn api_resend(
    State(state): State<AppState>,
    s: SignedIn,
) -> Result<StatusCode, ApiError> {
    send_verification(&state, &s.account).await?;
    Ok(StatusCode::ACCEPTED)
}

pub async fn api_forgot(
    State(state): State<AppState>,
    Json(f): Json<EmailForm>,
) -> Result<StatusCode, ApiError> {
    request_reset(&state, &f.email).await?;
    Ok(StatusCode::ACCEPTED)
}

pub async fn api_reset(
    State(state): State<AppState>,
    Json(b): Json<TokenBody>,
) -> Result<StatusCode, ApiError> {
    reset_password(&state, &b.token, b.password, b.totp_code.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}
