//! Buying credits: a preset package or a custom amount through Stripe Checkout, and the webhook
//! that credits the account once the payment is confirmed.
//!
//! The webhook answers 2xx for every event it has dealt with, including ones it deliberately
//! ignores (an unpaid session, an unknown type): anything else makes Stripe retry for days. It
//! answers 400 only for a request that is not a genuine Stripe event (bad signature, old
//! timestamp, unreadable JSON) and 5xx when the store failed, so Stripe delivers it again.

use super::error::{AdminError, ApiError};
use super::pages::{cents_text, csrf_field, form_error, page};
use super::server::AppState;
use super::stripe::{CheckoutRequest, verify_signature};
use super::web::SignedIn;
use crate::money::NanoUsd;
use crate::store::{Account, AccountStatus, CheckoutCredit, PaidSession};
use crate::time::format_utc;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Value, json};

/// What the customer asked to buy: a package (cents) or a custom amount (dollars and cents).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct BuyRequest {
    package_cents: Option<i64>,
    amount_usd: Option<String>,
    /// A token of the page the form was on: the same click sent twice makes one Checkout Session.
    nonce: Option<String>,
}

/// Checks the amount against the conf's packages and custom bounds.
fn amount_cents(state: &AppState, r: &BuyRequest) -> Result<i64, AdminError> {
    let Some(stripe) = &state.conf.stripe else {
        return Err(payments_off(state));
    };
    if let Some(p) = r.package_cents {
        return if stripe.packages_cents.iter().any(|c| i64::from(*c) == p) {
            Ok(p)
        } else {
            Err(AdminError::invalid(
                "package_cents",
                "That is not one of the packages on offer.",
            ))
        };
    }
    let (lo, hi) = (
        i64::from(stripe.min_custom_amount_cents),
        i64::from(stripe.max_custom_amount_cents),
    );
    let bounds = format!(
        "Enter an amount from {} to {}, in dollars and cents.",
        cents_text(lo),
        cents_text(hi)
    );
    let text = r.amount_usd.as_deref().map(str::trim).unwrap_or_default();
    let text = text.strip_prefix('$').unwrap_or(text);
    if text.is_empty() {
        return Err(AdminError::invalid("amount_usd", bounds));
    }
    let cents = text
        .parse::<NanoUsd>()
        .ok()
        .filter(|n| n.is_positive())
        .ok_or_else(|| {
            AdminError::invalid("amount_usd", format!("{text:?} is not an amount. {bounds}"))
        })?
        .as_whole_cents()
        .ok_or_else(|| {
            AdminError::invalid(
                "amount_usd",
                format!("{text} is not a whole number of cents. {bounds}"),
            )
        })?;
    if cents < lo || cents > hi {
        return Err(AdminError::invalid(
            "amount_usd",
            format!(
                "{} is outside the allowed range. {bounds}",
                cents_text(cents)
            ),
        ));
    }
    Ok(cents)
}

fn payments_off(state: &AppState) -> AdminError {
    AdminError::Unavailable(format!(
        "Payments are not set up on this relay yet. Contact {} to add credits.",
        state.conf.admin.support_email
    ))
}

