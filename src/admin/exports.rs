//! The operator's exports for accounting: the ledger and the usage records of a date range as
//! CSV, and the audit log with its filters (a page, JSON and CSV). Every CSV streams from the
//! store as it is read (`super::csv`), oldest first, so a year of usage costs no more memory than
//! a day; the `duang-admin export` commands write the same files.

use super::csv::{download, push_row};
use super::error::{AdminError, ApiError};
use super::operator::{Operator, RangeQuery, operator_nav, range};
use super::pages::page;
use super::server::AppState;
use crate::store::{AccountRef, AuditEntry, AuditFilter, Exported, LedgerEntry, UsageRecord};
use crate::time::{format_date, format_utc};
use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::time::DAY_MS;
/// Entries the audit page and its JSON show at most (the CSV has them all).
const AUDIT_PAGE: i64 = 200;

/// What an export or the audit log is filtered by; all optional.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(default)]
pub struct ExportQuery {
    /// First day, `YYYY-MM-DD` (UTC); default 30 days before `to`.
    from: Option<String>,
    /// Last day, inclusive; default today.
    to: Option<String>,
    /// An account id or e-mail; empty: every account.
    account: Option<String>,
    /// Audit log: exactly this actor.
    actor: Option<String>,
    /// Audit log: actions starting with this.
    action: Option<String>,
    /// Audit log JSON: 1 to 200 entries.
    limit: Option<i64>,
}

fn nonempty(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The checked range (`[from, to)`, whole UTC days, at most 366) and account.
struct Checked {
    from_ms: i64,
    to_ms: i64,
    account_id: Option<i64>,
}

async fn check(state: &AppState, q: &ExportQuery) -> Result<Checked, AdminError> {
    let (from_ms, to_ms) = range(&RangeQuery {
        from: q.from.clone(),
        to: q.to.clone(),
    })?;
    let account_id = match nonempty(&q.account) {
        None => None,
        Some(t) => {
            let r: AccountRef = t.parse().map_err(|e| AdminError::invalid("account", e))?;
            Some(
                state
                    .store
                    .account(&r)
                    .await
                    .map_err(|_| {
                        AdminError::invalid("account", format!("There is no account {t}."))
                    })?
                    .id,
            )
        }
    };
    Ok(Checked {
        from_ms,
        to_ms,
        account_id,
    })
}

fn audit_filter(c: &Checked, q: &ExportQuery) -> AuditFilter {
    AuditFilter {
        from_ms: Some(c.from_ms),
        to_ms: Some(c.to_ms),
        actor: nonempty(&q.actor),
        action: nonempty(&q.action),
        account_id: c.account_id,
    }
}

fn file_name(what: &str, c: &Checked) -> String {
    format!(
        "duang-{what}-{}-to-{}.csv",
        format_date(c.from_ms),
        format_date(c.to_ms - DAY_MS)
    )
}

pub const LEDGER_HEADER: &str = "created_at_utc,entry_id,account_id,email,kind,amount_usd,amount_nano_usd,external_ref,actor,reason\n";
pub const USAGE_HEADER: &str = "started_at_utc,request_id,account_id,email,key_id,tier,provider,model,stream,status,error_code,attempts,input_tokens,output_tokens,cached_input_tokens,cache_write_tokens,reasoning_tokens,billed_usd,provider_cost_usd,platform_loss_usd,latency_ms,ttft_ms\n";
pub const AUDIT_HEADER: &str = "created_at_utc,actor,action,account_id,email,key_id,reason\n";

pub fn ledger_line(out: &mut String, e: &Exported<LedgerEntry>) {
    let l = &e.row;
    push_row(
        out,
        &[
            format_utc(l.created_at),
            l.id.to_string(),
            l.account_id.to_string(),
            e.email.clone().unwrap_or_default(),
            l.kind.as_str().to_owned(),
            l.amount.decimal(),
            l.amount.nanos().to_string(),
            l.external_ref.clone(),
            l.actor.clone().unwrap_or_default(),
            l.reason.clone().unwrap_or_default(),
        ],
    );
}

pub fn usage_line(out: &mut String, e: &Exported<UsageRecord>) {
    let r = &e.row;
    push_row(
        out,
        &[
            format_utc(r.started_at),
            r.request_id.clone(),
            r.account_id.to_string(),
            e.email.clone().unwrap_or_default(),
            r.key_id.to_string(),
            r.tier.clone(),
            r.provider.clone().unwrap_or_default(),
            r.upstream_model.clone().unwrap_or_default(),
            r.stream.to_string(),
            r.http_status.to_string(),
            r.error_code.clone().unwrap_or_default(),
            r.attempts.to_string(),
            r.input_tokens.to_string(),
            r.output_tokens.to_string(),
            r.cached_input_tokens.to_string(),
            r.cache_write_tokens.to_string(),
            r.reasoning_tokens.to_string(),
            r.billed.decimal(),
            r.provider_cost.decimal(),
            e.platform_loss.decimal(),
            r.latency_ms.to_string(),
            r.ttft_ms.map(|t| t.to_string()).unwrap_or_default(),
        ],
    );
}

pub fn audit_line(out: &mut String, e: &Exported<AuditEntry>) {
    let a = &e.row;
    push_row(
        out,
        &[
            format_utc(a.created_at),
            a.actor.clone(),
            a.action.clone(),
            a.account_id.map(|i| i.to_string()).unwrap_or_default(),
            e.email.clone().unwrap_or_default(),
            a.key_id.map(|i| i.to_string()).unwrap_or_default(),
            a.reason.clone().unwrap_or_default(),
        ],
    );
}

/// Writes `header` and every row to `out` as CSV, batch by batch (the CLI's exports, to its
/// standard output); returns the number of rows.
pub async fn write_csv<T>(
    mut rows: crate::store::RowStream<T>,
    header: &str,
    line: fn(&mut String, &T),
    out: &mut impl std::io::Write,
) -> Result<u64, ExportError> {
    use futures_util::StreamExt;
    out.write_all(header.as_bytes())?;
    let mut n = 0;
    while let Some(batch) = rows.next().await {
        let batch = batch?;
        let mut text = String::with_capacity(batch.len() * 160);
        for r in &batch {
            line(&mut text, r);
        }
        out.write_all(text.as_bytes())?;
        n += batch.len() as u64;
    }
    out.flush()?;
    Ok(n)
}

/// What can stop an export on the command line.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("writing the CSV: {0}")]
    Write(#[from] std::io::Error),
}

/// A CSV download of `what` for the checked query, or the page that says what is wrong with it.
async fn export<T: Send + 'static>(
    state: &AppState,
    o: &Operator,
    q: &ExportQuery,
    what: &str,
    header: &'static str,
    rows: impl FnOnce(&Checked) -> crate::store::RowStream<T>,
    line: fn(&mut String, &T),
) -> Response {
    match check(state, q).await {
        Ok(c) => download(&file_name(what, &c), header, rows(&c), line),
        Err(e) => e.into_page(Some(&o.0.visitor)),
    }
}

