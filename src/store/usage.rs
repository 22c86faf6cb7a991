//! Usage records (one per request, written in batches off the request path) and the Stripe
//! bookkeeping tables (checkout sessions, processed event ids).

use super::export::{Arg, RowStream, stream_rows};
use super::rollups::Rollup;
use super::{Store, StoreError};
use crate::money::NanoUsd;
use crate::time::now_ms;
use sqlx::Row;
use sqlx::any::AnyRow;
use std::collections::HashSet;

/// Everything recorded about one request (ARCHITECTURE.md, request flow step 7).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsageRecord {
    /// Unique per request; a retried batch cannot record a request twice.
    pub request_id: String,
    pub account_id: i64,
    pub key_id: i64,
    pub tier: String,
    /// `None` when the request failed before an upstream was chosen.
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub stream: bool,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// Of `input_tokens`, read from the upstream's prompt cache.
    #[serde(default)]
    pub cached_input_tokens: i64,
    /// Of `input_tokens`, written to the upstream's prompt cache.
    #[serde(default)]
    pub cache_write_tokens: i64,
    /// Of `output_tokens`, spent on reasoning.
    #[serde(default)]
    pub reasoning_tokens: i64,
    /// What the upstream charges us.
    pub provider_cost: NanoUsd,
    /// What the customer pays (the tier's rate).
    pub billed: NanoUsd,
    pub http_status: i64,
    pub error_code: Option<String>,
    pub attempts: i64,
    pub latency_ms: i64,
    pub ttft_ms: Option<i64>,
    pub started_at: i64,
    pub finished_at: i64,
}

impl UsageRecord {
    pub(super) fn from_row(r: &AnyRow) -> Result<Self, StoreError> {
        Ok(UsageRecord {
            request_id: r.try_get("request_id")?,
            account_id: r.try_get("account_id")?,
            key_id: r.try_get("key_id")?,
            tier: r.try_get("tier")?,
            provider: r.try_get("provider")?,
            upstream_model: r.try_get("upstream_model")?,
            stream: r.try_get::<i64, _>("stream")? != 0,
            input_tokens: r.try_get("input_tokens")?,
            output_tokens: r.try_get("output_tokens")?,
            cached_input_tokens: r.try_get("cached_input_tokens")?,
            cache_write_tokens: r.try_get("cache_write_tokens")?,
            reasoning_tokens: r.try_get("reasoning_tokens")?,
            provider_cost: NanoUsd::from_nanos(r.try_get("provider_cost_nano")?),
            billed: NanoUsd::from_nanos(r.try_get("billed_nano")?),
            http_status: r.try_get("http_status")?,
            error_code: r.try_get("error_code")?,
            attempts: r.try_get("attempts")?,
            latency_ms: r.try_get("latency_ms")?,
            ttft_ms: r.try_get("ttft_ms")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
        })
    }
}

pub(super) const USAGE_COLUMNS: &str = "request_id, account_id, key_id, tier, provider, upstream_model, stream, \
     input_tokens, output_tokens, provider_cost_nano, billed_nano, http_status, error_code, attempts, \
     latency_ms, ttft_ms, started_at, finished_at, cached_input_tokens, cache_write_tokens, \
     reasoning_tokens";

/// Columns in [`USAGE_COLUMNS`], and one more: `created_at`.
const USAGE_PARAMS: usize = 22;