/// Creates the Checkout Session and returns where to send the customer.
pub async fn start_checkout(
    state: &AppState,
    account: &Account,
    r: &BuyRequest,
) -> Result<(String, String), AdminError> {
    let (Some(stripe_conf), Some(client)) = (&state.conf.stripe, &state.stripe) else {
        return Err(payments_off(state));
    };
    if !account.is_verified() {
        return Err(AdminError::Forbidden("Verify your e-mail address before buying credits: open the link we mailed you, or send it again from the dashboard.".into()));
    }
    if account.status != AccountStatus::Active {
        return Err(AdminError::Forbidden(format!(
            "This account is {}; it cannot buy credits. Contact {}.",
            account.status.as_str(),
            state.conf.admin.support_email
        )));
    }
    let cents = amount_cents(state, r)?;
    let success = super::notify::url(state, "/credits/success?session_id={CHECKOUT_SESSION_ID}");
    let cancel = super::notify::url(state, "/credits?cancelled=1");
    let name = format!(
        "{} credits ({})",
        state.conf.brand.product_name,
        cents_text(cents)
    );
    let nonce: String = r
        .nonce
        .as_deref()
        .filter(|n| (8..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(str::to_owned)
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
    let idempotency_key = format!("checkout-{}-{cents}-{nonce}", account.id);
    let session = client
        .create_checkout_session(
            &CheckoutRequest {
                account_id: account.id,
                email: &account.email,
                amount_cents: cents,
                currency: &stripe_conf.currency,
                product_name: &name,
                success_url: &success,
                cancel_url: &cancel,
            },
            &idempotency_key,
        )
        .await
        .map_err(|e| {
            tracing::error!(error = %e, account = account.id, "creating a Checkout Session failed");
            AdminError::Unavailable("The payment provider is not answering right now. Nothing was charged; try again in a minute.".into())
        })?;
    let url = session.url.clone().ok_or_else(|| {
        tracing::error!(session = %session.id, "Checkout Session without a url");
        AdminError::Internal
    })?;
    match state
        .store
        .record_checkout_session(&session.id, account.id, cents, &stripe_conf.currency)
        .await
    {
        // The same click twice: Stripe replayed the session we already recorded.
        Ok(()) | Err(crate::store::StoreError::Invalid(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok((session.id, url))
}

// ── The webhook ───────────────────────────────────────────────────────────────────────────────

fn ack(body: Value) -> Response {
    (StatusCode::OK, Json(body)).into_response()
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message}}))).into_response()
}

pub async fn webhook(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(stripe) = &state.conf.stripe else {
        return refuse(StatusCode::NOT_FOUND, "Stripe is not enabled on this relay");
    };
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let now_s = crate::time::now_ms() / 1000;
    if let Err(e) = verify_signature(signature, &body, stripe.webhook_secret.expose(), now_s) {
        tracing::warn!(reason = e.message(), "webhook refused");
        return refuse(StatusCode::BAD_REQUEST, e.message());
    }
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "the payload is not JSON");
    };
    let (Some(id), Some(kind)) = (event["id"].as_str(), event["type"].as_str()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the payload is not a Stripe event (no id or type)",
        );
    };
    let object = &event["data"]["object"];
    let outcome = match kind {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            checkout_paid(&state, id, kind, object).await
        }
        "checkout.session.async_payment_failed" | "checkout.session.expired" => {
            record_only(&state, id, kind, "nothing to credit").await
        }
        "charge.refunded" | "charge.dispute.created" => {
            super::refunds::stripe_debit_event(&state, id, kind, object).await
        }
        other => Ok(
            json!({"received": true, "handled": false, "message": format!("event type {other} is not handled; nothing changed")}),
        ),
    };
    match outcome {
        Ok(v) => ack(v),
        Err(e) => {
            tracing::error!(event = id, error = %e, "webhook failed; Stripe will deliver it again");
            refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "temporary failure; deliver again",
            )
        }
    }
}

async fn record_only(
    state: &AppState,
    id: &str,
    kind: &str,
    what: &str,
) -> Result<Value, crate::store::StoreError> {
    let fresh = state.store.record_stripe_event(id, kind).await?;
    Ok(json!({"received": true, "handled": true, "duplicate": !fresh, "message": what}))
}

