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
    sent: Option<String>,
    /// The period of the spend chart and tables: 7, 14 (default), 30 or 90 days.
    days: Option<i64>,
}

const PERIODS: [i64; 4] = [7, 14, 30, 90];

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
    let period = n.days.filter(|d| PERIODS.contains(d)).unwrap_or(14);
    let to_ms = (crate::time::now_ms().div_euclid(86_400_000) + 1) * 86_400_000;
    let from_ms = to_ms - period * 86_400_000;
    let loaded = async {
        let recent = state.store.usage_page(s.account.id, None, 10).await?;
        let days = state
            .store
            .usage_daily(s.account.id, from_ms, to_ms)
            .await?;
        let by_key = state
            .store
            .spend_by_key(s.account.id, from_ms, to_ms)
            .await?;
        let keys = state.store.list_keys(s.account.id).await?;
        Ok::<_, crate::store::StoreError>((recent, days, by_key, keys))
    }
    .await;
    let (recent, days, by_key, keys) = match loaded {
        Ok(v) => v,
        Err(e) => return AdminError::from(e).into_page(Some(&s.visitor)),
    };
    let a = &s.account;
    let low = a.credit() < state.conf.admin.low_balance_warning;
    let mut by_tier: Vec<(String, i64, crate::money::NanoUsd)> = Vec::new();
    for d in &days {
        match by_tier.iter_mut().find(|(t, ..)| *t == d.tier) {
            Some(row) => {
                row.1 += d.requests;
                row.2 = row.2.checked_add(d.billed).unwrap_or(row.2);
            }
            None => by_tier.push((d.tier.clone(), d.requests, d.billed)),
        }
    }
    by_tier.retain(|(t, ..)| !t.is_empty());
    by_tier.sort_by(|x, y| y.2.cmp(&x.2).then_with(|| x.0.cmp(&y.0)));
    let key_name = |id: i64| {
        keys.iter()
            .find(|k| k.id == id)
            .map(|k| k.name.clone())
            .unwrap_or_else(|| format!("key {id}"))
    };
    page(&state, "Dashboard", Some(&s.visitor), html! {
        h1.visually-hidden { "Dashboard" }
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
                p.balance #balance { (super::pages::money(a.credit())) }
                @if a.credit().rounded_to_cents() != a.credit() { p.hint #balance-exact { "Exactly " (a.credit()) } }
                @if a.leased.is_positive() { p.hint #held-note { (super::pages::money(a.leased)) " of it is held by the gateway for requests in flight and recent use: each request keeps only what it cost, and the rest comes back by itself." } }
                @if low { p.notice #low-balance { "Your balance is low. Requests that cannot be covered are refused with 402." } }
                p { a.button href="/credits" { "Buy credits" } }
            }
            div.card {
                h2 { "Get started" }
                p { a href="/keys" { "Create an API key" } ", then point your app at the base URL below." }
            }
        }
        section.card #spend {
            h2 { "Spend, last " (period) " days" }
            nav.periods aria-label="Period" {
                @for d in PERIODS {
                    @if d == period { strong aria-current="true" { (d) " days" } }
                    @else { a href={ "/dashboard?days=" (d) } { (d) " days" } }
                }
            }
            (super::usage::chart(&state, &days, from_ms, to_ms))
            div.split {
                div {
                    h3 { "By key" }
                    @if by_key.is_empty() { p.muted { "No requests in this period." } } @else {
                        div.scroll { table #spend-by-key {
                            thead { tr { th { "Key" } th { "Requests" } th { "Spent" } } }
                            tbody { @for (id, n, billed) in &by_key { tr { td { (key_name(*id)) } td { (n) } td { (billed) } } } }
                        } }
                    }
                }
                div {
                    h3 { "By tier" }
                    @if by_tier.is_empty() { p.muted { "No requests in this period." } } @else {
                        div.scroll { table #spend-by-tier {
                            thead { tr { th { "Tier" } th { "Requests" } th { "Spent" } } }
                            tbody { @for (t, n, billed) in &by_tier { tr { td { code { (t) } } td { (n) } td { (billed) } } } }
                        } }
                    }
                }
            }
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
