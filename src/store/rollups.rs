//! Hourly usage roll-ups: what the charts, the key pages and the operator's reports read instead
//! of the raw usage records, so their cost follows the number of hours shown, not the number of
//! requests (and so the sums survive the retention of raw rows).
//!
//! Two tables: `usage_hourly` per (hour, account, key, tier, provider, upstream model), and
//! `usage_hourly_platform` per (hour, tier, provider, upstream model) over every account. Whoever
//! inserts usage records adds the ones that were really inserted (a request id already stored
//! is skipped, and counts nothing) in the same transaction: [`Rollup`] sums a batch in memory
//! first, so a batch of hundreds of rows is a handful of upserts.

use super::{StoreError, UsageRecord};
use crate::conf::Backend;
use crate::money::MoneyError;
use std::collections::BTreeMap;

use crate::time::HOUR_MS;

/// Rows per upsert statement.
const ROWS_PER_STATEMENT: usize = 25;

/// The summed columns, in the order of [`Sums::0`].
const SUM_COLUMNS: [&str; 15] = [
    "requests",
    "failed",
    "server_errors",
    "fallbacks",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "billed_nano",
    "provider_cost_nano",
    "platform_loss_nano",
    "latency_ms_sum",
    "ttft_count",
    "ttft_ms_sum",
];

/// The start of the UTC hour holding `ms`.
pub fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// One roll-up row's sums, and the start of its last request answered 500 or more.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sums([i64; SUM_COLUMNS.len()], Option<i64>);

impl Sums {
    fn of(r: &UsageRecord, billed: i64, loss: i64) -> Sums {
        let ok = (200..=299).contains(&r.http_status);
        let server_error = r.http_status >= 500;
        Sums(
            [
                1,
                i64::from(!ok),
                i64::from(server_error),
                i64::from(r.attempts > 1),
                r.input_tokens,
                r.output_tokens,
                r.cached_input_tokens,
                r.cache_write_tokens,
                r.reasoning_tokens,
                billed,
                r.provider_cost.nanos(),
                loss,
                r.latency_ms,
                i64::from(r.ttft_ms.is_some()),
                r.ttft_ms.unwrap_or(0),
            ],
            server_error.then_some(r.started_at),
        )
    }

    fn add(&mut self, other: &Sums) -> Result<(), StoreError> {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.checked_add(b).ok_or(MoneyError::Overflow)?;
        }
        self.1 = self.1.max(other.1);
        Ok(())
    }
}

/// Who and what a `usage_hourly` row is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct HourKey {
    hour_ms: i64,
    account_id: i64,
    key_id: i64,
    tier: String,
    provider: String,
    model: String,
}

/// A batch's usage, summed per roll-up row before it is written.
#[derive(Debug, Default)]
pub(super) struct Rollup {
    rows: BTreeMap<HourKey, Sums>,
}

impl Rollup {
    /// Counts one inserted record, billed `billed` with `loss` of it a platform loss (what the
    /// stored row says after settlement).
    pub(super) fn add(
        &mut self,
        r: &UsageRecord,
        billed: i64,
        loss: i64,
    ) -> Result<(), StoreError> {
        let key = HourKey {
            hour_ms: hour_of(r.started_at),
            account_id: r.account_id,
            key_id: r.key_id,
            tier: r.tier.clone(),
            provider: r.provider.clone().unwrap_or_default(),
            model: r.upstream_model.clone().unwrap_or_default(),
        };
        self.rows
            .entry(key)
            .or_default()
            .add(&Sums::of(r, billed, loss))
    }

    /// Adds the sums to both roll-up tables inside the caller's transaction. Rows are upserted
    /// in key order, so concurrent writers (gateway nodes) lock shared rows in one order and
    /// never deadlock on them.
    pub(super) async fn write_in(
        self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        backend: Backend,
    ) -> Result<(), StoreError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut platform: BTreeMap<(i64, &str, &str, &str), Sums> = BTreeMap::new();
        for (k, s) in &self.rows {
            platform
                .entry((k.hour_ms, &k.tier, &k.provider, &k.model))
                .or_default()
                .add(s)?;
        }
        let rows: Vec<(&HourKey, &Sums)> = self.rows.iter().collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = upsert_sql(
                "usage_hourly",
                &[
                    "hour_ms",
                    "account_id",
                    "key_id",
                    "tier",
                    "provider",
                    "upstream_model",
                ],
                chunk.len(),
                backend,
            );
            let mut q = sqlx::query(&sql);
            for (k, s) in chunk {
                q = q
                    .bind(k.hour_ms)
                    .bind(k.account_id)
                    .bind(k.key_id)
                    .bind(k.tier.as_str())
                    .bind(k.provider.as_str())
                    .bind(k.model.as_str());
                for v in s.0 {
                    q = q.bind(v);
                }
                q = q.bind(s.1);
            }
            q.execute(&mut **tx).await?;
        }
        let rows: Vec<_> = platform.into_iter().collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = upsert_sql(
                "usage_hourly_platform",
                &["hour_ms", "tier", "provider", "upstream_model"],
                chunk.len(),
                backend,
            );
            let mut q = sqlx::query(&sql);
            for ((hour, tier, provider, model), s) in chunk {
                q = q.bind(*hour).bind(*tier).bind(*provider).bind(*model);
                for v in s.0 {
                    q = q.bind(v);
                }
                q = q.bind(s.1);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// `INSERT … ON CONFLICT (keys) DO UPDATE SET sum = sum + excluded.sum, …` for `n` rows: the
/// same text on SQLite and PostgreSQL.
fn upsert_sql(table: &str, keys: &[&str], n: usize, backend: Backend) -> String {
    let per_row = keys.len() + SUM_COLUMNS.len() + 1;
    let mut sql = format!(
        "INSERT INTO {table} ({}, {}, last_error_at) VALUES ",
        keys.join(", "),
        SUM_COLUMNS.join(", ")
    );
    super::push_values(&mut sql, backend, n, per_row);
    sql.push_str(&format!(
        " ON CONFLICT ({}) DO UPDATE SET ",
        keys.join(", ")
    ));
    for c in SUM_COLUMNS {
        sql.push_str(&format!("{c} = {table}.{c} + excluded.{c}, "));
    }
    sql.push_str(&format!(
        "last_error_at = CASE WHEN excluded.last_error_at IS NOT NULL
             AND ({table}.last_error_at IS NULL OR excluded.last_error_at > {table}.last_error_at)
             THEN excluded.last_error_at ELSE {table}.last_error_at END"
    ));
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_are_utc_hour_starts() {
        assert_eq!(hour_of(0), 0);
        assert_eq!(hour_of(HOUR_MS - 1), 0);
        assert_eq!(hour_of(HOUR_MS), HOUR_MS);
        assert_eq!(hour_of(1_700_000_123_456), 1_699_999_200_000);
    }

    #[test]
    fn upsert_has_one_placeholder_per_value() {
        let sql = upsert_sql(
            "usage_hourly_platform",
            &["hour_ms", "tier"],
            2,
            Backend::Postgres,
        );
        assert!(sql.contains("$36"));
        assert!(!sql.contains("$37"));
        assert!(sql.contains("requests = usage_hourly_platform.requests + excluded.requests"));
    }
}
