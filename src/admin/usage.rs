//! Usage: spend per day and per tier as a chart, the request log with filters (key, tier,
//! status, dates) and pages, and the same log as CSV; as pages and as JSON.
//!
//! The chart is an SVG drawn on the server: no script, so the strict Content-Security-Policy
//! holds, and it prints and screenshots as it looks.

use super::dashboard::{requests_table, usage_json};
use super::error::{AdminError, ApiError};
use super::pages::page;
use super::server::AppState;
use super::web::SignedIn;
use crate::money::NanoUsd;
use crate::store::{DailyUsage, StatusFilter, UsageFilter, UsageRecord};
use crate::time::{format_date, now_ms, parse_date};
use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

use crate::time::DAY_MS;
/// The longest range a chart or an export covers.
const MAX_DAYS: i64 = 366;
const PAGE: i64 = 50;
/// Most rows in one CSV export.
const CSV_MAX_ROWS: i64 = 100_000;

/// The filters as they arrive in the query string (all optional text).
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(default)]
pub struct UsageQuery {
    key_id: Option<String>,
    tier: Option<String>,
    status: Option<String>,
    /// First day, `YYYY-MM-DD` (UTC).
    from: Option<String>,
    /// Last day, inclusive.
    to: Option<String>,
    before_ms: Option<i64>,
    limit: Option<i64>,
}

fn nonempty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// The checked filter and the day range it covers.
pub struct Range {
    pub filter: UsageFilter,
    pub from_ms: i64,
    pub to_ms: i64,
}

pub fn parse_query(state: &AppState, q: &UsageQuery) -> Result<Range, AdminError> {
    let today = now_ms().div_euclid(DAY_MS) * DAY_MS;
    let day = |field: &'static str, v: &Option<String>| -> Result<Option<i64>, AdminError> {
        nonempty(v)
            .map(|t| {
                parse_date(t).ok_or_else(|| {
                    AdminError::invalid(field, format!("{t:?} is not a date: use YYYY-MM-DD."))
                })
            })
            .transpose()
    };
    let to_ms = day("to", &q.to)?.unwrap_or(today) + DAY_MS;
    let from_ms = day("from", &q.from)?.unwrap_or(to_ms - 30 * DAY_MS);
    if from_ms >= to_ms {
        return Err(AdminError::invalid(
            "from",
            "The first day must not be after the last day.",
        ));
    }
    if to_ms - from_ms > MAX_DAYS * DAY_MS {
        return Err(AdminError::invalid(
            "from",
            format!("Choose at most {MAX_DAYS} days."),
        ));
    }
    let key_id = nonempty(&q.key_id)
        .map(|t| {
            t.parse::<i64>()
                .map_err(|_| AdminError::invalid("key_id", format!("{t:?} is not a key id.")))
        })
        .transpose()?;
    let tier = nonempty(&q.tier).map(str::to_owned);
    if let Some(t) = &tier
        && state.conf.tier(t).is_none()
    {
        return Err(AdminError::invalid(
            "tier",
            format!("There is no tier {t:?}."),
        ));
    }
    let status = match nonempty(&q.status) {
        None => None,
        Some("ok") => Some(StatusFilter::Ok),
        Some("error") => Some(StatusFilter::Error),
        Some(t) => match t.parse::<i64>() {
            Ok(n) if (100..=599).contains(&n) => Some(StatusFilter::Exact(n)),
            _ => {
                return Err(AdminError::invalid(
                    "status",
                    "Status is ok, error, or an HTTP status such as 402.",
                ));
            }
        },
    };
    Ok(Range {
        filter: UsageFilter {
            key_id,
            tier,
            status,
            from_ms: Some(from_ms),
            to_ms: Some(to_ms),
            before_ms: q.before_ms,
        },
        from_ms,
        to_ms,
    })
}