/// Inserts records inside a caller's transaction in one statement; returns the request ids that
/// were new (a request id already stored is skipped).
pub(super) async fn insert_usage_rows(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: crate::conf::Backend,
    rows: &[&UsageRecord],
) -> Result<Vec<String>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = format!("INSERT INTO usage_records ({USAGE_COLUMNS}, created_at) VALUES ");
    super::push_values(&mut sql, backend, rows.len(), USAGE_PARAMS);
    // On PostgreSQL usage_records is partitioned by month of started_at, and a partitioned
    // table's unique key must hold the partition key: a settlement stored twice has the same
    // request id and the same start, so this still skips it.
    sql.push_str(match backend {
        crate::conf::Backend::Sqlite => " ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
        crate::conf::Backend::Postgres => {
            " ON CONFLICT (request_id, started_at) DO NOTHING RETURNING request_id"
        }
    });
    let now = now_ms();
    let mut q = sqlx::query(&sql);
    for r in rows {
        q = q
            .bind(&r.request_id)
            .bind(r.account_id)
            .bind(r.key_id)
            .bind(&r.tier)
            .bind(r.provider.as_deref())
            .bind(r.upstream_model.as_deref())
            .bind(i64::from(r.stream))
            .bind(r.input_tokens)
            .bind(r.output_tokens)
            .bind(r.provider_cost.nanos())
            .bind(r.billed.nanos())
            .bind(r.http_status)
            .bind(r.error_code.as_deref())
            .bind(r.attempts)
            .bind(r.latency_ms)
            .bind(r.ttft_ms)
            .bind(r.started_at)
            .bind(r.finished_at)
            .bind(r.cached_input_tokens)
            .bind(r.cache_write_tokens)
            .bind(r.reasoning_tokens)
            .bind(now);
    }
    let inserted = q.fetch_all(&mut **tx).await?;
    inserted
        .iter()
        .map(|r| Ok(r.try_get::<String, _>(0)?))
        .collect()
}

impl Store {
    /// Writes a batch in one transaction, with its roll-ups. Records whose request id is already
    /// stored are skipped (so a retried batch is harmless, and counts nothing twice); returns how
    /// many were new.
    pub async fn insert_usage_batch(&self, records: &[UsageRecord]) -> Result<u64, StoreError> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let mut inserted = 0;
        let mut rollup = Rollup::default();
        for chunk in records.chunks(200) {
            let rows: Vec<&UsageRecord> = chunk.iter().collect();
            let mut new: HashSet<String> = insert_usage_rows(&mut tx, self.backend, &rows)
                .await?
                .into_iter()
                .collect();
            for r in chunk {
                if new.remove(&r.request_id) {
                    rollup.add(r, r.billed.nanos(), 0)?;
                    inserted += 1;
                }
            }
        }
        rollup.write_in(&mut tx, self.backend).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    /// An account's requests, newest first, `limit` at a time before the given start time.
    pub async fn usage_page(
        &self,
        account_id: i64,
        before_started_at: Option<i64>,
        limit: i64,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        self.usage_filtered(
            account_id,
            &UsageFilter {
                before_ms: before_started_at,
                ..UsageFilter::default()
            },
            limit,
        )
        .await
    }

    /// An account's usage records matching `f`, newest first.
    pub async fn usage_filtered(
        &self,
        account_id: i64,
        f: &UsageFilter,
        limit: i64,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let (sql, args) = usage_select(account_id, f, limit);
        let mut q = sqlx::query(&sql);
        for a in &args {
            q = match a {
                Arg::Int(i) => q.bind(*i),
                Arg::Text(t) => q.bind(t.as_str()),
            };
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(UsageRecord::from_row).collect()
    }

    /// The same rows as [`Store::usage_filtered`], streamed (for a CSV export: memory stays flat
    /// however many rows there are).
    pub fn usage_filtered_stream(
        &self,
        account_id: i64,
        f: &UsageFilter,
        limit: i64,
    ) -> RowStream<UsageRecord> {
        let (sql, args) = usage_select(account_id, f, limit);
        stream_rows(&self.pool, sql, args, UsageRecord::from_row)
    }

    /// What each of `key_ids` has been billed in all (keys without usage are left out), from the
    /// roll-ups (they outlive retention).
    pub async fn key_spent(&self, key_ids: &[i64]) -> Result<Vec<(i64, NanoUsd)>, StoreError> {
        let mut out = Vec::new();
        for chunk in key_ids.chunks(500) {
            let mut sql = String::from(
                "SELECT key_id, CAST(SUM(billed_nano) AS BIGINT) AS spent FROM usage_hourly WHERE key_id IN (",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push(',');
                }
                super::placeholder(&mut sql, self.backend, i + 1);
            }
            sql.push_str(") GROUP BY key_id");
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            for r in q.fetch_all(&self.pool).await? {
                out.push((
                    r.try_get("key_id")?,
                    NanoUsd::from_nanos(r.try_get("spent")?),
                ));
            }
        }
        Ok(out)
    }

