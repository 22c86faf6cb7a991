//! Reads that stream: large result sets (a CSV export of a year of usage, the ledger, the audit
//! log) handed out a few hundred rows at a time as the database sends them, so memory stays flat
//! whatever the number of rows. A task reads the query and passes batches through a small
//! bounded channel: a slow reader slows the query down instead of filling memory, and a reader
//! that goes away (a client that disconnects) stops it.

use super::{AuditEntry, LedgerEntry, Store, StoreError, UsageRecord};
use crate::money::NanoUsd;
use futures_util::StreamExt;
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};
use std::pin::Pin;

/// Rows handed out together.
const BATCH: usize = 256;
/// Batches in flight between the query and its reader.
const DEPTH: usize = 4;

/// Batches of rows, in the query's order; an error ends it.
pub type RowStream<T> =
    Pin<Box<dyn futures_util::Stream<Item = Result<Vec<T>, StoreError>> + Send>>;

/// A bind value of a streamed query.
#[derive(Debug, Clone)]
pub(super) enum Arg {
    Int(i64),
    Text(String),
}

/// Runs `sql` with `args` and streams its rows mapped by `map`.
pub(super) fn stream_rows<T: Send + 'static>(
    pool: &AnyPool,
    sql: String,
    args: Vec<Arg>,
    map: fn(&AnyRow) -> Result<T, StoreError>,
) -> RowStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<T>, StoreError>>(DEPTH);
    let pool = pool.clone();
    tokio::spawn(async move {
        let mut q = sqlx::query(&sql);
        for a in &args {
            q = match a {
                Arg::Int(i) => q.bind(*i),
                Arg::Text(s) => q.bind(s.as_str()),
            };
        }
        let mut rows = q.fetch(&pool);
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(row) = rows.next().await {
            match row.map_err(StoreError::from).and_then(|r| map(&r)) {
                Ok(v) => batch.push(v),
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
            if batch.len() == BATCH
                && tx
                    .send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))))
                    .await
                    .is_err()
            {
                return;
            }
        }
        if !batch.is_empty() {
            let _ = tx.send(Ok(batch)).await;
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// A row of an operator's export, with the e-mail of its account (when it has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported<T> {
    pub row: T,
    pub email: Option<String>,
    /// Usage rows only: what nobody could be billed for (`usage_records.platform_loss_nano`).
    pub platform_loss: NanoUsd,
}

fn exported<T>(
    r: &AnyRow,
    row: fn(&AnyRow) -> Result<T, StoreError>,
) -> Result<Exported<T>, StoreError> {
    Ok(Exported {
        row: row(r)?,
        email: r.try_get("email")?,
        platform_loss: NanoUsd::from_nanos(r.try_get("platform_loss_nano")?),
    })
}

/// Which audit-log entries to show or export. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// At or after (ms).
    pub from_ms: Option<i64>,
    /// Before (ms).
    pub to_ms: Option<i64>,
    /// Exactly this actor (`operator:<email>`, `cli`, `stripe`, …).
    pub actor: Option<String>,
    /// Actions starting with this (`key.` for every key action).
    pub action: Option<String>,
    pub account_id: Option<i64>,
}

impl AuditFilter {
    /// The `WHERE` clause and its binds ($1…$8).
    fn clause(&self) -> (&'static str, Vec<Arg>) {
        let action = self.action.clone().unwrap_or_default();
        let action_like = format!("{}%", action.replace(['%', '_'], ""));
        (
            "l.created_at >= $1 AND l.created_at < $2 AND ($3 = '' OR l.actor = $3)
             AND ($4 = '' OR l.action LIKE $5) AND ($6 = 0 OR l.account_id = $7)",
            vec![
                Arg::Int(self.from_ms.unwrap_or(0)),
                Arg::Int(self.to_ms.unwrap_or(i64::MAX)),
                Arg::Text(self.actor.clone().unwrap_or_default()),
                Arg::Text(action),
                Arg::Text(action_like),
                Arg::Int(i64::from(self.account_id.is_some())),
                Arg::Int(self.account_id.unwrap_or(0)),
            ],
        )
    }
}

