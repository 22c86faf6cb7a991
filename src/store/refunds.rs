//! Refunds of unused balance (requested by the customer, decided by an operator, paid back
//! through Stripe against the original payments), and refunds and disputes that Stripe reports
//! on its own. Every balance change here is a ledger entry with a unique reference, so each is
//! applied once however often Stripe delivers the event.
//!
//! An approval takes the credits first (one transaction: the request's state, the ledger debit
//! and each payment's refunded amount) and only then asks Stripe to pay out; what Stripe refuses
//! is given back by an adjustment. The other order could pay out money the customer then spends
//! again.

use super::ledger::{LedgerKind, NewLedgerEntry, append_in};
use super::{Store, StoreError, audit, is_unique_violation};
use crate::money::NanoUsd;
use crate::time::now_ms;
use sqlx::Row;
use sqlx::any::AnyRow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub id: i64,
    pub account_id: i64,
    pub email: String,
    pub amount_cents: i64,
    pub reason: String,
    pub status: String,
    pub note: Option<String>,
    pub decided_by: Option<String>,
    pub stripe_refunds: Option<String>,
    pub created_at: i64,
    pub decided_at: Option<i64>,
}

impl RefundRequest {
    fn from_row(r: &AnyRow) -> Result<Self, StoreError> {
        Ok(RefundRequest {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            email: r.try_get("email")?,
            amount_cents: r.try_get("amount_cents")?,
            reason: r.try_get("reason")?,
            status: r.try_get("status")?,
            note: r.try_get("note")?,
            decided_by: r.try_get("decided_by")?,
            stripe_refunds: r.try_get("stripe_refunds")?,
            created_at: r.try_get("created_at")?,
            decided_at: r.try_get("decided_at")?,
        })
    }
}

const REQUEST_SELECT: &str =
    "SELECT r.id, r.account_id, a.email, r.amount_cents, r.reason, r.status, r.note, \
     r.decided_by, r.stripe_refunds, r.created_at, r.decided_at
     FROM refund_requests r JOIN accounts a ON a.id = r.account_id";

/// One payment an approved refund goes back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundAllocation {
    pub session_id: String,
    pub payment_intent: String,
    pub cents: i64,
}

/// What a Stripe-reported refund or dispute did to the balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StripeDebit {
    /// Debited this much (less than asked when the balance could not cover it all).
    Debited {
        account_id: i64,
        amount: NanoUsd,
        shortfall: NanoUsd,
    },
    /// Already applied (the event, or this refunded total / this dispute): nothing changed.
    AlreadyApplied,
    /// Nothing new to take (our own refund, already debited when it was approved).
    NothingNew,
    /// No payment of ours with that payment intent.
    UnknownPayment,
}