async fn checkout_paid(
    state: &AppState,
    id: &str,
    kind: &str,
    s: &Value,
) -> Result<Value, crate::store::StoreError> {
    let Some(session_id) = s["id"].as_str() else {
        return Ok(
            json!({"received": true, "handled": false, "message": "no session id in the event"}),
        );
    };
    if s["payment_status"].as_str() != Some("paid") {
        // A delayed payment method: `checkout.session.async_payment_succeeded` follows.
        return record_only(
            state,
            id,
            kind,
            "the session is not paid yet; nothing credited",
        )
        .await;
    }
    let credit = state
        .store
        .credit_checkout(&PaidSession {
            event_id: id,
            event_type: kind,
            session_id,
            payment_intent: s["payment_intent"].as_str(),
            amount_total_cents: s["amount_total"].as_i64().unwrap_or(-1),
            currency: s["currency"].as_str().unwrap_or_default(),
        })
        .await?;
    let message = match &credit {
        CheckoutCredit::Credited { account_id, amount } => {
            tracing::info!(account = account_id, %amount, session = session_id, "credits bought");
            send_receipt(state, *account_id, session_id, *amount);
            format!("credited {amount}")
        }
        CheckoutCredit::DuplicateEvent => "event already processed; nothing changed".into(),
        CheckoutCredit::AlreadyCredited => "session already credited; nothing changed".into(),
        CheckoutCredit::UnknownSession => {
            tracing::warn!(
                session = session_id,
                "webhook for a Checkout Session this relay did not create"
            );
            "unknown session; nothing credited".into()
        }
        CheckoutCredit::AmountMismatch {
            expected_cents,
            got_cents,
        } => {
            tracing::error!(
                session = session_id,
                expected_cents,
                got_cents,
                "paid amount differs from the session we created; not credited"
            );
            "amount differs from the session created; nothing credited".into()
        }
    };
    Ok(
        json!({"received": true, "handled": true, "credited": matches!(credit, CheckoutCredit::Credited { .. }), "message": message}),
    )
}

/// Mails the receipt of a payment just credited, in the background (the webhook answers Stripe
/// at once; a slow SMTP relay must not make Stripe deliver the event again).
fn send_receipt(state: &AppState, account_id: i64, session_id: &str, amount: NanoUsd) {
    let state = state.clone();
    let session_id = session_id.to_owned();
    tokio::spawn(async move {
        let found = async {
            let a = state
                .store
                .account(&crate::store::AccountRef::Id(account_id))
                .await?;
            let a = state.store.with_leases(a).await?;
            let p = state.store.payment(account_id, &session_id).await?;
            Ok::<_, crate::store::StoreError>((a, p))
        }
        .await;
        match found {
            Ok((a, p)) => {
                let r = super::notify::Receipt {
                    amount,
                    paid_at_ms: p.paid_at,
                    reference: p.reference(),
                    balance_after: a.credit(),
                    receipt_path: format!("/credits/receipts/{session_id}"),
                };
                super::notify::receipt(&state, &a.email, &r).await;
            }
            Err(e) => tracing::warn!(error = %e, session = %session_id, "receipt not mailed"),
        }
    });
}

// ── Pages ─────────────────────────────────────────────────────────────────────────────────────

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CreditsQuery {
    cancelled: Option<String>,
    session_id: Option<String>,
}

