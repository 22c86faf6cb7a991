//! Credit leases and batched settlement: how gateway nodes spend prepaid balances without a
//! database round trip per request, and without ever overdrawing, however many nodes run.
//!
//! A node takes a slice of an account's balance into its lease in one short transaction (the
//! balance can only shrink to zero, never below), holds and settles requests against the slice in
//! memory, writes the settled usage in batches (each usage ledger entry debits the lease in the
//! same transaction), and returns what is left on idle, on shutdown, or at its next start after a
//! crash. The balance proof counts leased credit as the customer's:
//! `balance_nano + SUM(credit_leases.amount_nano) = SUM(ledger.amount_nano)`.

use super::{Store, StoreError, UsageRecord, is_unique_violation};
use crate::money::NanoUsd;
use crate::time::now_ms;
use sqlx::Row;

/// One settled request, as the gateway's flusher hands it to the store.
#[derive(Debug, Clone)]
pub struct Settlement {
    /// What the customer pays (≥ 0); debited from the node's lease with a usage ledger entry.
    pub billed: NanoUsd,
    pub record: UsageRecord,
}

impl Store {
    /// Moves up to `want` from the account's balance into `node_id`'s lease and returns how much
    /// moved (zero when the balance is empty).
    pub async fn take_lease(
        &self,
        account_id: i64,
        node_id: &str,
        want: NanoUsd,
    ) -> Result<NanoUsd, StoreError> {
        if !want.is_positive() {
            return Ok(NanoUsd::ZERO);
        }
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        // A no-op write first: it locks the row (PostgreSQL) or the database (SQLite, already
        // IMMEDIATE), so the balance read here cannot change before the debit below.
        let balance: i64 = sqlx::query(
            "UPDATE accounts SET updated_at = updated_at WHERE id = $1 RETURNING balance_nano",
        )
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::not_found("account", account_id))?
        .try_get(0)?;
        let granted = balance.min(want.nanos());
        if granted > 0 {
            sqlx::query(
                "UPDATE accounts SET balance_nano = balance_nano - $1 WHERE id = $2 AND balance_nano >= $1",
            )
            .bind(granted)
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO credit_leases (account_id, node_id, amount_nano, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $4)
                 ON CONFLICT (account_id, node_id)
                 DO UPDATE SET amount_nano = credit_leases.amount_nano + excluded.amount_nano,
                               updated_at = excluded.updated_at",
            )
            .bind(account_id)
            .bind(node_id)
            .bind(granted)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(NanoUsd::from_nanos(granted))
    }

    /// Returns `amount` of a lease to the balance (`None`: all of it). Returns what moved.
    pub async fn return_lease(
        &self,
        account_id: i64,
        node_id: &str,
        amount: Option<NanoUsd>,
    ) -> Result<NanoUsd, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "UPDATE credit_leases SET updated_at = $1 WHERE account_id = $2 AND node_id = $3
             RETURNING amount_nano",
        )
        .bind(now)
        .bind(account_id)
        .bind(node_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(NanoUsd::ZERO);
        };
        let leased: i64 = row.try_get(0)?;
        let back = amount.map_or(leased, |a| a.nanos().clamp(0, leased));
        if back > 0 {
            sqlx::query("UPDATE credit_leases SET amount_nano = amount_nano - $1 WHERE account_id = $2 AND node_id = $3")
                .bind(back)
                .bind(account_id)
                .bind(node_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE accounts SET balance_nano = balance_nano + $1, updated_at = $2 WHERE id = $3")
                .bind(back)
                .bind(now)
                .bind(account_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "DELETE FROM credit_leases WHERE account_id = $1 AND node_id = $2 AND amount_nano = 0",
        )
        .bind(account_id)
        .bind(node_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(NanoUsd::from_nanos(back))
    }

    /// Returns every lease a node holds (at its start, after a crash lost its memory, and at its
    /// shutdown). Returns the number of leases and the total returned.
    pub async fn return_node_leases(&self, node_id: &str) -> Result<(usize, NanoUsd), StoreError> {
        let accounts: Vec<i64> =
            sqlx::query("SELECT account_id FROM credit_leases WHERE node_id = $1")
                .bind(node_id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
        let mut total = NanoUsd::ZERO;
        for account_id in &accounts {
            total = total.checked_add(self.return_lease(*account_id, node_id, None).await?)?;
        }
        Ok((accounts.len(), total))
    }

    /// What `node_id` holds leased for an account.
    pub async fn lease(&self, account_id: i64, node_id: &str) -> Result<NanoUsd, StoreError> {
        let row = sqlx::query(
            "SELECT amount_nano FROM credit_leases WHERE account_id = $1 AND node_id = $2",
        )
        .bind(account_id)
        .bind(node_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(NanoUsd::from_nanos(
            row.map(|r| r.try_get(0)).transpose()?.unwrap_or(0),
        ))
    }

    /// Writes a batch of settled requests in one transaction: for each, a usage ledger entry that
    /// debits the node's lease, and the usage record. A request already recorded (a retried batch)
    /// is skipped whole, so nothing is billed twice.
    pub async fn settle_batch(
        &self,
        node_id: &str,
        batch: &[Settlement],
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for s in batch {
            let r = &s.record;
            let new = super::usage::insert_usage(&mut tx, r).await?;
            if !new || !s.billed.is_positive() {
                continue;
            }
            let debited = sqlx::query(
                "UPDATE credit_leases SET amount_nano = amount_nano - $1, updated_at = $2
                 WHERE account_id = $3 AND node_id = $4 AND amount_nano >= $1",
            )
            .bind(s.billed.nanos())
            .bind(r.finished_at)
            .bind(r.account_id)
            .bind(node_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if debited == 0 {
                return Err(StoreError::Invalid(format!(
                    "request {}: node {node_id} holds no lease of {} for account {}",
                    r.request_id, s.billed, r.account_id
                )));
            }
            sqlx::query(
                "INSERT INTO ledger (account_id, kind, amount_nano, external_ref, created_at)
                 VALUES ($1, 'usage', $2, $3, $4)",
            )
            .bind(r.account_id)
            .bind(-s.billed.nanos())
            .bind(format!("usage:{}", r.request_id))
            .bind(r.finished_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::DuplicateReference(format!("usage:{}", r.request_id))
                } else {
                    e.into()
                }
            })?;
        }
        tx.commit().await?;
        Ok(())
    }
}