impl Store {
    /// What an account could still get back: its paid payments less what was refunded.
    pub async fn refundable_cents(&self, account_id: i64) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(amount_cents - refunded_cents), 0) AS BIGINT) AS left_cents
             FROM stripe_checkout_sessions WHERE account_id = $1 AND status = 'paid'",
        )
        .bind(account_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("left_cents")?)
    }

    /// Files a request. Refused when one is already open, when the amount is more than the
    /// unused balance, or more than the payments it could go back to.
    pub async fn create_refund_request(
        &self,
        account_id: i64,
        amount_cents: i64,
        reason: &str,
    ) -> Result<RefundRequest, StoreError> {
        let reason = reason.trim();
        if reason.is_empty() || reason.chars().count() > 2000 {
            return Err(StoreError::Invalid(
                "give a reason of 1 to 2,000 characters".into(),
            ));
        }
        if amount_cents <= 0 {
            return Err(StoreError::Invalid("the amount must be positive".into()));
        }
        let amount = NanoUsd::from_cents(amount_cents)?;
        let account = self.account(&super::AccountRef::Id(account_id)).await?;
        if amount > account.balance {
            return Err(StoreError::InsufficientBalance {
                needed: amount,
                available: account.balance,
            });
        }
        let refundable = self.refundable_cents(account_id).await?;
        if amount_cents > refundable {
            return Err(StoreError::Invalid(format!(
                "only {} of your payments can be refunded",
                NanoUsd::from_cents(refundable)?
            )));
        }
        let id: i64 = sqlx::query(
            "INSERT INTO refund_requests (account_id, amount_cents, reason, created_at)
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(account_id)
        .bind(amount_cents)
        .bind(reason)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Invalid(
                    "a refund request of yours is already waiting for review".into(),
                )
            } else {
                e.into()
            }
        })?
        .try_get("id")?;
        self.refund_request(id).await
    }

    pub async fn refund_request(&self, id: i64) -> Result<RefundRequest, StoreError> {
        let row = sqlx::query(&format!("{REQUEST_SELECT} WHERE r.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("refund request", id))?;
        RefundRequest::from_row(&row)
    }

    /// An account's requests (or every account's with `None`), optionally only with `status`,
    /// newest first.
    pub async fn refund_requests(
        &self,
        account_id: Option<i64>,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RefundRequest>, StoreError> {
        let rows = sqlx::query(&format!(
            "{REQUEST_SELECT} WHERE ($1 = 0 OR r.account_id = $2) AND ($3 = '' OR r.status = $3)
             ORDER BY r.created_at DESC, r.id DESC LIMIT $4"
        ))
        .bind(i64::from(account_id.is_some()))
        .bind(account_id.unwrap_or(0))
        .bind(status.unwrap_or_default())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(RefundRequest::from_row).collect()
    }

    /// Declines a pending request with the operator's note.
    pub async fn decline_refund(
        &self,
        id: i64,
        actor: &str,
        note: &str,
    ) -> Result<RefundRequest, StoreError> {
        let note = note.trim();
        if note.is_empty() {
            return Err(StoreError::Invalid(
                "say why the request is declined".into(),
            ));
        }
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "UPDATE refund_requests SET status = 'declined', note = $1, decided_by = $2, decided_at = $3
             WHERE id = $4 AND status = 'pending' RETURNING account_id",
        )
        .bind(note)
        .bind(actor)
        .bind(now_ms())
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            return Err(self.not_pending(id).await);
        };
        let account_id: i64 = row.try_get("account_id")?;
        audit(
            &mut tx,
            actor,
            "refund.decline",
            Some(account_id),
            None,
            Some(note),
        )
        .await?;
        tx.commit().await?;
        self.refund_request(id).await
    }

    async fn not_pending(&self, id: i64) -> StoreError {
        match self.refund_request(id).await {
            Ok(r) => {
                StoreError::Invalid(format!("refund request {id} is {}, not pending", r.status))
            }
            Err(e) => e,
        }
    }

    /// The first half of an approval, in one transaction: marks the request processing, takes
    /// the credits from the balance (refused if the balance no longer covers it), and spreads
    /// the amount over the account's paid payments, newest first. The caller then asks Stripe
    /// for each allocation and reports with [`Store::finish_refund`].
    pub async fn begin_refund(
        &self,
        id: i64,
        actor: &str,
    ) -> Result<Vec<RefundAllocation>, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "UPDATE refund_requests SET status = 'processing', decided_by = $1, decided_at = $2
             WHERE id = $3 AND status = 'pending' RETURNING account_id, amount_cents",
        )
        .bind(actor)
        .bind(now_ms())
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            return Err(self.not_pending(id).await);
        };
        let account_id: i64 = row.try_get("account_id")?;
        let cents: i64 = row.try_get("amount_cents")?;
        let entry = NewLedgerEntry {
            account_id,
            kind: LedgerKind::Refund,
            amount: NanoUsd::from_cents(cents)?.checked_neg()?,
            external_ref: format!("refund_request:{id}"),
            actor: Some(actor.to_owned()),
            reason: Some("refund of unused balance".into()),
        };
        if let Err(refused) = super::ledger::debit_whole_in(&mut tx, &entry).await? {
            drop(tx);
            return Err(self.explain_refusal(&entry, refused).await);
        }
        let payments = sqlx::query(
            "SELECT session_id, payment_intent_id, amount_cents - refunded_cents AS left_cents
             FROM stripe_checkout_sessions
             WHERE account_id = $1 AND status = 'paid' AND payment_intent_id IS NOT NULL
               AND refunded_cents < amount_cents
             ORDER BY completed_at DESC, id DESC",
        )
        .bind(account_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut left = cents;
        let mut out = Vec::new();
        for p in &payments {
            if left == 0 {
                break;
            }
            let take = left.min(p.try_get::<i64, _>("left_cents")?);
            let session_id: String = p.try_get("session_id")?;
            let n = sqlx::query(
                "UPDATE stripe_checkout_sessions SET refunded_cents = refunded_cents + $1
                 WHERE session_id = $2 AND refunded_cents + $1 <= amount_cents",
            )
            .bind(take)
            .bind(&session_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n != 1 {
                return Err(StoreError::Invalid(
                    "the payments changed meanwhile; try again".into(),
                ));
            }
            out.push(RefundAllocation {
                session_id,
                payment_intent: p.try_get("payment_intent_id")?,
                cents: take,
            });
            left -= take;
        }
        if left > 0 {
            return Err(StoreError::Invalid(format!(
                "the account's payments can take back only {} of this request",
                NanoUsd::from_cents(cents - left)?
            )));
        }
        audit(
            &mut tx,
            actor,
            "refund.approve",
            Some(account_id),
            None,
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// The second half: records what Stripe did for each allocation. A refused allocation gets
    /// its credits back (an adjustment) and its payment's refunded amount restored.
    pub async fn finish_refund(
        &self,
        id: i64,
        results: &[(RefundAllocation, Result<String, String>)],
    ) -> Result<RefundRequest, StoreError> {
        let request = self.refund_request(id).await?;
        let mut tx = self.begin_write().await?;
        let mut refunds = Vec::new();
        let mut failures = Vec::new();
        for (a, r) in results {
            match r {
                Ok(refund_id) => refunds.push(refund_id.clone()),
                Err(message) => {
                    failures.push(format!("{}: {message}", a.payment_intent));
                    sqlx::query(
                        "UPDATE stripe_checkout_sessions SET refunded_cents = refunded_cents - $1
                         WHERE session_id = $2 AND refunded_cents >= $1",
                    )
                    .bind(a.cents)
                    .bind(&a.session_id)
                    .execute(&mut *tx)
                    .await?;
                    let back = NewLedgerEntry {
                        account_id: request.account_id,
                        kind: LedgerKind::Adjustment,
                        amount: NanoUsd::from_cents(a.cents)?,
                        external_ref: format!("refund_request:{id}:failed:{}", a.session_id),
                        actor: Some("system".into()),
                        reason: Some(format!("Stripe refused the refund: {message}")),
                    };
                    if let Err(refused) = append_in(&mut tx, &back).await? {
                        drop(tx);
                        return Err(self.explain_refusal(&back, refused).await);
                    }
                }
            }
        }
        let status = if refunds.is_empty() {
            "failed"
        } else {
            "approved"
        };
        let note = (!failures.is_empty()).then(|| failures.join("; "));
        sqlx::query(
            "UPDATE refund_requests SET status = $1, stripe_refunds = $2, note = COALESCE($3, note)
             WHERE id = $4 AND status = 'processing'",
        )
        .bind(status)
        .bind((!refunds.is_empty()).then(|| refunds.join(",")))
        .bind(note)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.refund_request(id).await
    }

    /// `charge.refunded`: Stripe says `amount_refunded_cents` of a payment has gone back in all.
    /// What is more than we know of (a refund made in Stripe's dashboard) leaves the balance.
    pub async fn apply_stripe_refund(
        &self,
        event_id: &str,
        payment_intent: &str,
        amount_refunded_cents: i64,
    ) -> Result<StripeDebit, StoreError> {
        self.stripe_debit(
            event_id,
            "charge.refunded",
            payment_intent,
            |known, account_id| {
                let delta = amount_refunded_cents - known;
                (delta > 0).then(|| {
                    (
                        delta,
                        amount_refunded_cents,
                        format!("stripe:refunded:{payment_intent}:{amount_refunded_cents}"),
                        NewLedgerEntry {
                            account_id,
                            kind: LedgerKind::Refund,
                            amount: NanoUsd::ZERO,
                            external_ref: String::new(),
                            actor: Some("stripe".into()),
                            reason: Some("refunded in Stripe".into()),
                        },
                    )
                })
            },
        )
        .await
    }

    /// `charge.dispute.created`: the disputed amount leaves the balance (once per dispute).
    pub async fn apply_stripe_dispute(
        &self,
        event_id: &str,
        dispute_id: &str,
        payment_intent: &str,
        amount_cents: i64,
        reason: &str,
    ) -> Result<StripeDebit, StoreError> {
        self.stripe_debit(
            event_id,
            "charge.dispute.created",
            payment_intent,
            |known, account_id| {
                (amount_cents > 0).then(|| {
                    (
                        amount_cents,
                        known,
                        format!("stripe:dispute:{dispute_id}"),
                        NewLedgerEntry {
                            account_id,
                            kind: LedgerKind::Adjustment,
                            amount: NanoUsd::ZERO,
                            external_ref: String::new(),
                            actor: Some("stripe".into()),
                            reason: Some(format!(
                                "payment disputed ({reason}), dispute {dispute_id}"
                            )),
                        },
                    )
                })
            },
        )
        .await
    }

    /// The shared part: record the event, find the payment, and take `delta` cents (or what the
    /// balance has) once under the given reference; `plan` returns `(delta cents, new refunded
    /// total, reference, entry template)` or `None` when there is nothing to take.
    async fn stripe_debit(
        &self,
        event_id: &str,
        event_type: &str,
        payment_intent: &str,
        plan: impl FnOnce(i64, i64) -> Option<(i64, i64, String, NewLedgerEntry)>,
    ) -> Result<StripeDebit, StoreError> {
        let mut tx = self.begin_write().await?;
        let fresh = sqlx::query(
            "INSERT INTO stripe_events (event_id, event_type, received_at) VALUES ($1, $2, $3)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event_id)
        .bind(event_type)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if fresh == 0 {
            return Ok(StripeDebit::AlreadyApplied);
        }
        let row = sqlx::query(
            "SELECT s.account_id, s.refunded_cents, s.amount_cents, a.balance_nano
             FROM stripe_checkout_sessions s JOIN accounts a ON a.id = s.account_id
             WHERE s.payment_intent_id = $1",
        )
        .bind(payment_intent)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(StripeDebit::UnknownPayment);
        };
        let account_id: i64 = row.try_get("account_id")?;
        let known: i64 = row.try_get("refunded_cents")?;
        let paid: i64 = row.try_get("amount_cents")?;
        let balance = NanoUsd::from_nanos(row.try_get("balance_nano")?);
        let Some((delta, new_total, reference, mut entry)) = plan(known, account_id) else {
            tx.commit().await?;
            return Ok(StripeDebit::NothingNew);
        };
        if event_type == "charge.refunded" {
            sqlx::query(
                "UPDATE stripe_checkout_sessions SET refunded_cents = $1 WHERE payment_intent_id = $2",
            )
            .bind(new_total.min(paid))
            .bind(payment_intent)
            .execute(&mut *tx)
            .await?;
        }
        let wanted = NanoUsd::from_cents(delta)?;
        let take = wanted.min(balance);
        // What the balance cannot cover comes out of the credit gateways hold leased (recalled
        // from them), so credit taken away cannot still be spent.
        let from_leases = match super::leases::debit_leases_in(
            &mut tx,
            &entry,
            &reference,
            wanted.checked_sub(take)?,
        )
        .await
        {
            Ok(n) => n,
            // This debit took from the leases before (its balance part may have been zero).
            Err(StoreError::DuplicateReference(_)) => return Ok(StripeDebit::AlreadyApplied),
            Err(e) => return Err(e),
        };
        let take = take.checked_add(from_leases)?;
        let shortfall = wanted.checked_sub(take)?;
        if take.checked_sub(from_leases)?.is_positive() {
            entry.amount = take.checked_sub(from_leases)?.checked_neg()?;
            entry.external_ref = reference;
            match append_in(&mut tx, &entry).await {
                Ok(Ok(_)) => {}
                Ok(Err(refused)) => {
                    drop(tx);
                    return Err(self.explain_refusal(&entry, refused).await);
                }
                Err(StoreError::DuplicateReference(_)) => return Ok(StripeDebit::AlreadyApplied),
                Err(e) => return Err(e),
            }
        }
        if shortfall.is_positive() {
            let note = format!(
                "{event_type} for {payment_intent}: {shortfall} more than the balance could cover"
            );
            audit(
                &mut tx,
                "stripe",
                "balance.shortfall",
                Some(account_id),
                None,
                Some(&note),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(StripeDebit::Debited {
            account_id,
            amount: take,
            shortfall,
        })
    }
}
