//! Usage records (one per request, written in batches off the request path) and the Stripe
//! bookkeeping tables (checkout sessions, processed event ids).

use super::{Store, StoreError};
use crate::money::NanoUsd;
use crate::time::now_ms;
use sqlx::Row;
use sqlx::any::AnyRow;

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
    fn from_row(r: &AnyRow) -> Result<Self, StoreError> {
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

const USAGE_COLUMNS: &str = "request_id, account_id, key_id, tier, provider, upstream_model, stream, \
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
    for i in 0..rows.len() {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..USAGE_PARAMS {
            if c > 0 {
                sql.push(',');
            }
            super::placeholder(&mut sql, backend, i * USAGE_PARAMS + c + 1);
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (request_id) DO NOTHING RETURNING request_id");
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
    /// Writes a batch in one transaction. Records whose request id is already stored are skipped
    /// (so a retried batch is harmless); returns how many were new.
    pub async fn insert_usage_batch(&self, records: &[UsageRecord]) -> Result<u64, StoreError> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let mut inserted = 0;
        for chunk in records.chunks(200) {
            let rows: Vec<&UsageRecord> = chunk.iter().collect();
            inserted += insert_usage_rows(&mut tx, self.backend, &rows).await?.len() as u64;
        }
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
        let (status_lo, status_hi) = match f.status {
            Some(StatusFilter::Exact(s)) => (s, s),
            Some(StatusFilter::Ok) => (200, 299),
            Some(StatusFilter::Error) => (300, 999),
            None => (0, 999),
        };
        let rows = sqlx::query(&format!(
            "SELECT {USAGE_COLUMNS} FROM usage_records
             WHERE account_id = $1 AND started_at < $2 AND started_at >= $3
               AND ($4 = 0 OR key_id = $5) AND ($6 = '' OR tier = $6)
               AND http_status >= $7 AND http_status <= $8
             ORDER BY started_at DESC, id DESC LIMIT $9"
        ))
        .bind(account_id)
        .bind(
            f.before_ms
                .unwrap_or(i64::MAX)
                .min(f.to_ms.unwrap_or(i64::MAX)),
        )
        .bind(f.from_ms.unwrap_or(0))
        .bind(i64::from(f.key_id.is_some()))
        .bind(f.key_id.unwrap_or(0))
        .bind(f.tier.clone().unwrap_or_default())
        .bind(status_lo)
        .bind(status_hi)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(UsageRecord::from_row).collect()
    }

    /// What each of `key_ids` has been billed in all (keys without usage are left out).
    pub async fn key_spent(&self, key_ids: &[i64]) -> Result<Vec<(i64, NanoUsd)>, StoreError> {
        let mut out = Vec::new();
        for chunk in key_ids.chunks(500) {
            let mut sql = String::from(
                "SELECT key_id, CAST(SUM(billed_nano) AS BIGINT) AS spent FROM usage_records WHERE key_id IN (",
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

    /// Requests and billed amount per key of the account in `[from_ms, to_ms)`, most spent first.
    pub async fn spend_by_key(
        &self,
        account_id: i64,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, i64, NanoUsd)>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, COUNT(*) AS requests, CAST(SUM(billed_nano) AS BIGINT) AS billed_nano
             FROM usage_records
             WHERE account_id = $1 AND started_at >= $2 AND started_at < $3
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

    /// Requests, tokens and billed amount per UTC day and tier in `[from_ms, to_ms)`.
    pub async fn usage_daily(
        &self,
        account_id: i64,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<DailyUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT started_at / 86400000 AS day, tier, COUNT(*) AS requests,
                    CAST(SUM(input_tokens) AS BIGINT) AS input_tokens,
                    CAST(SUM(output_tokens) AS BIGINT) AS output_tokens,
                    CAST(SUM(billed_nano) AS BIGINT) AS billed_nano
             FROM usage_records
             WHERE account_id = $1 AND started_at >= $2 AND started_at < $3
             GROUP BY started_at / 86400000, tier ORDER BY day, tier",
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
