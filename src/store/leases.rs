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

/// Rows per multi-row statement. Few enough that one statement is a short run of CPU (on SQLite
/// it runs in this process: 100 rows were a 0.7 ms stretch that requests waited behind, 25 are
/// about 0.2 ms), many enough that a batch needs few round trips.
const ROWS_PER_STATEMENT: usize = 25;

/// One settled request, as the gateway's flusher hands it to the store (and journals it first,
/// as JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Settlement {
    /// What the customer pays (≥ 0) out of the node's lease (the hold and any leased credit
    /// the node had to spare), debited with a usage ledger entry.
    pub billed: NanoUsd,
    /// Usage above that, which the lease could not back: taken from the balance as far as it
    /// goes, the rest recorded as a platform loss.
    #[serde(default)]
    pub over_hold: NanoUsd,
    /// The key has a spend cap: its cap lease shrinks by `record.billed` when this is written.
    #[serde(default)]
    pub capped: bool,
    pub record: UsageRecord,
}

/// The two kinds of lease a node holds: credit (of an account) and room under a key's spend cap.
#[derive(Debug, Clone, Copy)]
pub(super) enum Leased {
    Credit,
    Cap,
}

impl Leased {
    /// Its table and the column naming what is leased (constants, never input).
    fn table(self) -> (&'static str, &'static str) {
        match self {
            Leased::Credit => ("credit_leases", "account_id"),
            Leased::Cap => ("cap_leases", "key_id"),
        }
    }
}

/// Takes up to `amount` (`None`: all) off `node_id`'s lease of `id`, inside the caller's
/// transaction: its recall is answered, and a lease left empty goes. Returns what came off.
pub(super) async fn shrink_lease_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    what: Leased,
    id: i64,
    node_id: &str,
    amount: Option<NanoUsd>,
) -> Result<i64, StoreError> {
    let (table, column) = what.table();
    let leased: Option<i64> = sqlx::query(&format!(
        "UPDATE {table} SET recall_at = NULL, updated_at = $1 WHERE {column} = $2 AND node_id = $3
         RETURNING amount_nano"
    ))
    .bind(now_ms())
    .bind(id)
    .bind(node_id)
    .fetch_optional(&mut **tx)
    .await?
    .map(|r| r.try_get(0))
    .transpose()?;
    let Some(leased) = leased else {
        return Ok(0);
    };
    let back = amount.map_or(leased, |a| a.nanos().clamp(0, leased));
    if back > 0 {
        sqlx::query(&format!(
            "UPDATE {table} SET amount_nano = amount_nano - $1 WHERE {column} = $2 AND node_id = $3"
        ))
        .bind(back)
        .bind(id)
        .bind(node_id)
        .execute(&mut **tx)
        .await?;
    }
    sqlx::query(&format!(
        "DELETE FROM {table} WHERE {column} = $1 AND node_id = $2 AND amount_nano = 0"
    ))
    .bind(id)
    .bind(node_id)
    .execute(&mut **tx)
    .await?;
    Ok(back)
}

/// Reads an account's unleased balance with a no-op write first: it locks the row (PostgreSQL)
/// or the database (SQLite, already IMMEDIATE), so the balance cannot change before the caller's
/// debit in the same transaction.
pub(super) async fn lock_balance(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    account_id: i64,
) -> Result<i64, StoreError> {
    Ok(sqlx::query(
        "UPDATE accounts SET updated_at = updated_at WHERE id = $1 RETURNING balance_nano",
    )
    .bind(account_id)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| StoreError::not_found("account", account_id))?
    .try_get(0)?)
}

