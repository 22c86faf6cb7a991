//! What the operator prepaid to each upstream provider, and what is left of it.
//!
//! A reseller buys capacity first: each prepayment is one append-only row (a unique reference, so
//! the same payment is never recorded twice), and the provider cost of every usage record counts
//! against the provider's credit from the moment its first prepayment was recorded. What is left
//! is exact to the nano-USD: the credits recorded, less the provider cost written since.

use super::{Store, StoreError, is_unique_violation};
use crate::money::NanoUsd;
use sqlx::Row;

use crate::time::{DAY_MS, HOUR_MS};

/// A provider's spend rate is taken over this window.
pub const RATE_WINDOW_MS: i64 = 7 * DAY_MS;

/// One recorded prepayment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamCredit {
    pub id: i64,
    pub provider: String,
    pub amount: NanoUsd,
    pub reference: String,
    pub note: Option<String>,
    pub actor: Option<String>,
    pub created_at: i64,
}

/// A provider's prepaid credit now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderCredit {
    pub provider: String,
    /// Every prepayment recorded.
    pub credited: NanoUsd,
    /// Provider cost written since the first prepayment was recorded.
    pub spent: NanoUsd,
    /// `credited - spent` (below zero once usage went past the prepayments).
    pub remaining: NanoUsd,
    /// Provider cost of the last `window_ms` (for the spend rate).
    pub spent_in_window: NanoUsd,
    /// The window the rate is taken over: the asked one, or less when the first prepayment is
    /// more recent.
    pub window_ms: i64,
    pub first_at: i64,
}

impl ProviderCredit {
    /// Spend per day over the window.
    pub fn per_day(&self) -> Option<NanoUsd> {
        (self.window_ms > 0).then(|| {
            let nanos = i128::from(self.spent_in_window.nanos()) * i128::from(DAY_MS)
                / i128::from(self.window_ms.max(1));
            NanoUsd::from_nanos(nanos.clamp(0, i128::from(i64::MAX)) as i64)
        })
    }

    /// Days of credit left at the window's rate (`None`: nothing spent in it).
    pub fn days_left(&self) -> Option<f64> {
        let per_day = self.per_day()?.nanos();
        (per_day > 0).then(|| self.remaining.nanos().max(0) as f64 / per_day as f64)
    }
}

