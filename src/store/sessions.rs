//! Dashboard sessions (by the hash of their cookie), server settings, and password changes.

use super::accounts::Account;
use super::{Store, StoreError, audit};
use crate::time::now_ms;
use sqlx::Row;

/// A live dashboard session.
#[derive(Debug, Clone)]
pub struct Session {
    pub account: Account,
    /// When the session last passed the second factor (`None`: never, or 2FA is off).
    pub second_factor_at: Option<i64>,
    /// Whether the account has two-factor authentication on.
    pub two_factor: bool,
}

impl Store {
    /// Records a logged-in session. `token_hash` is the SHA-256 of the cookie value.
    pub async fn create_session(
        &self,
        token_hash: &str,
        account_id: i64,
        expires_at: i64,
        second_factor: bool,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        // Expired rows of this account go with every new login, so the table cannot grow
        // without bound.
        sqlx::query("DELETE FROM web_sessions WHERE account_id = $1 AND expires_at <= $2")
            .bind(account_id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO web_sessions (token_hash, account_id, created_at, expires_at, second_factor_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash)
        .bind(account_id)
        .bind(now)
        .bind(expires_at)
        .bind(second_factor.then_some(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The account behind a live session, if the session exists and has not expired, with
    /// what the session knows of the second factor.
    pub async fn session_account(&self, token_hash: &str) -> Result<Option<Session>, StoreError> {
        let row = sqlx::query(
            "SELECT s.account_id, s.second_factor_at,
                    CAST(CASE WHEN t.enabled_at IS NULL THEN 0 ELSE 1 END AS BIGINT) AS two_factor
             FROM web_sessions s LEFT JOIN two_factor t ON t.account_id = s.account_id
             WHERE s.token_hash = $1 AND s.expires_at > $2",
        )
        .bind(token_hash)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => {
                let id: i64 = r.try_get("account_id")?;
                let two_factor: i64 = r.try_get("two_factor")?;
                let account = self.account(&super::AccountRef::Id(id)).await?;
                Ok(Some(Session {
                    account: self.with_leases(account).await?,
                    second_factor_at: r.try_get("second_factor_at")?,
                    two_factor: two_factor == 1,
                }))
            }
            None => Ok(None),
        }
    }

    /// Fills [`Account::leased`]: what gateway nodes hold leased of this account's balance.
    pub async fn with_leases(&self, mut account: Account) -> Result<Account, StoreError> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(amount_nano), 0) AS BIGINT) AS leased FROM credit_leases WHERE account_id = $1",
        )
        .bind(account.id)
        .fetch_one(&self.pool)
        .await?;
        account.leased = crate::money::NanoUsd::from_nanos(row.try_get("leased")?);
        Ok(account)
    }

    pub async fn delete_session(&self, token_hash: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM web_sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sets a new password hash and ends every session of the account, in one transaction.
    pub async fn set_password(
        &self,
        account_id: i64,
        password_hash: &str,
        actor: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let n =
            sqlx::query("UPDATE accounts SET password_hash = $1, updated_at = $2 WHERE id = $3")
                .bind(password_hash)
                .bind(now_ms())
                .bind(account_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if n == 0 {
            return Err(StoreError::not_found("account", account_id));
        }
        sqlx::query("DELETE FROM web_sessions WHERE account_id = $1")
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            actor,
            "account.password_set",
            Some(account_id),
            None,
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The value of setting `name`, made by `make` and stored the first time it is asked for.
    /// Concurrent first calls agree on one value (the first insert wins).
    pub async fn setting_or_init(
        &self,
        name: &str,
        make: impl FnOnce() -> String,
    ) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO settings (name, value, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(make())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }
}