/// Stacked bars: one per day, one colour per tier, height by billed amount.
pub fn chart(state: &AppState, days: &[DailyUsage], from_ms: i64, to_ms: i64) -> Markup {
    const COLOURS: [&str; 6] = [
        "#3552d4", "#1f9d6b", "#d08a1e", "#9b3fc4", "#c0392b", "#5b6b7f",
    ];
    let tiers: Vec<&str> = state.conf.tiers.iter().map(|t| t.name.as_str()).collect();
    let colour = |tier: &str| {
        tiers
            .iter()
            .position(|t| *t == tier)
            .map_or(COLOURS[5], |i| COLOURS[i % COLOURS.len()])
    };
    let mut by_day: BTreeMap<i64, Vec<&DailyUsage>> = BTreeMap::new();
    for d in days {
        by_day.entry(d.day_start_ms).or_default().push(d);
    }
    let n = ((to_ms - from_ms) / DAY_MS).max(1);
    let max = by_day
        .values()
        .map(|v| v.iter().map(|d| d.billed.nanos()).sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let (w, h, pad) = (720.0_f64, 200.0_f64, 24.0_f64);
    let bar = (w - pad) / n as f64;
    let total: NanoUsd = days.iter().map(|d| d.billed).sum();
    html! {
        figure.chart {
            svg #usage-chart xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (w) " " (h + pad) } role="img" aria-label="Spend per day and tier" width="100%" {
                line x1=(pad) y1=(h) x2=(w) y2=(h) stroke="#c9cedb" {}
                @for (day, parts) in &by_day {
                    @let x = pad + ((day - from_ms) / DAY_MS) as f64 * bar;
                    @let mut y = h;
                    @for p in parts {
                        @let ph = (p.billed.nanos() as f64 / max as f64) * (h - 10.0);
                        @let top = { y -= ph; y };
                        rect x=(format!("{:.1}", x + 1.0)) y=(format!("{top:.1}")) width=(format!("{:.1}", (bar - 2.0).max(1.0))) height=(format!("{ph:.1}")) fill=(colour(&p.tier)) {
                            title { (format_date(*day)) " · " (p.tier) ": " (p.billed) " · " (p.requests) " requests" }
                        }
                    }
                }
                text x=(pad) y=(h + 18.0) font-size="11" { (format_date(from_ms)) }
                text x=(w) y=(h + 18.0) font-size="11" text-anchor="end" { (format_date(to_ms - DAY_MS)) }
                text x=(pad) y="12" font-size="11" { "max " (NanoUsd::from_nanos(max)) " / day" }
            }
            figcaption {
                "Spend " (format_date(from_ms)) " to " (format_date(to_ms - DAY_MS)) ": " strong #usage-total { (total) }
                @for t in &tiers {
                    " " span.legend { svg width="10" height="10" { rect width="10" height="10" fill=(colour(t)) {} } " " (t) }
                }
            }
        }
    }
}

fn filter_form(state: &AppState, q: &UsageQuery, keys: &[crate::store::ApiKey]) -> Markup {
    let sel = |a: Option<&str>, b: &str| a == Some(b);
    html! {
        form.row method="get" action="/usage" {
            label { "From" input type="date" name="from" value=(nonempty(&q.from).unwrap_or_default()); }
            label { "To" input type="date" name="to" value=(nonempty(&q.to).unwrap_or_default()); }
            label { "Key" select name="key_id" {
                option value="" { "All keys" }
                @for k in keys { option value=(k.id) selected[sel(nonempty(&q.key_id), &k.id.to_string())] { (k.name) " (" (k.display_prefix) "…)" } }
            } }
            label { "Tier" select name="tier" {
                option value="" { "All tiers" }
                @for t in &state.conf.tiers { option value=(t.name) selected[sel(nonempty(&q.tier), &t.name)] { (t.name) } }
            } }
            label { "Status" select name="status" {
                option value="" { "Any" }
                option value="ok" selected[sel(nonempty(&q.status), "ok")] { "Succeeded" }
                option value="error" selected[sel(nonempty(&q.status), "error")] { "Failed" }
            } }
            button type="submit" { "Show" }
        }
    }
}

fn query_string(q: &UsageQuery, before: Option<i64>) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("key_id", &q.key_id),
        ("tier", &q.tier),
        ("status", &q.status),
        ("from", &q.from),
        ("to", &q.to),
    ] {
        if let Some(v) = nonempty(v) {
            s.append_pair(k, v);
        }
    }
    if let Some(b) = before {
        s.append_pair("before_ms", &b.to_string());
    }
    s.finish()
}

