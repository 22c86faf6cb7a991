//! The operator's side (role `operator`): accounts with search, balance and status; suspend,
//! reactivate or terminate an account or a key with a reason kept in the audit log; grant or
//! adjust credits; revenue, billed usage, provider cost and margin per day and tier; and each
//! upstream model's health from the hourly usage roll-ups. Every route checks the role. The
//! audit log and the exports for accounting are in `super::exports`.

use super::error::{AdminError, ApiError};
use super::pages::{csrf_field, form_error, page};
use super::server::AppState;
use super::web::{SignedIn, Visitor, is_api};
use crate::money::NanoUsd;
use crate::store::{
    Account, AccountRef, AccountStatus, KeyStatus, LedgerKind, NewLedgerEntry, StoreError,
};
use crate::time::{format_date, format_utc, now_ms, parse_date};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

use crate::time::DAY_MS;

/// A signed-in operator; anyone else gets 403 (or the log-in page when not signed in).
pub struct Operator(pub SignedIn);

impl<S: Send + Sync> FromRequestParts<S> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &S) -> Result<Self, Self::Rejection> {
        let signed = SignedIn::from_request_parts(parts, s).await?;
        let api = is_api(parts.uri.path());
        if signed.account.role == crate::store::Role::Operator {
            if super::security::operator_cleared(&signed.visitor) {
                return Ok(Operator(signed));
            }
            // Operators can grant credit: no operator page without a second factor.
            if !api && !signed.visitor.two_factor {
                return Err(Redirect::to("/account/security?required=operator").into_response());
            }
            let e = AdminError::Forbidden(if signed.visitor.two_factor {
                "Log out and log in again with your authentication code to open the operator pages."
                    .into()
            } else {
                "Operator accounts must turn on two-factor authentication (Account security in the dashboard) before the operator pages and API open.".into()
            });
            return Err(if api {
                e.into_json()
            } else {
                e.into_page(Some(&signed.visitor))
            });
        }
        let e = AdminError::Forbidden("This is for operators only.".into());
        Err(if api {
            e.into_json()
        } else {
            e.into_page(Some(&signed.visitor))
        })
    }
}

fn actor(o: &Operator) -> String {
    format!("operator:{}", o.0.account.email)
}

