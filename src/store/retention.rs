//! Retention of raw usage records: old rows go, their hourly roll-ups stay.
//!
//! On SQLite the oldest rows are deleted a bounded batch at a time (each a short write
//! transaction, so the gateway's usage writer never waits long behind one). On PostgreSQL
//! `usage_records` is partitioned by month of `started_at`: the task creates the coming months'
//! partitions ahead, moves any rows that landed in the default partition into their month's, and
//! drops whole months once they are entirely older than the cutoff (so a row is kept at least
//! the retention period and at most a month longer), without deleting row by row.

use super::{Store, StoreError};
use crate::conf::Backend;
use std::time::Duration;

/// What one retention run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// PostgreSQL month partitions made (or found) for the coming months.
    pub partitions: Vec<String>,
    /// PostgreSQL month partitions dropped whole.
    pub partitions_dropped: i64,
    /// Rows deleted one batch at a time.
    pub rows_deleted: u64,
    /// Delete statements run.
    pub batches: u64,
}

const MONTH_MS: i64 = 31 * 86_400_000;

impl Store {
    /// On PostgreSQL, makes sure the months holding `now_ms` and the `months_ahead` after it have
    /// their partitions, and that any month with rows in the default partition gets its own.
    /// Returns the partitions' names (nothing on SQLite).
    pub async fn prepare_usage_partitions(
        &self,
        now_ms: i64,
        months_ahead: u32,
    ) -> Result<Vec<String>, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(Vec::new());
        }
        let mut months: Vec<i64> = (0..=i64::from(months_ahead))
            .map(|i| now_ms + i * MONTH_MS)
            .collect();
        let strays: Vec<i64> = sqlx::query_scalar(
            "SELECT CAST(MIN(started_at) AS BIGINT) FROM usage_records_default
             GROUP BY date_trunc('month', to_timestamp(started_at / 1000.0) AT TIME ZONE 'UTC')",
        )
        .fetch_all(&self.pool)
        .await?;
        months.extend(strays);
        let mut names = Vec::with_capacity(months.len());
        for at in months {
            let name: String = sqlx::query_scalar("SELECT usage_records_month_partition($1)")
                .bind(at)
                .fetch_one(&self.pool)
                .await?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Deletes up to `limit` of the oldest usage records started before `cutoff_ms` and returns
    /// how many went. On PostgreSQL it touches only the default partition (month partitions go
    /// whole, see [`Store::apply_usage_retention`]).
    pub async fn delete_usage_batch(&self, cutoff_ms: i64, limit: i64) -> Result<u64, StoreError> {
        let sql = match self.backend {
            Backend::Sqlite => {
                "DELETE FROM usage_records WHERE id IN (
                     SELECT id FROM usage_records WHERE started_at < $1 ORDER BY started_at LIMIT $2)"
            }
            Backend::Postgres => {
                "DELETE FROM usage_records_default WHERE id IN (
                     SELECT id FROM usage_records_default WHERE started_at < $1
                     ORDER BY started_at LIMIT $2)"
            }
        };
        Ok(sqlx::query(sql)
            .bind(cutoff_ms)
            .bind(limit)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// One retention run: partitions prepared ahead (PostgreSQL), then, when `retention` is
    /// set, every raw usage record started before `now_ms - retention` removed (whole months on
    /// PostgreSQL; `batch_rows` at a time with `pause` between batches elsewhere). Roll-ups stay.
    pub async fn apply_usage_retention(
        &self,
        now_ms: i64,
        retention: Option<Duration>,
        batch_rows: i64,
        pause: Duration,
    ) -> Result<RetentionReport, StoreError> {
        let mut report = RetentionReport {
            partitions: self.prepare_usage_partitions(now_ms, 2).await?,
            ..RetentionReport::default()
        };
        let Some(retention) = retention else {
            return Ok(report);
        };
        let cutoff = now_ms - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        if self.backend == Backend::Postgres {
            report.partitions_dropped =
                sqlx::query_scalar::<_, i32>("SELECT usage_records_drop_months($1)")
                    .bind(cutoff)
                    .fetch_one(&self.pool)
                    .await?
                    .into();
        }
        loop {
            let n = self.delete_usage_batch(cutoff, batch_rows).await?;
            report.batches += 1;
            report.rows_deleted += n;
            if n < u64::try_from(batch_rows).unwrap_or(0) {
                break;
            }
            tokio::time::sleep(pause).await;
        }
        Ok(report)
    }
}
