//! Two-factor authentication: an account's TOTP secret, its one-time recovery codes, and when a
//! session last passed the second factor. The codes themselves are computed and checked in
//! `admin::totp`; the store makes each acceptance atomic (a step or a recovery code is taken by
//! one conditional update, so two concurrent log-ins cannot both spend it).

use super::{Store, StoreError, audit};
use crate::time::now_ms;
use sqlx::Row;

/// An account's TOTP enrolment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwoFactor {
    /// The shared secret, base32.
    pub secret: String,
    /// When the enrolment was confirmed with a code; `None` while it waits for one.
    pub enabled_at: Option<i64>,
    /// Unused recovery codes left.
    pub recovery_left: i64,
}

impl TwoFactor {
    pub fn enabled(&self) -> bool {
        self.enabled_at.is_some()
    }
}

impl Store {
    pub async fn two_factor(&self, account_id: i64) -> Result<Option<TwoFactor>, StoreError> {
        let row = sqlx::query(
            "SELECT secret, enabled_at,
                    (SELECT COUNT(*) FROM recovery_codes r
                      WHERE r.account_id = t.account_id AND r.used_at IS NULL) AS recovery_left
             FROM two_factor t WHERE account_id = $1",
        )
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(TwoFactor {
                secret: r.try_get("secret")?,
                enabled_at: r.try_get("enabled_at")?,
                recovery_left: r.try_get("recovery_left")?,
            })
        })
        .transpose()
    }

    /// Starts (or restarts) an enrolment with a new secret. Refused when 2FA is already on: it
    /// must be turned off first, with a code.
    pub async fn begin_two_factor(&self, account_id: i64, secret: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let on: Option<Option<i64>> =
            sqlx::query_scalar("SELECT enabled_at FROM two_factor WHERE account_id = $1")
                .bind(account_id)
                .fetch_optional(&mut *tx)
                .await?;
        if matches!(on, Some(Some(_))) {
            return Err(StoreError::Invalid(
                "two-factor authentication is already on".into(),
            ));
        }
        sqlx::query("DELETE FROM two_factor WHERE account_id = $1")
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO two_factor (account_id, secret, enabled_at, last_step, created_at)
             VALUES ($1, $2, NULL, 0, $3)",
        )
        .bind(account_id)
        .bind(secret)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Confirms a pending enrolment with the step of a code just checked, and stores the
    /// recovery codes' hashes. False when there is no pending enrolment (or the step was used).
    pub async fn enable_two_factor(
        &self,
        account_id: i64,
        step: i64,
        recovery_hashes: &[String],
        actor: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE two_factor SET enabled_at = $1, last_step = $2
             WHERE account_id = $3 AND enabled_at IS NULL AND last_step < $2",
        )
        .bind(now_ms())
        .bind(step)
        .bind(account_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        replace_codes(&mut tx, account_id, recovery_hashes).await?;
        audit(
            &mut tx,
            actor,
            "account.two_factor_enabled",
            Some(account_id),
            None,
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Takes TOTP step `step` for an enabled account: true once per step and only for a step
    /// later than any taken before (a replayed or older code gets false).
    pub async fn take_totp_step(&self, account_id: i64, step: i64) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE two_factor SET last_step = $1
             WHERE account_id = $2 AND enabled_at IS NOT NULL AND last_step < $1",
        )
        .bind(step)
        .bind(account_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Spends a recovery code (by its hash): true once, false for an unknown or spent code.
    pub async fn use_recovery_code(
        &self,
        account_id: i64,
        code_hash: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE recovery_codes SET used_at = $1
             WHERE account_id = $2 AND code_hash = $3 AND used_at IS NULL",
        )
        .bind(now_ms())
        .bind(account_id)
        .bind(code_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            audit(
                &mut tx,
                "self",
                "account.recovery_code_used",
                Some(account_id),
                None,
                None,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// New recovery codes for an enabled account; the old ones stop working.
    pub async fn replace_recovery_codes(
        &self,
        account_id: i64,
        recovery_hashes: &[String],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        replace_codes(&mut tx, account_id, recovery_hashes).await?;
        audit(
            &mut tx,
            "self",
            "account.recovery_codes_replaced",
            Some(account_id),
            None,
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Turns 2FA off (by the account with a code, or by an operator for a lost phone, with a
    /// reason): the secret and the recovery codes go.
    pub async fn disable_two_factor(
        &self,
        account_id: i64,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query("DELETE FROM two_factor WHERE account_id = $1")
            .bind(account_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM recovery_codes WHERE account_id = $1")
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
        if n > 0 {
            audit(
                &mut tx,
                actor,
                "account.two_factor_disabled",
                Some(account_id),
                None,
                reason,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    /// Ends every session of the account but `keep` (by its hash): after 2FA is turned on, a
    /// browser signed in before with the password alone must log in again.
    pub async fn end_other_sessions(&self, account_id: i64, keep: &str) -> Result<u64, StoreError> {
        Ok(
            sqlx::query("DELETE FROM web_sessions WHERE account_id = $1 AND token_hash <> $2")
                .bind(account_id)
                .bind(keep)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    /// Records that the session passed the second factor now.
    pub async fn mark_second_factor(&self, token_hash: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE web_sessions SET second_factor_at = $1 WHERE token_hash = $2")
            .bind(now_ms())
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

async fn replace_codes(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    account_id: i64,
    hashes: &[String],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM recovery_codes WHERE account_id = $1")
        .bind(account_id)
        .execute(&mut **tx)
        .await?;
    for h in hashes {
        sqlx::query(
            "INSERT INTO recovery_codes (account_id, code_hash, used_at) VALUES ($1, $2, NULL)",
        )
        .bind(account_id)
        .bind(h)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