    /// Requests and billed amount per key of the account in `[from_ms, to_ms)` (whole hours), most
    /// spent first, from the roll-ups.
    pub async fn spend_by_key(
        &self,
        account_id: i64,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, i64, NanoUsd)>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, CAST(SUM(requests) AS BIGINT) AS requests,
                    CAST(SUM(billed_nano) AS BIGINT) AS billed_nano
             FROM usage_hourly
             WHERE account_id = $1 AND hour_ms >= $2 AND hour_ms < $3
             GROUP BY key_id ORDER BY billed_nano DESC, key_id",
        )
        .bind(account_id)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("key_id")?,
                    r.try_get("requests")?,
                    NanoUsd::from_nanos(r.try_get("billed_nano")?),
                ))
            })
            .collect()
    }

    /// Requests, tokens and billed amount per UTC day and tier in `[from_ms, to_ms)` (whole
    /// hours), from the roll-ups.
    pub async fn usage_daily(
        &self,
        account_id: i64,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<DailyUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT hour_ms / 86400000 AS day, tier, CAST(SUM(requests) AS BIGINT) AS requests,
                    CAST(SUM(input_tokens) AS BIGINT) AS input_tokens,
                    CAST(SUM(output_tokens) AS BIGINT) AS output_tokens,
                    CAST(SUM(billed_nano) AS BIGINT) AS billed_nano
             FROM usage_hourly
             WHERE account_id = $1 AND hour_ms >= $2 AND hour_ms < $3
             GROUP BY hour_ms / 86400000, tier ORDER BY day, tier",
        )
        .bind(account_id)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DailyUsage {
                    day_start_ms: r.try_get::<i64, _>("day")? * 86_400_000,
                    tier: r.try_get("tier")?,
                    requests: r.try_get("requests")?,
                    input_tokens: r.try_get("input_tokens")?,
                    output_tokens: r.try_get("output_tokens")?,
                    billed: NanoUsd::from_nanos(r.try_get("billed_nano")?),
                })
            })
            .collect()
    }
}

/// The query behind [`Store::usage_filtered`]: an account's rows newest first, walked by the
/// `(account_id, started_at, id)` index.
fn usage_select(account_id: i64, f: &UsageFilter, limit: i64) -> (String, Vec<Arg>) {
    let (status_lo, status_hi) = match f.status {
        Some(StatusFilter::Exact(s)) => (s, s),
        Some(StatusFilter::Ok) => (200, 299),
        Some(StatusFilter::Error) => (300, 999),
        None => (0, 999),
    };
    let sql = format!(
        "SELECT {USAGE_COLUMNS} FROM usage_records
         WHERE account_id = $1 AND started_at < $2 AND started_at >= $3
           AND ($4 = 0 OR key_id = $5) AND ($6 = '' OR tier = $6)
           AND http_status >= $7 AND http_status <= $8
         ORDER BY started_at DESC, id DESC LIMIT $9"
    );
    let args = vec![
        Arg::Int(account_id),
        Arg::Int(
            f.before_ms
                .unwrap_or(i64::MAX)
                .min(f.to_ms.unwrap_or(i64::MAX)),
        ),
        Arg::Int(f.from_ms.unwrap_or(0)),
        Arg::Int(i64::from(f.key_id.is_some())),
        Arg::Int(f.key_id.unwrap_or(0)),
        Arg::Text(f.tier.clone().unwrap_or_default()),
        Arg::Int(status_lo),
        Arg::Int(status_hi),
        Arg::Int(limit),
    ];
    (sql, args)
}

/// Which usage records to show. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageFilter {
    pub key_id: Option<i64>,
    pub tier: Option<String>,
    pub status: Option<StatusFilter>,
    /// Started at or after (ms).
    pub from_ms: Option<i64>,
    /// Started before (ms).
    pub to_ms: Option<i64>,
    /// Started before (ms): the cursor of the next page.
    pub before_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Exact(i64),
    /// 2xx.
    Ok,
    /// Anything else.
    Error,
}

/// One UTC day of one tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyUsage {
    pub day_start_ms: i64,
    pub tier: String,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub billed: NanoUsd,
}