async fn credits_page(
    state: &AppState,
    s: &SignedIn,
    error: Option<&str>,
    cancelled: bool,
) -> Result<Markup, AdminError> {
    let sessions = state.store.checkout_sessions(s.account.id, 10).await?;
    let paid = state.store.payments(s.account.id, 50).await?;
    let refunded = |id: &str| {
        paid.iter()
            .find(|p| p.session_id == id)
            .map(|p| p.refunded_cents)
            .unwrap_or(0)
    };
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    Ok(page(
        state,
        "Buy credits",
        Some(&s.visitor),
        html! {
            @if cancelled { p.notice { "The payment was cancelled; nothing was charged." } }
            section.card {
                h1 { "Buy credits" }
                p { "Balance: " strong #balance { (super::pages::money(s.account.credit())) } }
                p.muted { "Credits are prepaid in USD and deducted per request at the tier's price. Unused balances can be refunded as the " a href="/policies/refunds" { "Refund Policy" } " describes." }
                (form_error(error))
                @match &state.conf.stripe {
                    None => { p.notice { "Payments are not set up on this relay yet. Contact " (state.conf.admin.support_email) " to add credits." } }
                    Some(stripe) => {
                        @if !s.account.is_verified() {
                            p.notice { "Verify your e-mail address before buying credits." }
                        }
                        h2 { "Packages" }
                        div.grid {
                            @for c in &stripe.packages_cents {
                                form.card method="post" action="/credits/checkout" {
                                    (csrf_field(&s.visitor))
                                    input type="hidden" name="nonce" value=(nonce);
                                    input type="hidden" name="package_cents" value=(c);
                                    p.balance { (cents_text(i64::from(*c))) }
                                    button type="submit" { "Buy " (cents_text(i64::from(*c))) }
                                }
                            }
                        }
                        h2 { "Custom amount" }
                        form.row method="post" action="/credits/checkout" {
                            (csrf_field(&s.visitor))
                            input type="hidden" name="nonce" value=(nonce);
                            label { "Amount in USD (" (cents_text(stripe.min_custom_amount_cents.into())) " to " (cents_text(stripe.max_custom_amount_cents.into())) ")"
                                input type="text" name="amount_usd" inputmode="decimal" placeholder="25.00" required; }
                            button type="submit" { "Continue to payment" }
                        }
                        p.muted { "Stripe handles payment securely; we never see your card number." }
                    }
                }
            }
            @if !sessions.is_empty() {
                section.card {
                    h2 { "Payments" }
                    p { a href="/credits/receipts" { "All receipts" } }
                    table #payments {
                        thead { tr { th { "Started (UTC)" } th { "Amount" } th { "Status" } th { "Receipt" } } }
                        tbody {
                            @for (id, cents, status, created) in &sessions {
                                tr {
                                    td { (format_utc(*created)) }
                                    td { (cents_text(*cents)) }
                                    td {
                                        (status)
                                        @let back = refunded(id);
                                        @if back >= *cents { " · refunded" }
                                        @else if back > 0 { " · " (cents_text(back)) " refunded" }
                                    }
                                    td { @if status == "paid" { a href={ "/credits/receipts/" (id) } { "Receipt" } } }
                                }
                            }
                        }
                    }
                }
            }
        },
    ))
}

pub async fn credits(
    State(state): State<AppState>,
    s: SignedIn,
    Query(q): Query<CreditsQuery>,
) -> Response {
    match credits_page(&state, &s, None, q.cancelled.is_some()).await {
        Ok(m) => m.into_response(),
        Err(e) => e.into_page(Some(&s.visitor)),
    }
}

pub async fn checkout_submit(
    State(state): State<AppState>,
    s: SignedIn,
    Form(r): Form<BuyRequest>,
) -> Response {
    match start_checkout(&state, &s.account, &r).await {
        Ok((_, url)) => Redirect::to(&url).into_response(),
        Err(e) => match credits_page(&state, &s, Some(&e.message()), false).await {
            Ok(m) => (e.status(), m).into_response(),
            Err(e2) => e2.into_page(Some(&s.visitor)),
        },
    }
}

pub async fn success(
    State(state): State<AppState>,
    s: SignedIn,
    Query(q): Query<CreditsQuery>,
) -> Response {
    let ours = match &q.session_id {
        Some(id) => state
            .store
            .checkout_sessions(s.account.id, 50)
            .await
            .map(|v| v.into_iter().find(|(sid, ..)| sid == id)),
        None => Ok(None),
    };
    let ours = match ours {
        Ok(o) => o,
        Err(e) => return AdminError::from(e).into_page(Some(&s.visitor)),
    };
    page(&state, "Payment received", Some(&s.visitor), html! {
        section.card {
            @match ours {
                Some((_, cents, status, _)) if status == "paid" => {
                    h1 { "Thank you" }
                    p.success { (cents_text(cents)) " was added to your balance." }
                }
                Some((_, cents, _, _)) => {
                    h1 { "Payment received" }
                    p.notice { "Stripe is confirming your payment of " (cents_text(cents)) ". Your balance updates as soon as it is confirmed; reload this page in a minute." }
                }
                None => { h1 { "Payments" } p { "We do not know that payment." } }
            }
            p { "Balance: " strong #balance { (super::pages::money(s.account.credit())) } }
            p { a.button href="/dashboard" { "Go to the dashboard" } }
        }
    })
    .into_response()
}

/// The receipts page: every payment with what was refunded of it.
pub async fn receipts(State(state): State<AppState>, s: SignedIn) -> Response {
    let paid = match state.store.payments(s.account.id, 500).await {
        Ok(p) => p,
        Err(e) => return AdminError::from(e).into_page(Some(&s.visitor)),
    };
    page(&state, "Receipts", Some(&s.visitor), html! {
        section.card {
            h1 { "Receipts" }
            @if paid.is_empty() {
                p.muted { "No payments yet." }
            } @else {
                div.scroll {
                    table #receipts {
                        thead { tr { th { "Paid (UTC)" } th { "Amount" } th { "Refunded" } th { "Kept" } th { "Reference" } th {} } }
                        tbody { @for p in &paid { tr {
                            td { (format_utc(p.paid_at)) }
                            td { (cents_text(p.amount_cents)) }
                            td { (cents_text(p.refunded_cents)) }
                            td { (cents_text(p.amount_cents - p.refunded_cents)) }
                            td { code { (p.reference()) } }
                            td { a href={ "/credits/receipts/" (p.session_id) } { "Receipt" } }
                        } } }
                    }
                }
            }
        }
    })
    .into_response()
}

