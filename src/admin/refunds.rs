//! Refunds, as the Refund Policy in the seeds describes them: a customer asks for unused balance
//! back with a reason; an operator approves (a Stripe refund against the original payments, and a
//! ledger entry that removes the credits, never more than the unused balance) or declines with a
//! note. Refunds and disputes Stripe reports on its own (`charge.refunded`,
//! `charge.dispute.created`) are recorded and taken from the balance once.

use super::error::{AdminError, ApiError};
use super::pages::{cents_text, csrf_field, form_error, page};
use super::server::AppState;
use super::web::SignedIn;
use crate::money::NanoUsd;
use crate::store::{Account, RefundRequest, StoreError, StripeDebit};
use crate::time::format_utc;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RefundForm {
    amount_usd: String,
    reason: String,
    /// The second factor, when the session must show it again (see `security::step_up`).
    totp_code: Option<String>,
}

/// Files a customer's request after checking it against the unused balance and the payments.
pub async fn request(
    state: &AppState,
    account: &Account,
    f: &RefundForm,
) -> Result<RefundRequest, AdminError> {
    let text = f.amount_usd.trim().trim_start_matches('$');
    let cents = text
        .parse::<NanoUsd>()
        .ok()
        .filter(|n| n.is_positive())
        .and_then(NanoUsd::as_whole_cents)
        .ok_or_else(|| {
            AdminError::invalid(
                "amount_usd",
                "Enter the amount in dollars and cents, for example 12.50.",
            )
        })?;
    if f.reason.trim().is_empty() {
        return Err(AdminError::invalid(
            "reason",
            "Say why you want the refund (the Refund Policy asks for a reason).",
        ));
    }
    match state
        .store
        .create_refund_request(account.id, cents, &f.reason)
        .await
    {
        Ok(r) => {
            super::notify::refund_requested(state, &account.email, r.amount_cents, &r.reason).await;
            Ok(r)
        }
        Err(StoreError::InsufficientBalance { available, .. }) => Err(AdminError::invalid(
            "amount_usd",
            format!(
                "You can ask for at most your unused balance, {available}. Credits already used are not refundable."
            ),
        )),
        Err(StoreError::Invalid(m)) => Err(AdminError::invalid("amount_usd", capital(&m))),
        Err(e) => Err(e.into()),
    }
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| format!("{}{}.", f.to_uppercase(), c.as_str()))
        .unwrap_or_default()
}

/// An operator's approval: take the credits, then pay out through Stripe.
pub async fn approve(
    state: &AppState,
    operator: &Account,
    id: i64,
) -> Result<RefundRequest, AdminError> {
    let Some(client) = &state.stripe else {
        return Err(AdminError::Unavailable(
            "Stripe is not enabled: refunds cannot be paid out.".into(),
        ));
    };
    let actor = format!("operator:{}", operator.email);
    let allocations = state.store.begin_refund(id, &actor).await.map_err(|e| match e {
        StoreError::InsufficientBalance { needed, available } => AdminError::invalid(
            "request",
            format!("The account's unused balance is now {available}, less than the {needed} requested: decline it, or ask the customer for a new request."),
        ),
        other => other.into(),
    })?;
    let mut results = Vec::new();
    for a in allocations {
        let key = format!("refund-{id}-{}", a.session_id);
        let r = client
            .create_refund(&a.payment_intent, a.cents, &key)
            .await
            .map(|refund| refund.id)
            .map_err(|e| {
                tracing::error!(request = id, payment = %a.payment_intent, error = %e, "Stripe refund failed");
                e.to_string()
            });
        results.push((a, r));
    }
    let r = state.store.finish_refund(id, &results).await?;
    if r.status == "approved" {
        super::notify::refund_decided(state, &r.email, r.amount_cents, true, "").await;
    }
    Ok(r)
}

/// `charge.refunded` and `charge.dispute.created`, from the webhook.
pub async fn stripe_debit_event(
    state: &AppState,
    event_id: &str,
    kind: &str,
    o: &Value,
) -> Result<Value, StoreError> {
    let pi = o["payment_intent"].as_str().unwrap_or_default();
    let outcome = if kind == "charge.refunded" {
        let total = o["amount_refunded"].as_i64().unwrap_or(0);
        state.store.apply_stripe_refund(event_id, pi, total).await?
    } else {
        let dispute = o["id"].as_str().unwrap_or_default();
        let amount = o["amount"].as_i64().unwrap_or(0);
        let reason = o["reason"].as_str().unwrap_or("unknown");
        state
            .store
            .apply_stripe_dispute(event_id, dispute, pi, amount, reason)
            .await?
    };
    let message = match &outcome {
        StripeDebit::Debited {
            account_id,
            amount,
            shortfall,
        } => {
            tracing::warn!(account = account_id, %amount, %shortfall, kind, payment = pi, "balance reduced by Stripe");
            format!("took {amount} from the balance (short by {shortfall})")
        }
        StripeDebit::AlreadyApplied => "already applied; nothing changed".into(),
        StripeDebit::NothingNew => "nothing new to take (refunded through the relay)".into(),
        StripeDebit::UnknownPayment => "unknown payment; nothing changed".into(),
    };
    Ok(json!({"received": true, "handled": true, "message": message}))
}

