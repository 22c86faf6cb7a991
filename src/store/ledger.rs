//! The append-only ledger and the cached balance it proves.
//!
//! Every change to a balance is one ledger row with a unique external reference, written in the
//! same transaction as a single conditional update of the cached balance: the update refuses to
//! take the balance below zero, the unique reference refuses to apply anything twice, and the
//! database's own triggers refuse to edit or delete a ledger row.

use super::{AccountRef, Store, StoreError, is_unique_violation};
use crate::money::{MoneyError, NanoUsd};
use crate::time::now_ms;
use sqlx::Row;
use sqlx::any::AnyRow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerKind {
    /// Credits bought (Stripe); positive.
    TopUp,
    /// Settled request cost; negative.
    Usage,
    /// Credits returned to the card; negative.
    Refund,
    /// An operator's grant or correction, with actor and reason; either sign.
    Adjustment,
}

impl LedgerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::TopUp => "topup",
            LedgerKind::Usage => "usage",
            LedgerKind::Refund => "refund",
            LedgerKind::Adjustment => "adjustment",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "topup" => Ok(LedgerKind::TopUp),
            "usage" => Ok(LedgerKind::Usage),
            "refund" => Ok(LedgerKind::Refund),
            "adjustment" => Ok(LedgerKind::Adjustment),
            other => Err(StoreError::Invalid(format!(
                "unknown ledger kind {other:?}"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewLedgerEntry {
    pub account_id: i64,
    pub kind: LedgerKind,
    /// Signed: credits positive, debits negative.
    pub amount: NanoUsd,
    /// Unique per real-world event: a Stripe id, a request id, an operator-chosen reference.
    pub external_ref: String,
    pub actor: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: i64,
    pub account_id: i64,
    pub kind: LedgerKind,
    pub amount: NanoUsd,
    pub external_ref: String,
    pub actor: Option<String>,
    pub reason: Option<String>,
    pub created_at: i64,
}

impl LedgerEntry {
    pub(super) fn from_row(r: &AnyRow) -> Result<Self, StoreError> {
        Ok(LedgerEntry {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            kind: LedgerKind::parse(&r.try_get::<String, _>("kind")?)?,
            amount: NanoUsd::from_nanos(r.try_get("amount_nano")?),
            external_ref: r.try_get("external_ref")?,
            actor: r.try_get("actor")?,
            reason: r.try_get("reason")?,
            created_at: r.try_get("created_at")?,
        })
    }
}

/// The cached balance next to the ledger's sum: the proof an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceProof {
    pub account_id: i64,
    /// The account's credit: the unleased balance plus what gateway nodes hold leased.
    pub cached: NanoUsd,
    /// The part of `cached` currently leased to gateway nodes.
    pub leased: NanoUsd,
    pub ledger_sum: NanoUsd,
    pub entries: i64,
}

impl BalanceProof {
    pub fn holds(&self) -> bool {
        self.cached == self.ledger_sum
    }
}

/// Balance, leases and ledger of each account, read in one statement (one snapshot).
const PROOF_SELECT: &str = "SELECT a.id, a.balance_nano,
        CAST(COALESCE((SELECT SUM(c.amount_nano) FROM credit_leases c WHERE c.account_id = a.id), 0) AS BIGINT) AS leased,
        CAST(COALESCE((SELECT SUM(l.amount_nano) FROM ledger l WHERE l.account_id = a.id), 0) AS BIGINT) AS ledger_sum,
        (SELECT COUNT(*) FROM ledger l WHERE l.account_id = a.id) AS entries
     FROM accounts a";

impl Store {
    /// Appends one entry and moves the cached balance with it, atomically. Refuses a zero amount,
    /// an amount of the wrong sign for its kind, an adjustment without actor and reason, a debit
    /// the balance cannot cover, and a reference that was already used.
    pub async fn append_ledger(&self, e: &NewLedgerEntry) -> Result<LedgerEntry, StoreError> {
        let mut tx = self.begin_write().await?;
        match debit_whole_in(&mut tx, e).await? {
            Ok(entry) => {
                tx.commit().await?;
                Ok(entry)
            }
            Err(refused) => {
                drop(tx);
                Err(self.explain_refusal(e, refused).await)
            }
        }
    }

    /// Why [`append_in`] could not move the balance, in the caller's terms.
    pub(super) async fn explain_refusal(&self, e: &NewLedgerEntry, refused: Refused) -> StoreError {
        let Refused { max_before } = refused;
        let account = match self.account(&AccountRef::Id(e.account_id)).await {
            Ok(a) => a,
            Err(err) => return err,
        };
        if account.balance.nanos() > max_before {
            return MoneyError::Overflow.into();
        }
        let available = match self.with_leases(account).await {
            Ok(a) => a.credit(),
            Err(err) => return err,
        };
        match e.amount.checked_neg() {
            Ok(needed) => StoreError::InsufficientBalance { needed, available },
            Err(m) => m.into(),
        }
    }

    /// An account's ledger, newest first.
    pub async fn ledger(
        &self,
        account_id: i64,
        limit: i64,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, account_id, kind, amount_nano, external_ref, actor, reason, created_at
             FROM ledger WHERE account_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(account_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(LedgerEntry::from_row).collect()
    }

    /// The cached balance (with leases) and the ledger's sum for one account.
    pub async fn balance_proof(&self, account_id: i64) -> Result<BalanceProof, StoreError> {
        let row = sqlx::query(&format!("{PROOF_SELECT} WHERE a.id = $1"))
            .bind(account_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("account", account_id))?;
        proof_from_row(&row)
    }

    /// Every account whose cached balance differs from its ledger sum (empty when all is well).
    pub async fn reconcile(&self) -> Result<Vec<BalanceProof>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT * FROM ({PROOF_SELECT}) p WHERE p.balance_nano + p.leased <> p.ledger_sum ORDER BY p.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(proof_from_row).collect()
    }
}

fn proof_from_row(r: &AnyRow) -> Result<BalanceProof, StoreError> {
    let balance = NanoUsd::from_nanos(r.try_get("balance_nano")?);
    let leased = NanoUsd::from_nanos(r.try_get("leased")?);
    Ok(BalanceProof {
        account_id: r.try_get("id")?,
        cached: balance.checked_add(leased)?,
        leased,
        ledger_sum: NanoUsd::from_nanos(r.try_get("ledger_sum")?),
        entries: r.try_get("entries")?,
    })
}

fn validate(e: &NewLedgerEntry) -> Result<(), StoreError> {
    let bad = |m: &str| Err(StoreError::Invalid(m.to_owned()));
    if e.amount == NanoUsd::ZERO {
        return bad("a ledger entry cannot be zero");
    }
    if e.external_ref.trim().is_empty() || e.external_ref.len() > 255 {
        return bad("a ledger entry needs an external reference of 1 to 255 characters");
    }
    match e.kind {
        LedgerKind::TopUp if e.amount.is_negative() => bad("a top-up must be positive"),
        LedgerKind::Usage | LedgerKind::Refund if e.amount.is_positive() => {
            bad("usage and refunds must be negative")
        }
        LedgerKind::Adjustment
            if e.actor.as_deref().is_none_or(|a| a.trim().is_empty())
                || e.reason.as_deref().is_none_or(|r| r.trim().is_empty()) =>
        {
            bad("an adjustment needs who made it and why (actor and reason)")
        }
        _ => Ok(()),
    }
}

/// The balance could not take the entry (a debit it cannot cover, an overflow, or no account);
/// [`Store::explain_refusal`] says which.
pub(super) struct Refused {
    max_before: i64,
}

/// Appends one entry like [`append_in`], except that a debit the unleased balance cannot cover
/// whole takes the rest from the credit gateway nodes hold leased for the account (recalled
/// from them, see `leases::debit_leases_in`), so a customer's whole credit can be taken back.
/// Refused (nothing written) only when balance and leases together cannot cover it. Returns the
/// balance's entry, or the leased part's when the balance had nothing.
pub(super) async fn debit_whole_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    e: &NewLedgerEntry,
) -> Result<Result<LedgerEntry, Refused>, StoreError> {
    if !e.amount.is_negative() {
        return append_in(tx, e).await;
    }
    let want = e.amount.checked_neg()?.nanos();
    let balance = super::leases::lock_balance(tx, e.account_id).await?;
    if balance >= want {
        return append_in(tx, e).await;
    }
    let leased: i64 = sqlx::query(
        "SELECT CAST(COALESCE(SUM(amount_nano), 0) AS BIGINT) FROM credit_leases WHERE account_id = $1",
    )
    .bind(e.account_id)
    .fetch_one(&mut **tx)
    .await?
    .try_get(0)?;
    if balance.max(0) + leased < want {
        return append_in(tx, e).await; // refused, with the usual explanation
    }
    let from_balance = balance.max(0);
    let mut first = None;
    if from_balance > 0 {
        let part = NewLedgerEntry {
            amount: NanoUsd::from_nanos(-from_balance),
            ..e.clone()
        };
        match append_in(tx, &part).await? {
            Ok(entry) => first = Some(entry),
            Err(refused) => return Ok(Err(refused)),
        }
    }
    super::leases::debit_leases_in(
        tx,
        e,
        &e.external_ref,
        NanoUsd::from_nanos(want - from_balance),
    )
    .await?;
    if let Some(entry) = first {
        return Ok(Ok(entry));
    }
    let row = sqlx::query(
        "SELECT id, account_id, kind, amount_nano, external_ref, actor, reason, created_at
         FROM ledger WHERE external_ref = $1",
    )
    .bind(format!("{}:leased", e.external_ref))
    .fetch_one(&mut **tx)
    .await?;
    Ok(Ok(LedgerEntry::from_row(&row)?))
}

/// Appends one entry and moves the cached balance with it, inside the caller's transaction.
/// `Ok(Err(Refused))`: nothing was written and the caller should roll back.
pub(super) async fn append_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    e: &NewLedgerEntry,
) -> Result<Result<LedgerEntry, Refused>, StoreError> {
    validate(e)?;
    let amount = e.amount.nanos();
    // The largest balance this credit may land on without overflowing i64 (SQLite would
    // silently turn an overflowing integer into a float).
    let max_before = i64::MAX - amount.max(0);
    // The smallest balance this debit may land on without going below zero.
    let min_before = if amount < 0 {
        e.amount.checked_neg()?.nanos()
    } else {
        0
    };
    let now = now_ms();
    let updated = sqlx::query(
        "UPDATE accounts SET balance_nano = balance_nano + $1, updated_at = $2
         WHERE id = $3 AND balance_nano >= $4 AND balance_nano <= $5",
    )
    .bind(amount)
    .bind(now)
    .bind(e.account_id)
    .bind(min_before)
    .bind(max_before)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(Err(Refused { max_before }));
    }
    let row = sqlx::query(
        "INSERT INTO ledger (account_id, kind, amount_nano, external_ref, actor, reason, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         RETURNING id, account_id, kind, amount_nano, external_ref, actor, reason, created_at",
    )
    .bind(e.account_id)
    .bind(e.kind.as_str())
    .bind(amount)
    .bind(&e.external_ref)
    .bind(e.actor.as_deref())
    .bind(e.reason.as_deref())
    .bind(now)
    .fetch_one(&mut **tx)
    .await
    .map_err(|err| {
        if is_unique_violation(&err) {
            StoreError::DuplicateReference(e.external_ref.clone())
        } else {
            err.into()
        }
    })?;
    Ok(Ok(LedgerEntry::from_row(&row)?))
}