/// One payment's receipt, made to print (the navigation and footer are hidden in print).
pub async fn receipt(
    State(state): State<AppState>,
    s: SignedIn,
    axum::extract::Path(session_id): axum::extract::Path<String>,
) -> Response {
    let p = match state.store.payment(s.account.id, &session_id).await {
        Ok(p) => p,
        Err(e) => return AdminError::from(e).into_page(Some(&s.visitor)),
    };
    page(&state, "Receipt", Some(&s.visitor), html! {
        section.card.receipt #receipt {
            h1 { "Receipt" }
            p { (state.conf.brand.legal_entity) " · " (state.conf.brand.product_name) " · " (state.conf.admin.support_email) }
            table.facts {
                tbody {
                    tr { th scope="row" { "Billed to" } td { (s.account.email) } }
                    tr { th scope="row" { "Date paid (UTC)" } td { (format_utc(p.paid_at)) } }
                    tr { th scope="row" { "Description" } td { "Prepaid API credits" } }
                    tr { th scope="row" { "Amount paid" } td #receipt-amount { (cents_text(p.amount_cents)) " " (p.currency.to_uppercase()) } }
                    @if p.refunded_cents > 0 {
                        tr { th scope="row" { "Refunded" } td #receipt-refunded { (cents_text(p.refunded_cents)) } }
                        tr { th scope="row" { "Net" } td { (cents_text(p.amount_cents - p.refunded_cents)) } }
                    }
                    tr { th scope="row" { "Payment reference" } td { code { (p.reference()) } } }
                    tr { th scope="row" { "Paid with" } td { "Card, through Stripe" } }
                }
            }
            p.muted.no-print { "Print this page (or save it as PDF) for your records." }
        }
    })
    .into_response()
}

// ── JSON API ──────────────────────────────────────────────────────────────────────────────────

pub async fn api_options(
    State(state): State<AppState>,
    s: SignedIn,
) -> Result<Json<Value>, ApiError> {
    let sessions = state.store.checkout_sessions(s.account.id, 50).await?;
    let stripe = state.conf.stripe.as_ref();
    Ok(Json(json!({
        "enabled": stripe.is_some(),
        "currency": stripe.map(|s| s.currency.clone()),
        "packages_cents": stripe.map(|s| s.packages_cents.clone()).unwrap_or_default(),
        "min_custom_amount_cents": stripe.map(|s| s.min_custom_amount_cents),
        "max_custom_amount_cents": stripe.map(|s| s.max_custom_amount_cents),
        "payments": sessions.iter().map(|(id, cents, status, created)| json!({"session_id": id, "amount_cents": cents, "status": status, "created_at_ms": created})).collect::<Vec<_>>(),
    })))
}

pub async fn api_checkout(
    State(state): State<AppState>,
    s: SignedIn,
    Json(r): Json<BuyRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (id, url) = start_checkout(&state, &s.account, &r).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"session_id": id, "checkout_url": url})),
    ))
}