/// `GET /operator/exports/ledger.csv?from=&to=&account=`
pub async fn ledger_csv(
    State(state): State<AppState>,
    o: Operator,
    Query(q): Query<ExportQuery>,
) -> Response {
    let rows = |c: &Checked| state.store.ledger_export(c.from_ms, c.to_ms, c.account_id);
    export(&state, &o, &q, "ledger", LEDGER_HEADER, rows, ledger_line).await
}

/// `GET /operator/exports/usage.csv?from=&to=&account=`
pub async fn usage_csv(
    State(state): State<AppState>,
    o: Operator,
    Query(q): Query<ExportQuery>,
) -> Response {
    let rows = |c: &Checked| state.store.usage_export(c.from_ms, c.to_ms, c.account_id);
    export(&state, &o, &q, "usage", USAGE_HEADER, rows, usage_line).await
}

/// `GET /operator/audit.csv?from=&to=&account=&actor=&action=`
pub async fn audit_csv(
    State(state): State<AppState>,
    o: Operator,
    Query(q): Query<ExportQuery>,
) -> Response {
    let rows = |c: &Checked| state.store.audit_export(&audit_filter(c, &q));
    export(&state, &o, &q, "audit", AUDIT_HEADER, rows, audit_line).await
}

fn query_string(q: &ExportQuery) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("from", &q.from),
        ("to", &q.to),
        ("account", &q.account),
        ("actor", &q.actor),
        ("action", &q.action),
    ] {
        if let Some(v) = nonempty(v) {
            s.append_pair(k, &v);
        }
    }
    s.finish()
}

