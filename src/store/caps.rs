//! Spend-cap leases: a key's own spend cap held exact across gateway nodes, the way credit
//! leases hold balances. A node leases room under a key's cap in one short transaction (the
//! room is the cap less the key's billed usage less every node's cap lease, never below zero),
//! spends it in memory, and its lease shrinks in the transaction that writes the usage it paid
//! for, so stored usage and leased room never overlap and never leave a gap.

use super::{Store, StoreError};
use crate::money::NanoUsd;
use crate::time::now_ms;
use sqlx::Row;

/// What a key has used of its cap, for a refusal's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapUse {
    /// Billed usage in the store (its roll-ups, which retention keeps).
    pub spent: NanoUsd,
    /// Leased by gateway nodes: requests in flight, usage not written yet, room kept for the
    /// next requests.
    pub held: NanoUsd,
}

impl Store {
    /// Leases room under `key_id`'s cap for `node_id`: `need`, plus a quarter of the room left
    /// beyond it (at most `headroom_max`). Returns what was granted (less than `need` when the
    /// cap has no more room).
    pub async fn take_cap_lease(
        &self,
        key_id: i64,
        node_id: &str,
        need: NanoUsd,
        headroom_max: NanoUsd,
    ) -> Result<NanoUsd, StoreError> {
        let mut tx = self.begin_write().await?;
        // A no-op write locks the key's row (PostgreSQL) or the database (SQLite), so two nodes
        // cannot both take the same room.
        let cap: Option<i64> = sqlx::query(
            "UPDATE api_keys SET spend_cap_nano = spend_cap_nano WHERE id = $1 RETURNING spend_cap_nano",
        )
        .bind(key_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::not_found("key", key_id))?
        .try_get(0)?;
        let Some(cap) = cap else {
            tx.commit().await?;
            return Ok(NanoUsd::ZERO);
        };
        let row = sqlx::query(
            "SELECT CAST(COALESCE((SELECT SUM(billed_nano) FROM usage_hourly WHERE key_id = $1), 0) AS BIGINT),
                    CAST(COALESCE((SELECT SUM(amount_nano) FROM cap_leases WHERE key_id = $1), 0) AS BIGINT)",
        )
        .bind(key_id)
        .fetch_one(&mut *tx)
        .await?;
        let (spent, leased): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        let room = (cap - spent - leased).max(0);
        let want = need.nanos() + ((room - need.nanos()).max(0) / 4).min(headroom_max.nanos());
        let granted = room.min(want);
        if granted > 0 {
            sqlx::query(
                "INSERT INTO cap_leases (key_id, node_id, amount_nano, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (key_id, node_id)
                 DO UPDATE SET amount_nano = cap_leases.amount_nano + excluded.amount_nano,
                               updated_at = excluded.updated_at",
            )
            .bind(key_id)
            .bind(node_id)
            .bind(granted)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(NanoUsd::from_nanos(granted))
    }

    /// Gives `amount` of a cap lease back (clamped to the lease), which also answers a recall of
    /// it. Returns what went back.
    pub async fn return_cap_lease(
        &self,
        key_id: i64,
        node_id: &str,
        amount: NanoUsd,
    ) -> Result<NanoUsd, StoreError> {
        let mut tx = self.begin_write().await?;
        let back = super::leases::shrink_lease_in(
            &mut tx,
            super::leases::Leased::Cap,
            key_id,
            node_id,
            Some(amount),
        )
        .await?;
        tx.commit().await?;
        Ok(NanoUsd::from_nanos(back))
    }

    /// Asks the other holders of `key_id`'s cap leases to give back their unpromised room.
    /// Returns how many were asked.
    pub async fn recall_cap_leases(
        &self,
        key_id: i64,
        except_node: &str,
    ) -> Result<u64, StoreError> {
        self.recall(super::leases::Leased::Cap, key_id, except_node)
            .await
    }

    /// The keys whose cap lease `node_id` was asked to give back, with who asked.
    pub async fn recalled_caps(&self, node_id: &str) -> Result<Vec<(i64, String)>, StoreError> {
        self.recalled_of(super::leases::Leased::Cap, node_id).await
    }

    /// What a key has used of its cap.
    pub async fn cap_use(&self, key_id: i64) -> Result<CapUse, StoreError> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE((SELECT SUM(billed_nano) FROM usage_hourly WHERE key_id = $1), 0) AS BIGINT),
                    CAST(COALESCE((SELECT SUM(amount_nano) FROM cap_leases WHERE key_id = $1), 0) AS BIGINT)",
        )
        .bind(key_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(CapUse {
            spent: NanoUsd::from_nanos(row.try_get(0)?),
            held: NanoUsd::from_nanos(row.try_get(1)?),
        })
    }
}

/// In a settlement batch's transaction: each capped key's lease shrinks by what its usage,
/// written in the same transaction, billed.
pub(super) async fn settle_caps_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    node_id: &str,
    per_key: &std::collections::BTreeMap<i64, i64>,
) -> Result<(), StoreError> {
    for (key_id, billed) in per_key {
        sqlx::query(
            "UPDATE cap_leases SET amount_nano = CASE WHEN amount_nano > $1 THEN amount_nano - $1 ELSE 0 END
             WHERE key_id = $2 AND node_id = $3",
        )
        .bind(*billed)
        .bind(*key_id)
        .bind(node_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