/// A debit that the unleased balance could not cover reaches the credit gateway nodes hold
/// leased: takes up to `want` from the account's leases (largest first) inside the caller's
/// transaction, records it as a ledger entry of `template`'s kind under `<reference>:leased`
/// (the balance proof still holds: the lease and the ledger move together), and asks the
/// holders to give back what they have not promised (a recall), so the taken credit stops being
/// spendable within a fraction of a second. Returns what was taken.
pub(super) async fn debit_leases_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    template: &super::NewLedgerEntry,
    reference: &str,
    want: NanoUsd,
) -> Result<NanoUsd, StoreError> {
    if !want.is_positive() {
        return Ok(NanoUsd::ZERO);
    }
    let rows = sqlx::query(
        "SELECT node_id, amount_nano FROM credit_leases WHERE account_id = $1 AND amount_nano > 0
         ORDER BY amount_nano DESC",
    )
    .bind(template.account_id)
    .fetch_all(&mut **tx)
    .await?;
    let now = now_ms();
    let mut left = want.nanos();
    for r in &rows {
        let node: String = r.try_get(0)?;
        let mut amount: i64 = r.try_get(1)?;
        // The lease may shrink between the read and the update (its node settles a request in
        // its own transaction): the update takes only what is still there, and on a miss the
        // lease is read again.
        while left > 0 && amount > 0 {
            let take = amount.min(left);
            let done = sqlx::query(
                "UPDATE credit_leases SET amount_nano = amount_nano - $1, recall_at = $2, updated_at = $2
                 WHERE account_id = $3 AND node_id = $4 AND amount_nano >= $1",
            )
            .bind(take)
            .bind(now)
            .bind(template.account_id)
            .bind(&node)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            if done == 1 {
                left -= take;
                break;
            }
            amount = sqlx::query_scalar::<_, i64>(
                "SELECT amount_nano FROM credit_leases WHERE account_id = $1 AND node_id = $2",
            )
            .bind(template.account_id)
            .bind(&node)
            .fetch_optional(&mut **tx)
            .await?
            .unwrap_or(0);
        }
        if left == 0 {
            break;
        }
    }
    let taken = want.nanos() - left;
    if taken > 0 {
        sqlx::query(
            "INSERT INTO ledger (account_id, kind, amount_nano, external_ref, actor, reason, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(template.account_id)
        .bind(template.kind.as_str())
        .bind(-taken)
        .bind(format!("{reference}:leased"))
        .bind(template.actor.as_deref())
        .bind(template.reason.as_deref())
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::DuplicateReference(format!("{reference}:leased"))
            } else {
                e.into()
            }
        })?;
    }
    Ok(NanoUsd::from_nanos(taken))
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
        let balance = lock_balance(&mut tx, account_id).await?;
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

    /// Leases what a request needs (`need`), plus some headroom for the next ones: a quarter of
    /// what the balance has beyond `need`, at most `headroom_max`. A small balance is never taken
    /// whole by one node, so other nodes can still serve the account. Returns what moved.
    pub async fn take_lease_for(
        &self,
        account_id: i64,
        node_id: &str,
        need: NanoUsd,
        headroom_max: NanoUsd,
    ) -> Result<NanoUsd, StoreError> {
        let balance = self.account_balance_nanos(account_id).await?;
        let rest = (balance - need.nanos()).max(0);
        let want = need.nanos() + (rest / 4).min(headroom_max.nanos());
        self.take_lease(account_id, node_id, NanoUsd::from_nanos(want))
            .await
    }

    /// The account's unleased balance.
    pub async fn balance(&self, account_id: i64) -> Result<NanoUsd, StoreError> {
        Ok(NanoUsd::from_nanos(
            self.account_balance_nanos(account_id).await?,
        ))
    }

    async fn account_balance_nanos(&self, account_id: i64) -> Result<i64, StoreError> {
        Ok(
            sqlx::query("SELECT balance_nano FROM accounts WHERE id = $1")
                .bind(account_id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| StoreError::not_found("account", account_id))?
                .try_get(0)?,
        )
    }

    /// Asks every other holder of the account's leases to give back what it has not promised.
    /// Returns how many holders were asked (0: nobody else holds any).
    pub async fn recall_leases(
        &self,
        account_id: i64,
        except_node: &str,
    ) -> Result<u64, StoreError> {
        self.recall(Leased::Credit, account_id, except_node).await
    }

    /// The accounts whose lease `node_id` was asked to give back, with who asked.
    pub async fn recalled(&self, node_id: &str) -> Result<Vec<(i64, String)>, StoreError> {
        self.recalled_of(Leased::Credit, node_id).await
    }

    /// Usage of the account nobody could be billed for (above its hold and the balance).
    pub async fn platform_loss(&self, account_id: i64) -> Result<NanoUsd, StoreError> {
        Ok(NanoUsd::from_nanos(
            sqlx::query(
                "SELECT CAST(COALESCE(SUM(platform_loss_nano), 0) AS BIGINT) FROM usage_hourly WHERE account_id = $1",
            )
            .bind(account_id)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?,
        ))
    }

    /// Leases of the account asked to give back and not answered yet.
    pub async fn recalls_pending(&self, account_id: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM credit_leases WHERE account_id = $1 AND recall_at IS NOT NULL",
        )
        .bind(account_id)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?)
    }

    /// Flags a recall on the leases of `id` held by nodes other than `except_node`.
    pub(super) async fn recall(
        &self,
        what: Leased,
        id: i64,
        except_node: &str,
    ) -> Result<u64, StoreError> {
        let (table, column) = what.table();
        Ok(sqlx::query(&format!(
            "UPDATE {table} SET recall_at = $1, recall_by = $3
             WHERE {column} = $2 AND node_id <> $3 AND amount_nano > 0"
        ))
        .bind(now_ms())
        .bind(id)
        .bind(except_node)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// The ids whose lease `node_id` was asked to give back, with who asked.
    pub(super) async fn recalled_of(
        &self,
        what: Leased,
        node_id: &str,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let (table, column) = what.table();
        sqlx::query(&format!(
            "SELECT {column}, COALESCE(recall_by, '') FROM {table}
             WHERE node_id = $1 AND recall_at IS NOT NULL"
        ))
        .bind(node_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
    }

    /// Returns `amount` of a lease to the balance (`None`: all of it), which also answers a
    /// recall of it. Returns what moved.
    pub async fn return_lease(
        &self,
        account_id: i64,
        node_id: &str,
        amount: Option<NanoUsd>,
    ) -> Result<NanoUsd, StoreError> {
        let mut tx = self.begin_write().await?;
        let back = shrink_lease_in(&mut tx, Leased::Credit, account_id, node_id, amount).await?;
        if back > 0 {
            sqlx::query(
                "UPDATE accounts SET balance_nano = balance_nano + $1, updated_at = $2 WHERE id = $3",
            )
            .bind(back)
            .bind(now_ms())
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(NanoUsd::from_nanos(back))
    }

    /// Returns every lease a node holds (at its start, after a crash lost its memory, and at its
    /// shutdown). Returns the number of leases and the total returned.
    pub async fn return_node_leases(&self, node_id: &str) -> Result<(usize, NanoUsd), StoreError> {
        // Room under spend caps goes back simply by the lease going away.
        sqlx::query("DELETE FROM cap_leases WHERE node_id = $1")
            .bind(node_id)
            .execute(&self.pool)
            .await?;
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

    /// Writes a batch of settled requests in one transaction: the usage records, a usage ledger
    /// entry for each billed one, and the debit of the node's lease per account, in a few
    /// multi-row statements. A request already recorded (a retried batch, a journal replayed) is
    /// skipped whole, so nothing is billed twice. What the lease cannot cover is taken from the
    /// balance, and what neither can is a platform loss (never a negative balance).
    pub async fn settle_batch(
        &self,
        node_id: &str,
        batch: &[Settlement],
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        let mut new_ids = std::collections::HashSet::new();
        for chunk in batch.chunks(ROWS_PER_STATEMENT) {
            let records: Vec<&UsageRecord> = chunk.iter().map(|s| &s.record).collect();
            new_ids.extend(super::usage::insert_usage_rows(&mut tx, self.backend, &records).await?);
        }
        // The settlements really inserted, each once (a request id twice in one batch is
        // stored, billed and rolled up once).
        let fresh: Vec<&Settlement> = batch
            .iter()
            .filter(|s| new_ids.remove(&s.record.request_id))
            .collect();
        let billed: Vec<&Settlement> = fresh
            .iter()
            .copied()
            .filter(|s| s.billed.is_positive() || s.over_hold.is_positive())
            .collect();
        // One debit per account: from the node's lease first, then (a lease swept while the
        // node was cut off, or usage above the hold) from the balance, and what neither can
        // pay is the platform's loss, taken off the last requests' billing (never below zero).
        let mut per_account: std::collections::BTreeMap<i64, (i64, i64, i64)> =
            std::collections::BTreeMap::new();
        for s in &billed {
            let e = per_account.entry(s.record.account_id).or_insert((0, 0, 0));
            e.0 =
                e.0.checked_add(s.billed.nanos())
                    .ok_or(crate::money::MoneyError::Overflow)?;
            e.1 = e.1.max(s.record.finished_at);
            e.2 =
                e.2.checked_add(s.over_hold.nanos())
                    .ok_or(crate::money::MoneyError::Overflow)?;
        }
        let mut caps: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
        for s in billed.iter().filter(|s| s.capped) {
            *caps.entry(s.record.key_id).or_default() += s.record.billed.nanos();
        }
        super::caps::settle_caps_in(&mut tx, node_id, &caps).await?;
        let mut losses: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
        for (account_id, (amount, at, over_hold)) in per_account {
            let leased: i64 = sqlx::query(
                "UPDATE credit_leases SET updated_at = $1 WHERE account_id = $2 AND node_id = $3
                 RETURNING amount_nano",
            )
            .bind(at)
            .bind(account_id)
            .bind(node_id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(0);
            let from_lease = leased.min(amount);
            if from_lease > 0 {
                sqlx::query(
                    "UPDATE credit_leases SET amount_nano = amount_nano - $1
                     WHERE account_id = $2 AND node_id = $3",
                )
                .bind(from_lease)
                .bind(account_id)
                .bind(node_id)
                .execute(&mut *tx)
                .await?;
            }
            let rest = amount - from_lease + over_hold;
            if rest > 0 {
                let balance = lock_balance(&mut tx, account_id).await?;
                let from_balance = balance.clamp(0, rest);
                if from_balance > 0 {
                    sqlx::query(
                        "UPDATE accounts SET balance_nano = balance_nano - $1 WHERE id = $2",
                    )
                    .bind(from_balance)
                    .bind(account_id)
                    .execute(&mut *tx)
                    .await?;
                }
                if rest > from_balance {
                    losses.insert(account_id, rest - from_balance);
                }
            }
        }
        // Each loss comes off the account's latest requests in this batch.
        let mut cuts: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
        let mut charged: Vec<(i64, &Settlement)> = billed
            .iter()
            .map(|s| (s.billed.nanos() + s.over_hold.nanos(), *s))
            .collect();
        for (account_id, mut loss) in losses {
            for (amount, s) in charged.iter_mut().rev() {
                if loss == 0 {
                    break;
                }
                if s.record.account_id != account_id || *amount == 0 {
                    continue;
                }
                let cut = loss.min(*amount);
                *amount -= cut;
                loss -= cut;
                *cuts.entry(s.record.request_id.as_str()).or_default() += cut;
                sqlx::query(
                    "UPDATE usage_records SET billed_nano = billed_nano - $1,
                            platform_loss_nano = platform_loss_nano + $1
                      WHERE request_id = $2 AND started_at = $3",
                )
                .bind(cut)
                .bind(&s.record.request_id)
                .bind(s.record.started_at)
                .execute(&mut *tx)
                .await?;
                tracing::warn!(
                    request_id = %s.record.request_id,
                    account_id,
                    loss = %NanoUsd::from_nanos(cut),
                    "usage above what the lease and the balance could pay: recorded as a platform loss"
                );
                crate::gateway::metrics::METRICS
                    .platform_loss_nano
                    .inc_by(cut as u64);
            }
        }
        let billed: Vec<(i64, &Settlement)> = charged
            .into_iter()
            .filter(|(amount, _)| *amount > 0)
            .collect();
        for chunk in billed.chunks(ROWS_PER_STATEMENT) {
            let mut sql = String::from(
                "INSERT INTO ledger (account_id, kind, amount_nano, external_ref, created_at) VALUES ",
            );
            for i in 0..chunk.len() {
                let b = i * 4;
                if i > 0 {
                    sql.push(',');
                }
                sql.push('(');
                super::placeholder(&mut sql, self.backend, b + 1);
                sql.push_str(", 'usage', ");
                for n in 2..=4 {
                    super::placeholder(&mut sql, self.backend, b + n);
                    if n < 4 {
                        sql.push_str(", ");
                    }
                }
                sql.push(')');
            }
            let mut q = sqlx::query(&sql);
            for (amount, s) in chunk {
                q = q
                    .bind(s.record.account_id)
                    .bind(-*amount)
                    .bind(format!("usage:{}", s.record.request_id))
                    .bind(s.record.finished_at);
            }
            q.execute(&mut *tx).await.map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::DuplicateReference("usage ledger entry".into())
                } else {
                    e.into()
                }
            })?;
        }
        // The roll-ups count what the rows now say: billed after any loss was taken off.
        let mut rollup = super::rollups::Rollup::default();
        for s in &fresh {
            let cut = cuts.get(s.record.request_id.as_str()).copied().unwrap_or(0);
            rollup.add(&s.record, s.record.billed.nanos() - cut, cut)?;
        }
        rollup.write_in(&mut tx, self.backend).await?;
        tx.commit().await?;
        Ok(())
    }
}