pub async fn usage_page(
    State(state): State<AppState>,
    s: SignedIn,
    Query(q): Query<UsageQuery>,
) -> Response {
    let keys = match state.store.list_keys(s.account.id).await {
        Ok(k) => k,
        Err(e) => return AdminError::from(e).into_page(Some(&s.visitor)),
    };
    let body = match parse_query(&state, &q) {
        Err(e) => html! { p.error role="alert" { (e.message()) } },
        Ok(range) => {
            let loaded = async {
                let days = state
                    .store
                    .usage_daily(s.account.id, range.from_ms, range.to_ms)
                    .await?;
                let rows = state
                    .store
                    .usage_filtered(s.account.id, &range.filter, PAGE)
                    .await?;
                Ok::<_, crate::store::StoreError>((days, rows))
            }
            .await;
            let (days, rows) = match loaded {
                Ok(v) => v,
                Err(e) => return AdminError::from(e).into_page(Some(&s.visitor)),
            };
            let next = (rows.len() as i64 == PAGE)
                .then(|| rows.last().map(|r| r.started_at))
                .flatten();
            html! {
                (chart(&state, &days, range.from_ms, range.to_ms))
                h2 { "Requests" }
                @if rows.is_empty() { p.muted { "No requests match." } } @else { (requests_table(&rows)) }
                p {
                    @if let Some(b) = next { a href={ "/usage?" (query_string(&q, Some(b))) } { "Older requests →" } " · " }
                    a href={ "/usage.csv?" (query_string(&q, None)) } { "Download CSV" }
                }
            }
        }
    };
    page(
        &state,
        "Usage",
        Some(&s.visitor),
        html! {
            section.card {
                h1 { "Usage" }
                (filter_form(&state, &q, &keys))
                (body)
            }
        },
    )
    .into_response()
}

/// The request log's CSV columns.
const CSV_HEADER: &str = "started_at_utc,request_id,key_id,tier,provider,model,stream,status,error_code,input_tokens,output_tokens,billed_usd,ttft_ms,latency_ms,cached_input_tokens,cache_write_tokens,reasoning_tokens\n";

/// One usage record as a CSV row (the customer's request log and the operator's usage export).
pub fn csv_line(out: &mut String, r: &UsageRecord) {
    super::csv::push_row(
        out,
        &[
            crate::time::format_utc(r.started_at),
            r.request_id.clone(),
            r.key_id.to_string(),
            r.tier.clone(),
            r.provider.clone().unwrap_or_default(),
            r.upstream_model.clone().unwrap_or_default(),
            r.stream.to_string(),
            r.http_status.to_string(),
            r.error_code.clone().unwrap_or_default(),
            r.input_tokens.to_string(),
            r.output_tokens.to_string(),
            r.billed.decimal(),
            r.ttft_ms.map(|t| t.to_string()).unwrap_or_default(),
            r.latency_ms.to_string(),
            r.cached_input_tokens.to_string(),
            r.cache_write_tokens.to_string(),
            r.reasoning_tokens.to_string(),
        ],
    );
}

/// The request log as CSV, streamed from the store as it is read.
pub async fn usage_csv(
    State(state): State<AppState>,
    s: SignedIn,
    Query(q): Query<UsageQuery>,
) -> Result<Response, ApiError> {
    let range = parse_query(&state, &q)?;
    let rows = state
        .store
        .usage_filtered_stream(s.account.id, &range.filter, CSV_MAX_ROWS);
    let name = format!(
        "duang-usage-{}-to-{}.csv",
        format_date(range.from_ms),
        format_date(range.to_ms - DAY_MS)
    );
    Ok(super::csv::download(&name, CSV_HEADER, rows, csv_line))
}

pub async fn api_requests(
    State(state): State<AppState>,
    s: SignedIn,
    Query(q): Query<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(PAGE);
    if !(1..=500).contains(&limit) {
        return Err(AdminError::invalid("limit", "limit must be from 1 to 500.").into());
    }
    let range = parse_query(&state, &q)?;
    let records = state
        .store
        .usage_filtered(s.account.id, &range.filter, limit)
        .await?;
    let next = (records.len() as i64 == limit)
        .then(|| records.last().map(|r| r.started_at))
        .flatten();
    Ok(Json(json!({
        "data": records.iter().map(usage_json).collect::<Vec<_>>(),
        "next_before_ms": next,
    })))
}

pub async fn api_daily(
    State(state): State<AppState>,
    s: SignedIn,
    Query(q): Query<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
    let range = parse_query(&state, &q)?;
    let days = state
        .store
        .usage_daily(s.account.id, range.from_ms, range.to_ms)
        .await?;
    Ok(Json(json!({
        "from": format_date(range.from_ms),
        "to": format_date(range.to_ms - DAY_MS),
        "total_billed_usd": days.iter().map(|d| d.billed).sum::<NanoUsd>().decimal(),
        "data": days.iter().map(|d| json!({
            "date": format_date(d.day_start_ms),
            "tier": d.tier,
            "requests": d.requests,
            "input_tokens": d.input_tokens,
            "output_tokens": d.output_tokens,
            "billed_usd": d.billed.decimal(),
        })).collect::<Vec<_>>(),
    })))
}
