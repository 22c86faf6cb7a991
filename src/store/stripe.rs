//! What the admin remembers of Stripe: the Checkout Sessions it created, the events it has
//! processed, and the credit a paid session adds — each applied exactly once.

use super::ledger::{LedgerKind, NewLedgerEntry, append_in};
use super::{Store, StoreError, is_unique_violation};
use crate::money::NanoUsd;
use crate::time::now_ms;
use sqlx::Row;

/// What applying a paid Checkout Session did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckoutCredit {
    /// The account was credited with this amount.
    Credited { account_id: i64, amount: NanoUsd },
    /// This event id was processed before (a redelivery): nothing changed.
    DuplicateEvent,
    /// The session was credited by an earlier event: nothing changed.
    AlreadyCredited,
    /// No session with this id was created here (another system's, or forged): nothing changed.
    UnknownSession,
    /// The event's amount or currency differs from what we asked Stripe for: nothing credited.
    AmountMismatch { expected_cents: i64, got_cents: i64 },
}

/// A paid Checkout Session as a webhook event reports it.
#[derive(Debug, Clone)]
pub struct PaidSession<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub session_id: &'a str,
    pub payment_intent: Option<&'a str>,
    pub amount_total_cents: i64,
    pub currency: &'a str,
}

impl Store {
    /// Remembers a Checkout Session the admin created, so its webhook can be matched to an account.
    pub async fn record_checkout_session(
        &self,
        session_id: &str,
        account_id: i64,
        amount_cents: i64,
        currency: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO stripe_checkout_sessions (session_id, account_id, amount_cents, currency, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(session_id)
        .bind(account_id)
        .bind(amount_cents)
        .bind(currency)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Invalid(format!("checkout session {session_id} is already recorded"))
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    /// Records a Stripe event id; `false` when it was already processed (a replay).
    pub async fn record_stripe_event(
        &self,
        event_id: &str,
        event_type: &str,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "INSERT INTO stripe_events (event_id, event_type, received_at) VALUES ($1, $2, $3)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event_id)
        .bind(event_type)
        .bind(now_ms())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Credits a paid Checkout Session once, in one transaction: the event id, the session's
    /// state and the ledger entry (reference `stripe:checkout:<session id>`) commit together or
    /// not at all, so a failure here can be retried by Stripe and two deliveries at once credit
    /// once.
    pub async fn credit_checkout(&self, p: &PaidSession<'_>) -> Result<CheckoutCredit, StoreError> {
        let mut tx = self.begin_write().await?;
        let fresh = sqlx::query(
            "INSERT INTO stripe_events (event_id, event_type, received_at) VALUES ($1, $2, $3)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(p.event_id)
        .bind(p.event_type)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if fresh == 0 {
            return Ok(CheckoutCredit::DuplicateEvent);
        }
        let row = sqlx::query(
            "SELECT account_id, amount_cents, currency, status FROM stripe_checkout_sessions
             WHERE session_id = $1",
        )
        .bind(p.session_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(CheckoutCredit::UnknownSession);
        };
        let account_id: i64 = row.try_get("account_id")?;
        let expected: i64 = row.try_get("amount_cents")?;
        let currency: String = row.try_get("currency")?;
        let status: String = row.try_get("status")?;
        if status == "paid" {
            tx.commit().await?;
            return Ok(CheckoutCredit::AlreadyCredited);
        }
        if expected != p.amount_total_cents || !currency.eq_ignore_ascii_case(p.currency) {
            tx.commit().await?;
            return Ok(CheckoutCredit::AmountMismatch {
                expected_cents: expected,
                got_cents: p.amount_total_cents,
            });
        }
        let now = now_ms();
        sqlx::query(
            "UPDATE stripe_checkout_sessions SET status = 'paid', payment_intent_id = $1, completed_at = $2
             WHERE session_id = $3 AND status <> 'paid'",
        )
        .bind(p.payment_intent)
        .bind(now)
        .bind(p.session_id)
        .execute(&mut *tx)
        .await?;
        let amount = NanoUsd::from_cents(expected)?;
        let entry = NewLedgerEntry {
            account_id,
            kind: LedgerKind::TopUp,
            amount,
            external_ref: format!("stripe:checkout:{}", p.session_id),
            actor: Some("stripe".into()),
            reason: None,
        };
        match append_in(&mut tx, &entry).await {
            Ok(Ok(_)) => {}
            Ok(Err(refused)) => {
                drop(tx);
                return Err(self.explain_refusal(&entry, refused).await);
            }
            Err(StoreError::DuplicateReference(_)) => {
                drop(tx);
                return Ok(CheckoutCredit::AlreadyCredited);
            }
            Err(e) => return Err(e),
        }
        tx.commit().await?;
        Ok(CheckoutCredit::Credited { account_id, amount })
    }

    /// The Checkout Sessions of an account, newest first: `(session id, cents, status, created)`.
    pub async fn checkout_sessions(
        &self,
        account_id: i64,
        limit: i64,
    ) -> Result<Vec<(String, i64, String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT session_id, amount_cents, status, created_at FROM stripe_checkout_sessions
             WHERE account_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(account_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("session_id")?,
                    r.try_get("amount_cents")?,
                    r.try_get("status")?,
                    r.try_get("created_at")?,
                ))
            })
            .collect()
    }
}

/// A paid Checkout Session, as a receipt shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub session_id: String,
    pub payment_intent: Option<String>,
    pub amount_cents: i64,
    pub refunded_cents: i64,
    pub currency: String,
    pub paid_at: i64,
}

impl Payment {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Payment, StoreError> {
        let created: i64 = r.try_get("created_at")?;
        let completed: Option<i64> = r.try_get("completed_at")?;
        Ok(Payment {
            session_id: r.try_get("session_id")?,
            payment_intent: r.try_get("payment_intent_id")?,
            amount_cents: r.try_get("amount_cents")?,
            refunded_cents: r.try_get("refunded_cents")?,
            currency: r.try_get("currency")?,
            paid_at: completed.unwrap_or(created),
        })
    }

    /// Stripe's reference for the payment: the PaymentIntent, or the session without one.
    pub fn reference(&self) -> &str {
        self.payment_intent.as_deref().unwrap_or(&self.session_id)
    }
}

const PAYMENT_COLUMNS: &str = "session_id, payment_intent_id, amount_cents, refunded_cents, currency, created_at, completed_at";

impl Store {
    /// The account's paid sessions, newest first, with what was refunded of each.
    pub async fn payments(&self, account_id: i64, limit: i64) -> Result<Vec<Payment>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM stripe_checkout_sessions
             WHERE account_id = $1 AND status = 'paid'
             ORDER BY COALESCE(completed_at, created_at) DESC, id DESC LIMIT $2"
        ))
        .bind(account_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Payment::from_row).collect()
    }

    /// One paid session of the account (another account's is "not found").
    pub async fn payment(&self, account_id: i64, session_id: &str) -> Result<Payment, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM stripe_checkout_sessions
             WHERE account_id = $1 AND session_id = $2 AND status = 'paid'"
        ))
        .bind(account_id)
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Payment::from_row(&r),
            None => Err(StoreError::not_found("payment", session_id)),
        }
    }
}