// ── Actions ───────────────────────────────────────────────────────────────────────────────────

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StatusForm {
    status: String,
    reason: String,
    /// For a destructive change: the account's e-mail, typed by the operator.
    confirm: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CreditsForm {
    amount_usd: String,
    reason: String,
    /// For an adjustment above `admin.confirm_credits_above_cents`: the account's e-mail.
    confirm: String,
}

/// A destructive action goes ahead only when the operator typed the account's e-mail.
fn confirmed(confirm: &str, account_email: &str, what: &str) -> Result<(), AdminError> {
    if crate::email::normalize(confirm.trim()) == account_email {
        Ok(())
    } else {
        Err(AdminError::NeedsConfirmation(format!(
            "{what} To go ahead, type the account's e-mail address ({account_email})."
        )))
    }
}

fn need_reason(reason: &str) -> Result<&str, AdminError> {
    let r = reason.trim();
    if r.is_empty() || r.chars().count() > 1000 {
        Err(AdminError::invalid(
            "reason",
            "Give a reason (it goes to the audit log), up to 1,000 characters.",
        ))
    } else {
        Ok(r)
    }
}

pub async fn set_account_status(
    state: &AppState,
    o: &Operator,
    id: i64,
    f: &StatusForm,
) -> Result<Account, AdminError> {
    let status = match f.status.as_str() {
        "suspended" => AccountStatus::Suspended,
        "active" => AccountStatus::Active,
        "terminated" => AccountStatus::Terminated,
        _ => {
            return Err(AdminError::invalid(
                "status",
                "Status is active, suspended or terminated.",
            ));
        }
    };
    let reason = need_reason(&f.reason)?;
    if id == o.0.account.id && status != AccountStatus::Active {
        return Err(AdminError::invalid(
            "status",
            "You cannot suspend or terminate your own account.",
        ));
    }
    if status == AccountStatus::Terminated {
        let a = state.store.account(&AccountRef::Id(id)).await?;
        confirmed(
            &f.confirm,
            &a.email,
            "Terminating an account is for good: its keys stop and it cannot log in again.",
        )?;
    }
    let a = state
        .store
        .set_account_status(id, status, &actor(o), Some(reason))
        .await?;
    super::notify::status_changed(state, &a, Some(reason)).await;
    Ok(a)
}

pub async fn adjust_credits(
    state: &AppState,
    o: &Operator,
    id: i64,
    f: &CreditsForm,
) -> Result<Account, AdminError> {
    let reason = need_reason(&f.reason)?;
    let text = f.amount_usd.trim().trim_start_matches('$');
    let amount = text
        .parse::<NanoUsd>()
        .ok()
        .filter(|a| *a != NanoUsd::ZERO)
        .ok_or_else(|| {
            AdminError::invalid(
                "amount_usd",
                "Enter a non-zero amount in USD, negative to take credits away (e.g. 10 or -2.50).",
            )
        })?;
    let size = if amount.is_negative() {
        NanoUsd::ZERO.checked_sub(amount)?
    } else {
        amount
    };
    if size > state.conf.admin.confirm_credits_above {
        let a = state.store.account(&AccountRef::Id(id)).await?;
        confirmed(
            &f.confirm,
            &a.email,
            &format!(
                "{amount} is more than {} (admin.confirm_credits_above_cents).",
                state.conf.admin.confirm_credits_above
            ),
        )?;
    }
    let entry = NewLedgerEntry {
        account_id: id,
        kind: LedgerKind::Adjustment,
        amount,
        external_ref: format!(
            "operator:{}:{}",
            now_ms(),
            hex::encode(rand::random::<[u8; 6]>())
        ),
        actor: Some(actor(o)),
        reason: Some(reason.to_owned()),
    };
    match state.store.append_ledger(&entry).await {
        Ok(_) => Ok(state.store.account(&AccountRef::Id(id)).await?),
        Err(StoreError::InsufficientBalance { available, .. }) => Err(AdminError::invalid(
            "amount_usd",
            format!("The balance is {available}; it cannot go below zero."),
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn set_key_status(
    state: &AppState,
    o: &Operator,
    key_id: i64,
    f: &StatusForm,
) -> Result<crate::store::ApiKey, AdminError> {
    let status = match f.status.as_str() {
        "suspended" => KeyStatus::Suspended,
        "active" => KeyStatus::Active,
        "revoked" => KeyStatus::Revoked,
        _ => {
            return Err(AdminError::invalid(
                "status",
                "Status is active, suspended or revoked.",
            ));
        }
    };
    let reason = need_reason(&f.reason)?;
    if status == KeyStatus::Revoked {
        let key = state.store.key(key_id).await?;
        let a = state.store.account(&AccountRef::Id(key.account_id)).await?;
        confirmed(
            &f.confirm,
            &a.email,
            &format!(
                "Revoking the key “{}” is for good: it never works again.",
                key.name
            ),
        )?;
    }
    state
        .store
        .set_key_status(key_id, status, &actor(o), Some(reason))
        .await
        .map_err(|e| match e {
            StoreError::KeyRevoked(_) => {
                AdminError::invalid("status", "This key is revoked for good.")
            }
            other => other.into(),
        })
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LimitsForm {
    #[serde(deserialize_with = "super::keys_web::lenient")]
    requests_per_minute: Option<String>,
    #[serde(deserialize_with = "super::keys_web::lenient")]
    tokens_per_minute: Option<String>,
    #[serde(deserialize_with = "super::keys_web::lenient")]
    in_flight: Option<String>,
    /// Throttles: for how long; `0` or `lift` in `action` lifts it.
    #[serde(deserialize_with = "super::keys_web::lenient")]
    minutes: Option<String>,
    action: Option<String>,
    reason: String,
}

fn limit_field(field: &'static str, v: &Option<String>) -> Result<Option<i64>, AdminError> {
    match v {
        None => Ok(None),
        Some(t) => match t.parse::<i64>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(AdminError::invalid(
                field,
                format!(
                    "{t:?} is not a limit: use a whole number of 1 or more, or leave it empty for the default."
                ),
            )),
        },
    }
}

/// Sets an account's or a key's own limits (operators are not bound by `[limits.key_max]`).
pub async fn set_limits(
    state: &AppState,
    o: &Operator,
    target: crate::store::Target,
    f: &LimitsForm,
) -> Result<(), AdminError> {
    let reason = need_reason(&f.reason)?;
    let limits = crate::store::LimitOverrides {
        requests_per_minute: limit_field("requests_per_minute", &f.requests_per_minute)?,
        tokens_per_minute: limit_field("tokens_per_minute", &f.tokens_per_minute)?,
        in_flight: limit_field("in_flight", &f.in_flight)?,
    };
    state
        .store
        .set_limits(target, &limits, &actor(o), Some(reason))
        .await?;
    Ok(())
}

/// Throttles (or lifts the throttle of) an account or a key.
pub async fn throttle(
    state: &AppState,
    o: &Operator,
    target: crate::store::Target,
    f: &LimitsForm,
) -> Result<(), AdminError> {
    let reason = need_reason(&f.reason)?;
    let lift = f.action.as_deref() == Some("lift") || f.minutes.as_deref() == Some("0");
    let t = if lift {
        crate::store::Throttle::default()
    } else {
        let minutes = match f.minutes.as_deref().map(str::parse::<i64>) {
            Some(Ok(m)) if (1..=60 * 24 * 366).contains(&m) => m,
            _ => {
                return Err(AdminError::invalid(
                    "minutes",
                    "Throttle for 1 minute to a year (in minutes), or lift it.",
                ));
            }
        };
        let t = crate::store::Throttle {
            requests_per_minute: limit_field("requests_per_minute", &f.requests_per_minute)?,
            tokens_per_minute: limit_field("tokens_per_minute", &f.tokens_per_minute)?,
            until_ms: Some(now_ms() + minutes * 60_000),
        };
        if t.requests_per_minute.is_none() && t.tokens_per_minute.is_none() {
            return Err(AdminError::invalid(
                "requests_per_minute",
                "A throttle lowers requests or tokens per minute: give at least one.",
            ));
        }
        t
    };
    state
        .store
        .set_throttle(target, &t, &actor(o), Some(reason))
        .await?;
    Ok(())
}

// ── Pages ─────────────────────────────────────────────────────────────────────────────────────

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Search {
    q: String,
}

fn account_row(a: &Account) -> Markup {
    html! {
        tr {
            td { a href={ "/operator/accounts/" (a.id) } { (a.email) } }
            td { (a.role.as_str()) }
            td class={ "status-" (a.status.as_str()) } { (a.status.as_str()) }
            td { @if a.is_verified() { "yes" } @else { "no" } }
            td { (super::pages::money(a.balance)) }
            td { (format_utc(a.created_at)) }
        }
    }
}

pub async fn accounts(
    State(state): State<AppState>,
    o: Operator,
    Query(q): Query<Search>,
) -> Response {
    let rows = match state.store.search_accounts(&q.q, 200).await {
        Ok(r) => r,
        Err(e) => return AdminError::from(e).into_page(Some(&o.0.visitor)),
    };
    page(&state, "Operator", Some(&o.0.visitor), html! {
        (operator_nav())
        section.card {
            h1 { "Accounts" }
            form.row method="get" action="/operator" {
                label { "E-mail contains" input type="search" name="q" value=(q.q); }
                button type="submit" { "Search" }
            }
            table #accounts {
                thead { tr { th { "E-mail" } th { "Role" } th { "Status" } th { "Verified" } th { "Balance (not leased)" } th { "Created" } } }
                tbody { @for a in &rows { (account_row(a)) } }
            }
        }
    })
    .into_response()
}

pub(super) fn operator_nav() -> Markup {
    html! {
        nav.sub aria-label="Operator" {
            a href="/operator" { "Accounts" } " · "
            a href="/operator/refunds" { "Refund queue" } " · "
            a href="/operator/revenue" { "Revenue and margin" } " · "
            a href="/operator/upstreams" { "Upstream status" } " · "
            a href="/operator/audit" { "Audit log and exports" }
        }
    }
}

async fn account_page(
    state: &AppState,
    v: &Visitor,
    id: i64,
    error: Option<&str>,
) -> Result<Markup, AdminError> {
    let a = state.store.account(&AccountRef::Id(id)).await?;
    let a = state.store.with_leases(a).await?;
    let keys = state.store.list_keys(id).await?;
    let audit = state.store.audit_log(id).await?;
    let usage = state.store.usage_page(id, None, 20).await?;
    let ledger = state.store.ledger(id, 20).await?;
    Ok(page(
        state,
        &a.email,
        Some(v),
        html! {
            (operator_nav())
            section.card {
                h1 { (a.email) }
                (form_error(error))
                p { "Status: " strong #account-status { (a.status.as_str()) } " · role " (a.role.as_str()) " · verified " (if a.is_verified() { "yes" } else { "no" }) " · balance " strong #account-balance { (super::pages::money(a.credit())) } @if a.leased.is_positive() { " (" (super::pages::money(a.leased)) " leased by gateways)" } }
                form.row method="post" action={ "/operator/accounts/" (a.id) "/status" } {
                    (csrf_field(v))
                    label { "New status" select name="status" required {
                        option value="" selected disabled { "Choose…" }
                        @if a.status != AccountStatus::Suspended { option value="suspended" { "Suspend" } }
                        @if a.status != AccountStatus::Active { option value="active" { "Reactivate" } }
                        @if a.status != AccountStatus::Terminated { option value="terminated" { "Terminate (asks to confirm)" } }
                    } }
                    label { "Reason (audit log)" input type="text" name="reason" required; }
                    button.danger type="submit" { "Change status" }
                }
                form.row method="post" action={ "/operator/accounts/" (a.id) "/limits" } {
                (csrf_field(v))
                label { "Requests / min" input type="number" min="1" name="requests_per_minute" value=(a.limits.requests_per_minute.map(|n| n.to_string()).unwrap_or_default()) placeholder="default"; }
                label { "Tokens / min" input type="number" min="1" name="tokens_per_minute" value=(a.limits.tokens_per_minute.map(|n| n.to_string()).unwrap_or_default()) placeholder="default"; }
                label { "In flight" input type="number" min="1" name="in_flight" value=(a.limits.in_flight.map(|n| n.to_string()).unwrap_or_default()) placeholder="default"; }
                label { "Reason (audit log)" input type="text" name="reason" required; }
                button.secondary type="submit" { "Set account limits" }
            }
            form.row method="post" action={ "/operator/accounts/" (a.id) "/throttle" } {
                (csrf_field(v))
                @if a.throttle.active_at(now_ms()) {
                    p #throttled { "Throttled until " (a.throttle.until_ms.map(format_utc).unwrap_or_default()) " · " (a.throttle.requests_per_minute.map(|n| n.to_string()).unwrap_or_else(|| "—".into())) " req/min · " (a.throttle.tokens_per_minute.map(|n| n.to_string()).unwrap_or_else(|| "—".into())) " tok/min" }
                }
                label { "Throttle to req / min" input type="number" min="1" name="requests_per_minute"; }
                label { "tok / min" input type="number" min="1" name="tokens_per_minute"; }
                label { "for minutes" input type="number" min="1" name="minutes" value="60"; }
                label { "Reason (audit log)" input type="text" name="reason" required; }
                button.secondary type="submit" name="action" value="throttle" { "Throttle" }
                button.secondary type="submit" name="action" value="lift" { "Lift throttle" }
            }
            form.row method="post" action={ "/operator/accounts/" (a.id) "/credits" } {
                    (csrf_field(v))
                    label { "Credits in USD (negative takes away)" input type="text" name="amount_usd" required placeholder="10.00"; }
                    label { "Reason (audit log)" input type="text" name="reason" required; }
                    button type="submit" { "Grant or adjust" }
                }
            }
            section.card {
                h2 { "Keys" }
                table #operator-keys {
                    thead { tr { th { "Name" } th { "Key" } th { "Status" } th { "Last used" } th {} } }
                    tbody {
                        @for k in &keys {
                            tr {
                                td { (k.name) }
                                td { code { (k.display_prefix) "…" } }
                                td class={ "status-" (k.status.as_str()) } { (k.status.as_str()) }
                                td { (k.last_used_at.map(format_utc).unwrap_or_else(|| "—".into())) }
                                td {
                                    @if k.status != KeyStatus::Revoked {
                                        form.row method="post" action={ "/operator/keys/" (k.id) "/status" } {
                                            (csrf_field(v))
                                            select name="status" required aria-label={ "New status for the key " (k.name) } {
                                                option value="" selected disabled { "Choose…" }
                                                @if k.status != KeyStatus::Suspended { option value="suspended" { "Suspend" } }
                                                @if k.status != KeyStatus::Active { option value="active" { "Reactivate" } }
                                                option value="revoked" { "Revoke (asks to confirm)" }
                                            }
                                            input type="text" name="reason" required placeholder="reason" aria-label={ "Reason for the key " (k.name) " (audit log)" };
                                            button.secondary type="submit" { "Apply" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section.card {
                h2 { "Ledger" }
                table { tbody { @for e in &ledger { tr { td { (format_utc(e.created_at)) } td { (e.kind.as_str()) } td { (e.amount) } td { (e.external_ref) } td { (e.reason.as_deref().unwrap_or("")) } } } } }
            }
            section.card {
                h2 { "Audit log" }
                table #audit { tbody { @for e in &audit { tr { td { (format_utc(e.created_at)) } td { (e.actor) } td { (e.action) } td { (e.reason.as_deref().unwrap_or("")) } } } } }
            }
            section.card { h2 { "Recent requests" } (super::dashboard::requests_table(&usage)) }
        },
    ))
}

pub async fn account(State(state): State<AppState>, o: Operator, Path(id): Path<i64>) -> Response {
    match account_page(&state, &o.0.visitor, id, None).await {
        Ok(m) => m.into_response(),
        Err(e) => e.into_page(Some(&o.0.visitor)),
    }
}

async fn back_to_account<T>(
    state: &AppState,
    o: &Operator,
    id: i64,
    r: Result<T, AdminError>,
) -> Response {
    match r {
        Ok(_) => Redirect::to(&format!("/operator/accounts/{id}")).into_response(),
        Err(e) => match account_page(state, &o.0.visitor, id, Some(&e.message())).await {
            Ok(m) => (e.status(), m).into_response(),
            Err(e2) => e2.into_page(Some(&o.0.visitor)),
        },
    }
}

pub async fn account_status_submit(
    State(state): State<AppState>,
    o: Operator,
    Path(id): Path<i64>,
    Form(f): Form<StatusForm>,
) -> Response {
    let r = set_account_status(&state, &o, id, &f).await;
    if let Err(AdminError::NeedsConfirmation(m)) = &r {
        let title = match f.status.as_str() {
            "terminated" => "Terminate this account?",
            _ => "Change this account's status?",
        };
        let c = Confirm {
            title,
            message: m,
            action: format!("/operator/accounts/{id}/status"),
            fields: &[("status", &f.status)],
            reason: &f.reason,
            account_id: id,
            typed_wrong: !f.confirm.trim().is_empty(),
        };
        return confirm_page(&state, &o, c);
    }
    back_to_account(&state, &o, id, r).await
}

/// The confirmation step of a destructive action: what it does, the reason (still editable),
/// and the account's e-mail to type; the same form posts again with `confirm`.
struct Confirm<'a> {
    title: &'a str,
    message: &'a str,
    action: String,
    fields: &'a [(&'a str, &'a str)],
    reason: &'a str,
    /// The account page, for "Cancel".
    account_id: i64,
    /// Whether something was typed (and it was not the e-mail).
    typed_wrong: bool,
}

fn confirm_page(state: &AppState, o: &Operator, c: Confirm<'_>) -> Response {
    let v = &o.0.visitor;
    (
        axum::http::StatusCode::CONFLICT,
        page(state, c.title, Some(v), html! {
            (operator_nav())
            section.card.confirm #confirm {
                h1 { (c.title) }
                p.notice role="alert" { (c.message) }
                @if c.typed_wrong { p.error { "What you typed is not the account's e-mail address." } }
                form.stack method="post" action=(c.action) {
                    (csrf_field(v))
                    @for (k, val) in c.fields { input type="hidden" name=(k) value=(val); }
                    label { "Reason (audit log)" input type="text" name="reason" required value=(c.reason); }
                    label { "Type the account's e-mail address to confirm" input type="text" name="confirm" required autocomplete="off" spellcheck="false"; }
                    button.danger type="submit" { "Confirm" }
                }
                p { a href={ "/operator/accounts/" (c.account_id) } { "Cancel" } }
            }
        }),
    )
        .into_response()
}

pub async fn limits_submit(
    State(state): State<AppState>,
    o: Operator,
    Path(id): Path<i64>,
    Form(f): Form<LimitsForm>,
) -> Response {
    let r = set_limits(&state, &o, crate::store::Target::Account(id), &f).await;
    back_to_account(&state, &o, id, r).await
}

pub async fn throttle_submit(
    State(state): State<AppState>,
    o: Operator,
    Path(id): Path<i64>,
    Form(f): Form<LimitsForm>,
) -> Response {
    let r = throttle(&state, &o, crate::store::Target::Account(id), &f).await;
    back_to_account(&state, &o, id, r).await
}

pub async fn key_throttle_submit(
    State(state): State<AppState>,
    o: Operator,
    Path(key_id): Path<i64>,
    Form(f): Form<LimitsForm>,
) -> Response {
    let account_id = match state.store.key(key_id).await {
        Ok(k) => k.account_id,
        Err(e) => return AdminError::from(e).into_page(Some(&o.0.visitor)),
    };
    let r = throttle(&state, &o, crate::store::Target::Key(key_id), &f).await;
    back_to_account(&state, &o, account_id, r).await
}

pub async fn credits_submit(
    State(state): State<AppState>,
    o: Operator,
    Path(id): Path<i64>,
    Form(f): Form<CreditsForm>,
) -> Response {
    let r = adjust_credits(&state, &o, id, &f).await;
    if let Err(AdminError::NeedsConfirmation(m)) = &r {
        let c = Confirm {
            title: "Confirm this credit adjustment",
            message: m,
            action: format!("/operator/accounts/{id}/credits"),
            fields: &[("amount_usd", &f.amount_usd)],
            reason: &f.reason,
            account_id: id,
            typed_wrong: !f.confirm.trim().is_empty(),
        };
        return confirm_page(&state, &o, c);
    }
    back_to_account(&state, &o, id, r).await
}

pub async fn key_status_submit(
    State(state): State<AppState>,
    o: Operator,
    Path(key_id): Path<i64>,
    Form(f): Form<StatusForm>,
) -> Response {
    let account_id = match state.store.key(key_id).await {
        Ok(k) => k.account_id,
        Err(e) => return AdminError::from(e).into_page(Some(&o.0.visitor)),
    };
    let r = set_key_status(&state, &o, key_id, &f).await;
    if let Err(AdminError::NeedsConfirmation(m)) = &r {
        let c = Confirm {
            title: "Revoke this key?",
            message: m,
            action: format!("/operator/keys/{key_id}/status"),
            fields: &[("status", &f.status)],
            reason: &f.reason,
            account_id,
            typed_wrong: !f.confirm.trim().is_empty(),
        };
        return confirm_page(&state, &o, c);
    }
    back_to_account(&state, &o, account_id, r).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RangeQuery {
    pub(super) from: Option<String>,
    pub(super) to: Option<String>,
}

/// `[from, to)` of whole UTC days, at most 366 (default: the 30 days to today).
pub(super) fn range(q: &RangeQuery) -> Result<(i64, i64), AdminError> {
    let day = |field: &'static str, v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                parse_date(t).ok_or_else(|| {
                    AdminError::invalid(field, format!("{t:?} is not a date: use YYYY-MM-DD."))
                })
            })
            .transpose()
    };
    let to = day("to", &q.to)?.unwrap_or(now_ms().div_euclid(DAY_MS) * DAY_MS) + DAY_MS;
    let from = day("from", &q.from)?.unwrap_or(to - 30 * DAY_MS);
    if from >= to || to - from > 366 * DAY_MS {
        return Err(AdminError::invalid(
            "from",
            "Choose a range of 1 to 366 days, first day first.",
        ));
    }
    Ok((from, to))
}

/// Per day: top-ups, refunds, billed usage, provider cost, margin; and per tier over the range.
pub async fn revenue_json(state: &AppState, q: &RangeQuery) -> Result<Value, AdminError> {
    let (from, to) = range(q)?;
    let money = state.store.money_daily(from, to).await?;
    let margin = state.store.margin_daily(from, to).await?;
    let mut days: BTreeMap<i64, (NanoUsd, NanoUsd, NanoUsd, NanoUsd, i64)> = BTreeMap::new();
    for m in &money {
        let d = days.entry(m.day_start_ms).or_default();
        d.0 = m.topups;
        d.1 = m.refunds;
    }
    let mut tiers: BTreeMap<String, (NanoUsd, NanoUsd, i64)> = BTreeMap::new();
    for m in &margin {
        let d = days.entry(m.day_start_ms).or_default();
        d.2 = d.2.checked_add(m.billed)?;
        d.3 = d.3.checked_add(m.provider_cost)?;
        d.4 += m.requests;
        // A request refused before it had a tier (an unknown model) is no tier's revenue.
        if m.tier.is_empty() {
            continue;
        }
        let t = tiers.entry(m.tier.clone()).or_default();
        t.0 = t.0.checked_add(m.billed)?;
        t.1 = t.1.checked_add(m.provider_cost)?;
        t.2 += m.requests;
    }
    let margin_of =
        |b: NanoUsd, c: NanoUsd| b.checked_sub(c).map(NanoUsd::decimal).unwrap_or_default();
    Ok(json!({
        "from": format_date(from),
        "to": format_date(to - DAY_MS),
        "days": days.iter().map(|(day, (top, refund, billed, cost, n))| json!({
            "date": format_date(*day),
            "topups_usd": top.decimal(),
            "refunds_usd": refund.decimal(),
            "requests": n,
            "billed_usd": billed.decimal(),
            "provider_cost_usd": cost.decimal(),
            "margin_usd": margin_of(*billed, *cost),
        })).collect::<Vec<_>>(),
        "tiers": tiers.iter().map(|(tier, (billed, cost, n))| json!({
            "tier": tier,
            "requests": n,
            "billed_usd": billed.decimal(),
            "provider_cost_usd": cost.decimal(),
            "margin_usd": margin_of(*billed, *cost),
        })).collect::<Vec<_>>(),
    }))
}

impl From<crate::money::MoneyError> for AdminError {
    fn from(e: crate::money::MoneyError) -> Self {
        tracing::error!(error = %e, "money arithmetic in a report");
        AdminError::Internal
    }
}

pub async fn revenue(
    State(state): State<AppState>,
    o: Operator,
    Query(q): Query<RangeQuery>,
) -> Response {
    let v = match revenue_json(&state, &q).await {
        Ok(v) => v,
        Err(e) => return e.into_page(Some(&o.0.visitor)),
    };
    let cell = |r: &Value, k: &str| r[k].as_str().map(|s| format!("${s}")).unwrap_or_default();
    page(&state, "Revenue and margin", Some(&o.0.visitor), html! {
        (operator_nav())
        section.card {
            h1 { "Revenue and margin" }
            form.row method="get" action="/operator/revenue" {
                label { "From" input type="date" name="from" value=(v["from"].as_str().unwrap_or_default()); }
                label { "To" input type="date" name="to" value=(v["to"].as_str().unwrap_or_default()); }
                button type="submit" { "Show" }
            }
            h2 { "Per day" }
            table #revenue-days {
                thead { tr { th { "Day" } th { "Top-ups" } th { "Refunds" } th { "Requests" } th { "Billed usage" } th { "Provider cost" } th { "Margin" } } }
                tbody { @for d in v["days"].as_array().into_iter().flatten() { tr {
                    td { (d["date"].as_str().unwrap_or_default()) } td { (cell(d, "topups_usd")) } td { (cell(d, "refunds_usd")) }
                    td { (d["requests"]) } td { (cell(d, "billed_usd")) } td { (cell(d, "provider_cost_usd")) } td { (cell(d, "margin_usd")) }
                } } }
            }
            h2 { "Per tier" }
            table #revenue-tiers {
                thead { tr { th { "Tier" } th { "Requests" } th { "Billed usage" } th { "Provider cost" } th { "Margin" } } }
                tbody { @for t in v["tiers"].as_array().into_iter().flatten() { tr {
                    td { code { (t["tier"].as_str().unwrap_or_default()) } } td { (t["requests"]) }
                    td { (cell(t, "billed_usd")) } td { (cell(t, "provider_cost_usd")) } td { (cell(t, "margin_usd")) }
                } } }
            }
        }
    })
    .into_response()
}

/// Which upstream models the gateway has in a cool-down now, read from its metrics endpoint
/// (`gateway.metrics_listen`); `None` when the gateway does not answer.
async fn cooling_now(state: &AppState) -> Option<Vec<(String, String)>> {
    let url = format!("http://{}/metrics", state.conf.gateway.metrics_listen);
    let text = reqwest::Client::new()
        .get(url)
        .timeout(std::time::Duration::from_secs(1))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let label = |line: &str, name: &str| {
        let at = line.find(&format!("{name}=\""))? + name.len() + 2;
        Some(line[at..].split('"').next()?.to_owned())
    };
    Some(
        text.lines()
            .filter(|l| l.starts_with("duang_upstream_cooling{") && l.trim_end().ends_with(" 1"))
            .filter_map(|l| Some((label(l, "provider")?, label(l, "model")?)))
            .collect(),
    )
}

pub async fn upstreams_json(state: &AppState) -> Result<Value, AdminError> {
    // Whole hours from the roll-ups: the 24 before the current one, and the current one so far.
    let since = crate::store::hour_of(now_ms()) - DAY_MS;
    let stats = state.store.upstream_stats(since).await?;
    let cooling = cooling_now(state).await;
    let is_cooling = |p: &str, m: &str| {
        cooling
            .as_ref()
            .map(|c| c.iter().any(|(cp, cm)| cp == p && cm == m))
    };
    Ok(json!({
        "since_ms": since,
        "gateway_metrics": cooling.is_some(),
        "prepaid": super::upstream_credit::prepaid_json(state).await?,
        "data": stats.iter().map(|s| json!({
            "provider": s.provider,
            "model": s.model,
            "cooling_down": is_cooling(&s.provider, &s.model),
            "requests": s.requests,
            "errors": s.errors,
            "error_rate": if s.requests > 0 { s.errors as f64 / s.requests as f64 } else { 0.0 },
            "avg_latency_ms": s.avg_latency_ms,
            "avg_ttft_ms": s.avg_ttft_ms,
            "fallbacks": s.fallbacks,
            "last_error_at_ms": s.last_error_at,
        })).collect::<Vec<_>>(),
    }))
}

pub async fn upstreams(State(state): State<AppState>, o: Operator) -> Response {
    let v = match upstreams_json(&state).await {
        Ok(v) => v,
        Err(e) => return e.into_page(Some(&o.0.visitor)),
    };
    page(&state, "Upstream status", Some(&o.0.visitor), html! {
        (operator_nav())
        section.card {
            h1 { "Upstream status, last 24 hours" }
            p.muted #upstreams-since { "Since " (v["since_ms"].as_i64().map(format_utc).unwrap_or_default()) "." }
            p.muted { "From the usage records: an error is an answer of 500 or more (including no answer at all); a fallback is a request that needed more than one upstream. Cool-downs are as the gateway at " (state.conf.gateway.metrics_listen) " reports them now" @if v["gateway_metrics"] == false { " (it does not answer)" } "." }
            table #upstreams {
                thead { tr { th { "Provider" } th { "Model" } th { "Requests" } th { "Errors" } th { "Error rate" } th { "Avg latency" } th { "Avg first token" } th { "Fallbacks" } th { "Last error" } th { "State" } } }
                tbody { @for s in v["data"].as_array().into_iter().flatten() { tr {
                    td { (s["provider"].as_str().unwrap_or_default()) } td { code { (s["model"].as_str().unwrap_or_default()) } }
                    td { (s["requests"]) } td { (s["errors"]) }
                    td { (format!("{:.1}%", s["error_rate"].as_f64().unwrap_or(0.0) * 100.0)) }
                    td { (s["avg_latency_ms"]) " ms" }
                    td { @if let Some(t) = s["avg_ttft_ms"].as_i64() { (t) " ms" } @else { "—" } }
                    td { (s["fallbacks"]) }
                    td { (s["last_error_at_ms"].as_i64().map(format_utc).unwrap_or_else(|| "—".into())) }
                    td { @match s["cooling_down"].as_bool() { Some(true) => { strong.status-suspended { "cooling down" } } Some(false) => { "serving" } None => { "—" } } }
                } } }
            }
        }
        (super::upstream_credit::prepaid_card(&v["prepaid"]))
    })
    .into_response()
}

// ── JSON API ──────────────────────────────────────────────────────────────────────────────────

/// An account for the operator's API. `balance_usd` is the customer's whole credit, as the
/// dashboard shows it (the ledger's sum); `leased_usd` is the part gateway nodes hold for
/// requests in flight and recent use, `unleased_usd` the rest.
fn account_json(a: &Account) -> Value {
    json!({
        "id": a.id, "email": a.email, "role": a.role.as_str(), "status": a.status.as_str(),
        "email_verified": a.is_verified(), "balance_usd": a.credit().decimal(), "balance_nano_usd": a.credit().nanos(),
        "leased_usd": a.leased.decimal(), "unleased_usd": a.balance.decimal(), "created_at_ms": a.created_at,
        "requests_per_minute": a.limits.requests_per_minute, "tokens_per_minute": a.limits.tokens_per_minute, "in_flight": a.limits.in_flight,
        "throttle": (a.throttle.active_at(now_ms())).then(|| json!({"requests_per_minute": a.throttle.requests_per_minute, "tokens_per_minute": a.throttle.tokens_per_minute, "until_ms": a.throttle.until_ms})),
    })
}

pub async fn api_accounts(
    State(state): State<AppState>,
    _o: Operator,
    Query(q): Query<Search>,
) -> Result<Json<Value>, ApiError> {
    let rows = state.store.search_accounts(&q.q, 500).await?;
    let mut data = Vec::with_capacity(rows.len());
    for a in rows {
        data.push(account_json(&state.store.with_leases(a).await?));
    }
    Ok(Json(json!({ "data": data })))
}

pub async fn api_account(
    State(state): State<AppState>,
    _o: Operator,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let a = state
        .store
        .with_leases(state.store.account(&AccountRef::Id(id)).await?)
        .await?;
    let keys = state.store.list_keys(id).await?;
    let audit = state.store.audit_log(id).await?;
    let mut v = account_json(&a);
    v["keys"] = json!(
        keys.iter()
            .map(super::keys_web::key_json)
            .collect::<Vec<_>>()
    );
    v["audit"] = json!(audit.iter().map(|e| json!({"actor": e.actor, "action": e.action, "key_id": e.key_id, "reason": e.reason, "at_ms": e.created_at})).collect::<Vec<_>>());
    Ok(Json(v))
}

pub async fn api_account_status(
    State(state): State<AppState>,
    o: Operator,
    Path(id): Path<i64>,
    Json(f): Json<StatusForm>,
) -> Result<Json<Value>, ApiError> {
    let a = set_account_status(&state, &o, id, &f).await?;
    Ok(Json(account_json(&state.store.with_leases(a).await?)))
}

pub async fn api_credits(
    State(state): State<AppState>,
    o: Operator,
    Path(id): Path<i64>,
    Json(f): Json<CreditsForm>,
) -> Result<Json<Value>, ApiError> {
    let a = adjust_credits(&state, &o, id, &f).await?;
    Ok(Json(account_json(&state.store.with_leases(a).await?)))
}

pub async fn api_limits(
    State(state): State<AppState>,
    o: Operator,
    Path(id): Path<i64>,
    Json(f): Json<LimitsForm>,
) -> Result<Json<Value>, ApiError> {
    set_limits(&state, &o, crate::store::Target::Account(id), &f).await?;
    let a = state.store.account(&AccountRef::Id(id)).await?;
    Ok(Json(account_json(&state.store.with_leases(a).await?)))
}

pub async fn api_key_limits(
    State(state): State<AppState>,
    o: Operator,
    Path(id): Path<i64>,
    Json(f): Json<LimitsForm>,
) -> Result<Json<Value>, ApiError> {
    set_limits(&state, &o, crate::store::Target::Key(id), &f).await?;
    Ok(Json(super::keys_web::key_json(&state.store.key(id).await?)))
}

pub async fn api_throttle(
    State(state): State<AppState>,
    o: Operator,
    Path(id): Path<i64>,
    Json(f): Json<LimitsForm>,
) -> Result<Json<Value>, ApiError> {
    throttle(&state, &o, crate::store::Target::Account(id), &f).await?;
    let a = state.store.account(&AccountRef::Id(id)).await?;
    Ok(Json(account_json(&state.store.with_leases(a).await?)))
}

pub async fn api_key_throttle(
    State(state): State<AppState>,
    o: Operator,
    Path(id): Path<i64>,
    Json(f): Json<LimitsForm>,
) -> Result<Json<Value>, ApiError> {
    throttle(&state, &o, crate::store::Target::Key(id), &f).await?;
    Ok(Json(super::keys_web::key_json(&state.store.key(id).await?)))
}

pub async fn api_key_status(
    State(state): State<AppState>,
    o: Operator,
    Path(id): Path<i64>,
    Json(f): Json<StatusForm>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(super::keys_web::key_json(
        &set_key_status(&state, &o, id, &f).await?,
    )))
}

pub async fn api_revenue(
    State(state): State<AppState>,
    _o: Operator,
    Query(q): Query<RangeQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(revenue_json(&state, &q).await?))
}

pub async fn api_upstreams(
    State(state): State<AppState>,
    _o: Operator,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(upstreams_json(&state).await?))
}
