//! The customer's dashboard: balance (with the low-balance warning), the e-mail verification
//! state, and the most recent requests; the JSON API's balance and request log.

use super::account::account_json;
use super::error::AdminError;
use super::pages::{csrf_field, page, quickstart_body};
use super::server::AppState;
use super::web::SignedIn;
use crate::store::{AccountStatus, UsageRecord};
use crate::time::format_utc;
use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Notices {
    welcome: Option<String>,
    sent: Option<String>,
}

pub fn requests_table(records: &[UsageRecord]) -> Markup {
    html! {
        table #requests {
            thead { tr { th { "Time (UTC)" } th { "Tier" } th { "Status" } th { "Tokens in / out" } th { "Cost" } th { "First token" } th { "Latency" } } }
            tbody {
                @for r in records {
                    tr {
                        td { (format_utc(r.started_at)) }
                        td { code { (r.tier) } }
                        td { (r.http_status) @if let Some(c) = &r.error_code { " " span.muted { (c) } } }
                        td { (r.input_tokens) " / " (r.output_tokens) }
                        td { (r.billed) }
                        td { @if let Some(t) = r.ttft_ms { (t) " ms" } @else { "—" } }
                        td { (r.latency_ms) " ms" }
                    }
                }
            }
        }
    }
}

pub async fn dashboard(
    State(state): State<AppState>,
    s: SignedIn,
    Query(n): Query<Notices>,
) -> Response {
    let to_ms = (crate::time::now_ms().div_euclid(86_400_000) + 1) * 86_400_000;
    let from_ms = to_ms - 14 * 86_400_000;
    let loaded = async {
        let recent = state.store.usage_page(s.account.id, None, 10).await?;
        let days = state
            .store
            .usage_daily(s.account.id, from_ms, to_ms)
            .await?;
        Ok::<_, crate::store::StoreError>((recent, days))
    }
    .await;
    let (recent, days) = match loaded {
        Ok(v) => v,
        Err(e) => return AdminError::from(e).into_page(Some(&s.visitor)),
    };
    let a = &s.account;
    let low = a.credit() < state.conf.admin.low_balance_warning;
    page(&state, "Dashboard", Some(&s.visitor), html! {
        @if n.welcome.is_some() {
            p.success { "Welcome! We sent a verification link to " (a.email) "." }
        }
        @if n.sent.is_some() {
            p.success { "We sent a new verification link to " (a.email) "." }
        }
        @if a.status == AccountStatus::Suspended {
            p.notice { "This account is suspended under the Acceptable Use Policy: its keys are refused. Contact " (state.conf.admin.support_email) "." }
        }
        @if !a.is_verified() {
            div.notice #verify-notice {
                "Verify your e-mail address: until you do, you cannot buy credits or use API keys. "
                form.inline method="post" action="/verify/resend" {
                    (csrf_field(&s.visitor))
                    button.link type="submit" { "Send the link again" }
                }
            }
        }
        section.grid {
            div.card {
                h2 { "Balance" }
                p.balance #balance { (a.credit()) }
                @if a.leased.is_positive() { p.hint #held-note { (a.leased) " of it is held by the gateway for requests in flight and recent use: each request keeps only what it cost, and the rest comes back by itself." } }
                @if low { p.notice #low-balance { "Your balance is low. Requests that cannot be covered are refused with 402." } }
                p { a.button href="/credits" { "Buy credits" } }
            }
            div.card {
                h2 { "Get started" }
                p { a href="/keys" { "Create an API key" } ", then point your app at the base URL below." }
            }
        }
        section.card {
            h2 { "Spend, last 14 days" }
            (super::usage::chart(&state, &days, from_ms, to_ms))
            p { a href="/usage" { "All usage" } }
        }
        section.card {
            h2 { "Recent requests" }
            @if recent.is_empty() { p.muted { "No requests yet." } } @else { (requests_table(&recent)) }
        }
        section.card { (quickstart_body(&state)) }
    })
    .into_response()
}

pub fn usage_json(r: &UsageRecord) -> Value {
    json!({
        "request_id": r.request_id,
        "key_id": r.key_id,
        "tier": r.tier,
        "provider": r.provider,
        "model": r.upstream_model,
        "stream": r.stream,
        "status": r.http_status,
        "error_code": r.error_code,
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "cached_input_tokens": r.cached_input_tokens,
        "cache_write_tokens": r.cache_write_tokens,
        "reasoning_tokens": r.reasoning_tokens,
        "billed_usd": r.billed.decimal(),
        "billed_nano_usd": r.billed.nanos(),
        "latency_ms": r.latency_ms,
        "ttft_ms": r.ttft_ms,
        "started_at_ms": r.started_at,
    })
}

pub async fn api_balance(State(state): State<AppState>, s: SignedIn) -> Json<Value> {
    Json(account_json(&state, &s.account))
}