impl Store {
    /// The provider cost written for `provider` so far, over every usage record ever written:
    /// from the hourly roll-ups, which the usage writer keeps equal to the rows' sums in the
    /// transaction that inserts them and which retention keeps (the raw rows it deletes must
    /// not give credit back).
    async fn provider_spend<'e, E>(
        executor: E,
        provider: &str,
        since_ms: i64,
    ) -> Result<i64, StoreError>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(provider_cost_nano), 0) AS BIGINT) AS spent
             FROM usage_hourly_platform WHERE provider = $1 AND hour_ms >= $2",
        )
        .bind(provider)
        .bind(since_ms - since_ms.rem_euclid(HOUR_MS))
        .fetch_one(executor)
        .await?;
        Ok(row.try_get("spent")?)
    }

    /// Records a prepayment to `provider` (positive), or a correction (negative, with a note).
    /// The same `reference` is never recorded twice.
    pub async fn add_upstream_credit(
        &self,
        provider: &str,
        amount: NanoUsd,
        reference: &str,
        note: Option<&str>,
        actor: &str,
    ) -> Result<UpstreamCredit, StoreError> {
        if amount == NanoUsd::ZERO {
            return Err(StoreError::Invalid(
                "a prepayment of 0 changes nothing".into(),
            ));
        }
        if reference.trim().is_empty() {
            return Err(StoreError::Invalid(
                "a prepayment needs a reference (the provider's invoice or payment id)".into(),
            ));
        }
        let mut tx = self.pool.begin().await?;
        let spent = Store::provider_spend(&mut *tx, provider, 0).await?;
        let now = crate::time::now_ms();
        let inserted = sqlx::query(
            "INSERT INTO upstream_credits (provider, amount, reference, note, actor, spent_before, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(provider)
        .bind(amount.nanos())
        .bind(reference)
        .bind(note)
        .bind(actor)
        .bind(spent)
        .bind(now)
        .fetch_one(&mut *tx)
        .await;
        let id: i64 = match inserted {
            Ok(row) => row.try_get("id")?,
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Invalid(format!(
                    "a prepayment with reference {reference:?} is already recorded (already applied)"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        super::audit(
            &mut tx,
            actor,
            "upstream_credit",
            None,
            None,
            Some(&format!("{provider}: {amount} ({reference})")),
        )
        .await?;
        tx.commit().await?;
        Ok(UpstreamCredit {
            id,
            provider: provider.to_owned(),
            amount,
            reference: reference.to_owned(),
            note: note.map(str::to_owned),
            actor: Some(actor.to_owned()),
            created_at: now,
        })
    }

    /// Every prepayment recorded, oldest first.
    pub async fn upstream_credits(&self) -> Result<Vec<UpstreamCredit>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, provider, amount, reference, note, actor, created_at
             FROM upstream_credits ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UpstreamCredit {
                    id: r.try_get("id")?,
                    provider: r.try_get("provider")?,
                    amount: NanoUsd::from_nanos(r.try_get("amount")?),
                    reference: r.try_get("reference")?,
                    note: r.try_get("note")?,
                    actor: r.try_get("actor")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Each provider with prepaid credit recorded: what is left, and its spend over the last
    /// [`RATE_WINDOW_MS`] (or since its first prepayment, when that is more recent).
    pub async fn provider_credits(&self) -> Result<Vec<ProviderCredit>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.provider, CAST(SUM(c.amount) AS BIGINT) AS credited, MIN(c.created_at) AS first_at,
                    (SELECT f.spent_before FROM upstream_credits f
                      WHERE f.provider = c.provider ORDER BY f.id LIMIT 1) AS baseline
             FROM upstream_credits c GROUP BY c.provider ORDER BY c.provider",
        )
        .fetch_all(&self.pool)
        .await?;
        let now = crate::time::now_ms();
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let provider: String = r.try_get("provider")?;
            let credited: i64 = r.try_get("credited")?;
            let first_at: i64 = r.try_get("first_at")?;
            let baseline: i64 = r.try_get("baseline")?;
            let spent = Store::provider_spend(&self.pool, &provider, 0).await? - baseline;
            // Whole hours of roll-ups: the window starts at the top of its first hour.
            let since = (now - RATE_WINDOW_MS).max(first_at);
            let since = since - since.rem_euclid(HOUR_MS);
            let in_window = Store::provider_spend(&self.pool, &provider, since).await?;
            out.push(ProviderCredit {
                credited: NanoUsd::from_nanos(credited),
                spent: NanoUsd::from_nanos(spent),
                remaining: NanoUsd::from_nanos(credited - spent),
                spent_in_window: NanoUsd::from_nanos(in_window),
                window_ms: now - since,
                first_at,
                provider,
            });
        }
        Ok(out)
    }

    /// Marks `provider`'s low-credit mail as due: `true` only for the caller that marked it
    /// first (two admin servers never mail one crossing twice).
    pub async fn take_upstream_alert(&self, provider: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO upstream_credit_alerts (provider, mailed_at) VALUES ($1, $2)
             ON CONFLICT (provider) DO NOTHING",
        )
        .bind(provider)
        .bind(crate::time::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// `provider`'s credit is back above its threshold: the next crossing is mailed again.
    pub async fn clear_upstream_alert(&self, provider: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM upstream_credit_alerts WHERE provider = $1")
            .bind(provider)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The e-mail addresses of the active operator accounts.
    pub async fn operator_emails(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT email FROM accounts WHERE role = 'operator' AND status = 'active' ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("email")?)).collect()
    }
}
