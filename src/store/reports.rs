//! What the operator reads: revenue, billed usage, provider cost and margin per day and tier,
//! and each upstream's health, from the hourly roll-ups; and key suspension.

use super::keys::{ApiKey, KeyStatus};
use super::{Store, StoreError, audit};
use crate::money::NanoUsd;
use crate::time::now_ms;
use sqlx::Row;

/// Money in per UTC day: top-ups and refunds (ledger), in `[from, to)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyMoney {
    pub day_start_ms: i64,
    pub topups: NanoUsd,
    pub refunds: NanoUsd,
}

/// Billed usage and provider cost per UTC day and tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyMargin {
    pub day_start_ms: i64,
    pub tier: String,
    pub requests: i64,
    pub billed: NanoUsd,
    pub provider_cost: NanoUsd,
}

/// One upstream model's requests since a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamStats {
    pub provider: String,
    pub model: String,
    pub requests: i64,
    pub errors: i64,
    pub avg_latency_ms: i64,
    pub avg_ttft_ms: Option<i64>,
    pub fallbacks: i64,
    pub last_error_at: Option<i64>,
}

impl Store {
    pub async fn money_daily(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<DailyMoney>, StoreError> {
        let rows = sqlx::query(
            "SELECT created_at / 86400000 AS day,
                    CAST(COALESCE(SUM(CASE WHEN kind = 'topup' THEN amount_nano ELSE 0 END), 0) AS BIGINT) AS topups,
                    CAST(COALESCE(SUM(CASE WHEN kind = 'refund' THEN -amount_nano ELSE 0 END), 0) AS BIGINT) AS refunds
             FROM ledger WHERE created_at >= $1 AND created_at < $2 AND kind IN ('topup', 'refund')
             GROUP BY created_at / 86400000 ORDER BY day",
        )
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DailyMoney {
                    day_start_ms: r.try_get::<i64, _>("day")? * 86_400_000,
                    topups: NanoUsd::from_nanos(r.try_get("topups")?),
                    refunds: NanoUsd::from_nanos(r.try_get("refunds")?),
                })
            })
            .collect()
    }

    pub async fn margin_daily(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<DailyMargin>, StoreError> {
        let rows = sqlx::query(
            "SELECT hour_ms / 86400000 AS day, tier, CAST(SUM(requests) AS BIGINT) AS requests,
                    CAST(SUM(billed_nano) AS BIGINT) AS billed,
                    CAST(SUM(provider_cost_nano) AS BIGINT) AS cost
             FROM usage_hourly_platform WHERE hour_ms >= $1 AND hour_ms < $2
             GROUP BY hour_ms / 86400000, tier ORDER BY day, tier",
        )
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DailyMargin {
                    day_start_ms: r.try_get::<i64, _>("day")? * 86_400_000,
                    tier: r.try_get("tier")?,
                    requests: r.try_get("requests")?,
                    billed: NanoUsd::from_nanos(r.try_get("billed")?),
                    provider_cost: NanoUsd::from_nanos(r.try_get("cost")?),
                })
            })
            .collect()
    }

    /// Requests, errors (status 5xx, or no upstream answer), latency and fallbacks per upstream
    /// model from the start of the hour holding `since_ms` on, from the roll-ups. Averages are
    /// whole milliseconds, rounded down.
    pub async fn upstream_stats(&self, since_ms: i64) -> Result<Vec<UpstreamStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT provider, upstream_model, CAST(SUM(requests) AS BIGINT) AS requests,
                    CAST(SUM(server_errors) AS BIGINT) AS errors,
                    CAST(SUM(latency_ms_sum) AS BIGINT) AS latency_sum,
                    CAST(SUM(ttft_count) AS BIGINT) AS ttft_count,
                    CAST(SUM(ttft_ms_sum) AS BIGINT) AS ttft_sum,
                    CAST(SUM(fallbacks) AS BIGINT) AS fallbacks,
                    MAX(last_error_at) AS last_error
             FROM usage_hourly_platform
             WHERE hour_ms >= $1 AND provider <> ''
             GROUP BY provider, upstream_model ORDER BY provider, upstream_model",
        )
        .bind(super::rollups::hour_of(since_ms))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let requests: i64 = r.try_get("requests")?;
                let ttft_count: i64 = r.try_get("ttft_count")?;
                Ok(UpstreamStats {
                    provider: r.try_get("provider")?,
                    model: r.try_get("upstream_model")?,
                    requests,
                    errors: r.try_get("errors")?,
                    avg_latency_ms: r.try_get::<i64, _>("latency_sum")? / requests.max(1),
                    avg_ttft_ms: (ttft_count > 0)
                        .then(|| r.try_get::<i64, _>("ttft_sum").map(|s| s / ttft_count))
                        .transpose()?,
                    fallbacks: r.try_get("fallbacks")?,
                    last_error_at: r.try_get("last_error")?,
                })
            })
            .collect()
    }

    /// Suspends a key (Acceptable Use Policy) or makes a suspended key active again, with the
    /// reason in the audit log. A revoked key stays revoked.
    pub async fn set_key_status(
        &self,
        key_id: i64,
        status: KeyStatus,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<ApiKey, StoreError> {
        if status == KeyStatus::Revoked {
            return self.revoke_key(key_id, actor, reason).await;
        }
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE api_keys SET status = $1, updated_at = $2 WHERE id = $3 AND status <> 'revoked'",
        )
        .bind(status.as_str())
        .bind(now_ms())
        .bind(key_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            drop(tx);
            let key = self.key(key_id).await?;
            return Err(StoreError::KeyRevoked(key.id));
        }
        let key_row = sqlx::query("SELECT account_id FROM api_keys WHERE id = $1")
            .bind(key_id)
            .fetch_one(&mut *tx)
            .await?;
        let account_id: i64 = key_row.try_get("account_id")?;
        let action = format!("key.{}", status.as_str());
        audit(
            &mut tx,
            actor,
            &action,
            Some(account_id),
            Some(key_id),
            reason,
        )
        .await?;
        tx.commit().await?;
        self.key(key_id).await
    }
}