pub fn request_json(r: &RefundRequest) -> Value {
    json!({
        "id": r.id,
        "account_id": r.account_id,
        "email": r.email,
        "amount_cents": r.amount_cents,
        "reason": r.reason,
        "status": r.status,
        "note": r.note,
        "stripe_refunds": r.stripe_refunds.as_deref().map(|s| s.split(',').collect::<Vec<_>>()),
        "created_at_ms": r.created_at,
        "decided_at_ms": r.decided_at,
    })
}

pub fn requests_table(rows: &[RefundRequest], operator: bool) -> Markup {
    html! {
        table #refund-requests {
            thead { tr {
                th { "Asked (UTC)" }
                @if operator { th { "Account" } }
                th { "Amount" } th { "Reason" } th { "Status" } th { "Note" }
            } }
            tbody {
                @for r in rows {
                    tr {
                        td { (format_utc(r.created_at)) }
                        @if operator { td { a href={ "/operator/accounts/" (r.account_id) } { (r.email) } } }
                        td { (cents_text(r.amount_cents)) }
                        td { (r.reason) }
                        td class={ "status-" (r.status) } { (r.status) }
                        td { (r.note.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
    }
}

// ── Customer pages and API ────────────────────────────────────────────────────────────────────

async fn customer_page(
    state: &AppState,
    s: &SignedIn,
    error: Option<&str>,
    done: bool,
) -> Result<Markup, AdminError> {
    let rows = state
        .store
        .refund_requests(Some(s.account.id), None, 50)
        .await?;
    let refundable = state.store.refundable_cents(s.account.id).await?;
    let can = NanoUsd::from_cents(refundable)
        .unwrap_or(NanoUsd::ZERO)
        .min(s.account.balance);
    Ok(page(
        state,
        "Refunds",
        Some(&s.visitor),
        html! {
            @if done { p.success { "Your request is filed. We review it and reply by e-mail." } }
            section.card {
                h1 { "Ask for a refund" }
                p { "Prepaid credits are generally refundable only for unused balances, billing errors, duplicate charges, or service issues reviewed by support. Credits consumed by API usage are not refundable unless the usage was caused by a confirmed platform error. " a href="/policies/refunds" { "Refund Policy" } }
                p { "Unused balance that can be refunded now: " strong #refundable { (super::pages::money(can)) } }
                (form_error(error))
                form.stack method="post" action="/refunds" {
                    (csrf_field(&s.visitor))
                    label { "Amount in USD" input type="text" name="amount_usd" inputmode="decimal" required placeholder="10.00"; }
                    label { "Reason (payment date, duplicate charge, service issue, …)" input type="text" name="reason" required maxlength="2000"; }
                    (super::security::code_field(state, &s.visitor))
                    button type="submit" { "Ask for the refund" }
                }
            }
            @if !rows.is_empty() { section.card { h2 { "Your requests" } (requests_table(&rows, false)) } }
        },
    ))
}

pub async fn refunds_page(State(state): State<AppState>, s: SignedIn) -> Response {
    match customer_page(&state, &s, None, false).await {
        Ok(m) => m.into_response(),
        Err(e) => e.into_page(Some(&s.visitor)),
    }
}

pub async fn refund_submit(
    State(state): State<AppState>,
    s: SignedIn,
    Form(f): Form<RefundForm>,
) -> Response {
    let outcome = match super::security::step_up(&state, &s.visitor, f.totp_code.as_deref()).await {
        Ok(()) => request(&state, &s.account, &f).await,
        Err(e) => Err(e),
    };
    let (status, error) = match &outcome {
        Ok(_) => (StatusCode::CREATED, None),
        Err(e) => (e.status(), Some(e.message())),
    };
    match customer_page(&state, &s, error.as_deref(), outcome.is_ok()).await {
        Ok(m) => (status, m).into_response(),
        Err(e) => e.into_page(Some(&s.visitor)),
    }
}

pub async fn api_list(State(state): State<AppState>, s: SignedIn) -> Result<Json<Value>, ApiError> {
    let rows = state
        .store
        .refund_requests(Some(s.account.id), None, 100)
        .await?;
    let refundable = state.store.refundable_cents(s.account.id).await?;
    let balance_cents = s.account.balance.nanos() / 10_000_000;
    Ok(Json(json!({
        "refundable_cents": refundable.min(balance_cents),
        "data": rows.iter().map(request_json).collect::<Vec<_>>(),
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RefundBody {
    amount_cents: Option<i64>,
    amount_usd: Option<String>,
    reason: String,
    totp_code: Option<String>,
}

pub async fn api_create(
    State(state): State<AppState>,
    s: SignedIn,
    Json(b): Json<RefundBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let amount_usd = match (b.amount_cents, b.amount_usd) {
        (Some(c), _) => NanoUsd::from_cents(c)
            .map(|n| n.to_string())
            .unwrap_or_default(),
        (None, Some(t)) => t,
        (None, None) => String::new(),
    };
    super::security::step_up(&state, &s.visitor, b.totp_code.as_deref()).await?;
    let r = request(
        &state,
        &s.account,
        &RefundForm {
            amount_usd: amount_usd.replace(',', ""),
            reason: b.reason,
            totp_code: None,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(request_json(&r))))
}

// ── Operator pages and API ────────────────────────────────────────────────────────────────────

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct DecideForm {
    note: String,
}

pub async fn decline(
    state: &AppState,
    operator: &Account,
    id: i64,
    note: &str,
) -> Result<RefundRequest, AdminError> {
    let r = state
        .store
        .decline_refund(id, &format!("operator:{}", operator.email), note)
        .await
        .map_err(|e| match e {
            StoreError::Invalid(m) => AdminError::invalid("note", capital(&m)),
            other => other.into(),
        })?;
    super::notify::refund_decided(state, &r.email, r.amount_cents, false, note).await;
    Ok(r)
}

pub async fn queue_page(
    state: &AppState,
    s: &SignedIn,
    error: Option<&str>,
) -> Result<Markup, AdminError> {
    let pending = state
        .store
        .refund_requests(None, Some("pending"), 200)
        .await?;
    let mut recent = state.store.refund_requests(None, None, 100).await?;
    recent.retain(|r| r.status != "pending");
    recent.truncate(50);
    Ok(page(
        state,
        "Refund queue",
        Some(&s.visitor),
        html! {
            (super::operator::operator_nav())
            section.card {
                h1 { "Refund queue" }
                (form_error(error))
                @if pending.is_empty() { p.muted { "Nothing waits for review." } }
                @for r in &pending {
                    div.card.refund {
                        p { strong { (cents_text(r.amount_cents)) } " for " a href={ "/operator/accounts/" (r.account_id) } { (r.email) } " · asked " (format_utc(r.created_at)) }
                        p { "Reason: " (r.reason) }
                        form.inline method="post" action={ "/operator/refunds/" (r.id) "/approve" } {
                            (csrf_field(&s.visitor))
                            button type="submit" { "Approve and refund" }
                        }
                        form.row method="post" action={ "/operator/refunds/" (r.id) "/decline" } {
                            (csrf_field(&s.visitor))
                            label { "Note to the customer" input type="text" name="note" required; }
                            button.danger type="submit" { "Decline" }
                        }
                    }
                }
            }
            section.card {
                h2 { "Recent decisions" }
                @if recent.is_empty() { p.muted { "No decisions yet." } } @else { (requests_table(&recent, true)) }
            }
        },
    ))
}

pub async fn queue(State(state): State<AppState>, o: super::operator::Operator) -> Response {
    match queue_page(&state, &o.0, None).await {
        Ok(m) => m.into_response(),
        Err(e) => e.into_page(Some(&o.0.visitor)),
    }
}

async fn after_decision(
    state: &AppState,
    o: &super::operator::Operator,
    r: Result<RefundRequest, AdminError>,
) -> Response {
    match r {
        Ok(_) => Redirect::to("/operator/refunds").into_response(),
        Err(e) => match queue_page(state, &o.0, Some(&e.message())).await {
            Ok(m) => (e.status(), m).into_response(),
            Err(e2) => e2.into_page(Some(&o.0.visitor)),
        },
    }
}

pub async fn approve_submit(
    State(state): State<AppState>,
    o: super::operator::Operator,
    Path(id): Path<i64>,
) -> Response {
    let r = approve(&state, &o.0.account, id).await;
    after_decision(&state, &o, r).await
}

pub async fn decline_submit(
    State(state): State<AppState>,
    o: super::operator::Operator,
    Path(id): Path<i64>,
    Form(f): Form<DecideForm>,
) -> Response {
    let r = decline(&state, &o.0.account, id, &f.note).await;
    after_decision(&state, &o, r).await
}

pub async fn api_queue(
    State(state): State<AppState>,
    _o: super::operator::Operator,
) -> Result<Json<Value>, ApiError> {
    let rows = state
        .store
        .refund_requests(None, Some("pending"), 500)
        .await?;
    Ok(Json(
        json!({"data": rows.iter().map(request_json).collect::<Vec<_>>()}),
    ))
}

pub async fn api_approve(
    State(state): State<AppState>,
    o: super::operator::Operator,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(request_json(
        &approve(&state, &o.0.account, id).await?,
    )))
}

pub async fn api_decline(
    State(state): State<AppState>,
    o: super::operator::Operator,
    Path(id): Path<i64>,
    Json(f): Json<DecideForm>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(request_json(
        &decline(&state, &o.0.account, id, &f.note).await?,
    )))
}