/// `GET /operator/audit`: the newest entries matching the filters, and the exports' forms.
pub async fn audit_page(
    State(state): State<AppState>,
    o: Operator,
    Query(q): Query<ExportQuery>,
) -> Response {
    let loaded = async {
        let c = check(&state, &q).await?;
        let rows = state
            .store
            .audit_filtered(&audit_filter(&c, &q), AUDIT_PAGE)
            .await?;
        let actions = state.store.audit_actions().await?;
        Ok::<_, AdminError>((c, rows, actions))
    }
    .await;
    let (c, rows, actions) = match loaded {
        Ok(v) => v,
        Err(e) => return e.into_page(Some(&o.0.visitor)),
    };
    let (from, to) = (format_date(c.from_ms), format_date(c.to_ms - DAY_MS));
    let text = |v: &Option<String>| nonempty(v).unwrap_or_default();
    page(&state, "Audit log and exports", Some(&o.0.visitor), html! {
        (operator_nav())
        section.card {
            h1 { "Audit log" }
            form.row method="get" action="/operator/audit" {
                label { "From" input type="date" name="from" value=(from); }
                label { "To" input type="date" name="to" value=(to); }
                label { "Account" input type="text" name="account" placeholder="id or e-mail" value=(text(&q.account)); }
                label { "Actor" input type="text" name="actor" placeholder="operator:… or cli" value=(text(&q.actor)); }
                label { "Action" input type="text" name="action" list="audit-actions" placeholder="e.g. key." value=(text(&q.action)); }
                datalist #audit-actions { @for a in &actions { option value=(a) {} } }
                button type="submit" { "Show" }
            }
            p { a #audit-csv href={ "/operator/audit.csv?" (query_string(&q)) } { "Download as CSV" } " (every matching entry, oldest first)" }
            @if rows.is_empty() { p.muted { "No entries match." } } @else {
                @if rows.len() as i64 == AUDIT_PAGE { p.muted { "The newest " (AUDIT_PAGE) " entries; the CSV has them all." } }
                div.scroll { table #audit {
                    thead { tr { th { "Time (UTC)" } th { "Actor" } th { "Action" } th { "Account" } th { "Key" } th { "Reason" } } }
                    tbody { @for e in &rows { tr {
                        td { (format_utc(e.row.created_at)) } td { (e.row.actor) } td { code { (e.row.action) } }
                        td { @if let Some(id) = e.row.account_id { a href={ "/operator/accounts/" (id) } { (e.email.clone().unwrap_or_else(|| id.to_string())) } } }
                        td { @if let Some(k) = e.row.key_id { (k) } }
                        td { (e.row.reason.clone().unwrap_or_default()) }
                    } } }
                } }
            }
        }
        section.card #exports {
            h2 { "Exports for accounting" }
            p.muted { "CSV, UTC, oldest first, for the days chosen (at most 366) and one account or all. Amounts are exact USD." }
            @for (what, action) in [("Ledger (top-ups, usage, refunds, adjustments)", "/operator/exports/ledger.csv"), ("Usage records (billed, provider cost, platform loss)", "/operator/exports/usage.csv")] {
                form.row method="get" action=(action) {
                    strong { (what) }
                    label { "From" input type="date" name="from" value=(from); }
                    label { "To" input type="date" name="to" value=(to); }
                    label { "Account" input type="text" name="account" placeholder="all accounts"; }
                    button type="submit" { "Download CSV" }
                }
            }
        }
    })
    .into_response()
}

/// `GET /api/v1/operator/audit`: the newest entries matching the filters.
pub async fn api_audit(
    State(state): State<AppState>,
    _o: Operator,
    Query(q): Query<ExportQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(AUDIT_PAGE);
    if !(1..=AUDIT_PAGE).contains(&limit) {
        return Err(AdminError::invalid("limit", "limit must be from 1 to 200.").into());
    }
    let c = check(&state, &q).await?;
    let rows = state
        .store
        .audit_filtered(&audit_filter(&c, &q), limit)
        .await?;
    Ok(Json(json!({
        "from": format_date(c.from_ms),
        "to": format_date(c.to_ms - DAY_MS),
        "data": rows.iter().map(|e| json!({
            "created_at_ms": e.row.created_at,
            "actor": e.row.actor,
            "action": e.row.action,
            "account_id": e.row.account_id,
            "email": e.email,
            "key_id": e.row.key_id,
            "reason": e.row.reason,
        })).collect::<Vec<_>>(),
    })))
}