const AUDIT_SELECT: &str =
    "SELECT l.actor, l.action, l.account_id, l.key_id, l.reason, l.created_at,
        a.email, CAST(0 AS BIGINT) AS platform_loss_nano
     FROM audit_log l LEFT JOIN accounts a ON a.id = l.account_id";

impl Store {
    /// Every ledger entry in `[from_ms, to_ms)` (of one account, or all), oldest first, with
    /// its account's e-mail: for accounting.
    pub fn ledger_export(
        &self,
        from_ms: i64,
        to_ms: i64,
        account_id: Option<i64>,
    ) -> RowStream<Exported<LedgerEntry>> {
        stream_rows(
            &self.pool,
            "SELECT l.id, l.account_id, l.kind, l.amount_nano, l.external_ref, l.actor, l.reason,
                    l.created_at, a.email, CAST(0 AS BIGINT) AS platform_loss_nano
             FROM ledger l JOIN accounts a ON a.id = l.account_id
             WHERE l.created_at >= $1 AND l.created_at < $2 AND ($3 = 0 OR l.account_id = $4)
             ORDER BY l.created_at, l.id"
                .into(),
            vec![
                Arg::Int(from_ms),
                Arg::Int(to_ms),
                Arg::Int(i64::from(account_id.is_some())),
                Arg::Int(account_id.unwrap_or(0)),
            ],
            |r| exported(r, LedgerEntry::from_row),
        )
    }

    /// Every usage record started in `[from_ms, to_ms)` (of one account, or all), oldest first,
    /// with its account's e-mail and platform loss.
    pub fn usage_export(
        &self,
        from_ms: i64,
        to_ms: i64,
        account_id: Option<i64>,
    ) -> RowStream<Exported<UsageRecord>> {
        stream_rows(
            &self.pool,
            format!(
                "SELECT {}, u.platform_loss_nano, a.email
                 FROM usage_records u JOIN accounts a ON a.id = u.account_id
                 WHERE u.started_at >= $1 AND u.started_at < $2 AND ($3 = 0 OR u.account_id = $4)
                 ORDER BY u.started_at, u.id",
                super::usage::USAGE_COLUMNS
                    .split(", ")
                    .map(|c| format!("u.{}", c.trim()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            vec![
                Arg::Int(from_ms),
                Arg::Int(to_ms),
                Arg::Int(i64::from(account_id.is_some())),
                Arg::Int(account_id.unwrap_or(0)),
            ],
            |r| exported(r, UsageRecord::from_row),
        )
    }

    /// The audit log matching `f`, newest first, at most `limit` entries.
    pub async fn audit_filtered(
        &self,
        f: &AuditFilter,
        limit: i64,
    ) -> Result<Vec<Exported<AuditEntry>>, StoreError> {
        let (clause, mut args) = f.clause();
        args.push(Arg::Int(limit));
        let sql =
            format!("{AUDIT_SELECT} WHERE {clause} ORDER BY l.created_at DESC, l.id DESC LIMIT $8");
        let mut q = sqlx::query(&sql);
        for a in &args {
            q = match a {
                Arg::Int(i) => q.bind(*i),
                Arg::Text(t) => q.bind(t.as_str()),
            };
        }
        q.fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| exported(r, AuditEntry::from_row))
            .collect()
    }

    /// The audit log matching `f`, oldest first, streamed: for accounting.
    pub fn audit_export(&self, f: &AuditFilter) -> RowStream<Exported<AuditEntry>> {
        let (clause, args) = f.clause();
        stream_rows(
            &self.pool,
            format!("{AUDIT_SELECT} WHERE {clause} ORDER BY l.created_at, l.id"),
            args,
            |r| exported(r, AuditEntry::from_row),
        )
    }

    /// The actions the audit log holds, for the operator's filter.
    pub async fn audit_actions(&self) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT DISTINCT action FROM audit_log ORDER BY action")
                .fetch_all(&self.pool)
                .await?,
        )
    }
}
