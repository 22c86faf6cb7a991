//! API keys: stored as a hash with a display prefix, never as plaintext.

use super::accounts::LimitOverrides;
use super::{Store, StoreError, audit, is_unique_violation};
use crate::money::NanoUsd;
use crate::time::now_ms;
use sqlx::Row;
use sqlx::any::AnyRow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
    /// Stopped by an operator (Acceptable Use Policy); can be reactivated, unlike revoked.
    Suspended,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Suspended => "suspended",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "active" => Ok(KeyStatus::Active),
            "revoked" => Ok(KeyStatus::Revoked),
            "suspended" => Ok(KeyStatus::Suspended),
            other => Err(StoreError::Invalid(format!("unknown key status {other:?}"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: i64,
    pub account_id: i64,
    pub display_prefix: String,
    pub name: String,
    pub status: KeyStatus,
    pub expires_at: Option<i64>,
    pub limits: LimitOverrides,
    pub throttle: super::accounts::Throttle,
    pub spend_cap: Option<NanoUsd>,
    /// Tier names the key may use; `None` means every tier.
    pub allowed_models: Option<Vec<String>>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
}

impl ApiKey {
    fn from_row(r: &AnyRow) -> Result<Self, StoreError> {
        let allowed: Option<String> = r.try_get("allowed_models")?;
        Ok(ApiKey {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            display_prefix: r.try_get("display_prefix")?,
            name: r.try_get("name")?,
            status: KeyStatus::parse(&r.try_get::<String, _>("status")?)?,
            expires_at: r.try_get("expires_at")?,
            limits: LimitOverrides::from_row(r)?,
            throttle: super::accounts::Throttle::from_row(r, "")?,
            spend_cap: r
                .try_get::<Option<i64>, _>("spend_cap_nano")?
                .map(NanoUsd::from_nanos),
            allowed_models: allowed.map(|s| s.split(',').map(str::to_owned).collect()),
            last_used_at: r.try_get("last_used_at")?,
            revoked_at: r.try_get("revoked_at")?,
            created_at: r.try_get("created_at")?,
        })
    }

    /// Whether the key can authenticate a request at `now_ms` (status and expiry only).
    pub fn is_usable_at(&self, now_ms: i64) -> bool {
        self.status == KeyStatus::Active && self.expires_at.is_none_or(|t| t > now_ms)
    }
}

#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub account_id: i64,
    pub name: String,
    pub expires_at: Option<i64>,
    pub limits: LimitOverrides,
    pub spend_cap: Option<NanoUsd>,
    pub allowed_models: Option<Vec<String>>,
}

const KEY_COLUMNS: &str = "id, account_id, display_prefix, name, status, expires_at, requests_per_minute, \
     tokens_per_minute, in_flight, throttle_requests_per_minute, throttle_tokens_per_minute, throttle_until, \
     spend_cap_nano, allowed_models, last_used_at, revoked_at, created_at";

impl Store {
    /// Stores a new key by its hash. The caller made the key (`crate::keys::generate`) and shows
    /// the plaintext once; it never reaches the store.
    pub async fn create_key(
        &self,
        new: &NewKey,
        key_hash: &str,
        display_prefix: &str,
    ) -> Result<ApiKey, StoreError> {
        let name = new.name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(StoreError::Invalid(
                "a key name must be 1 to 100 characters".into(),
            ));
        }
        for (what, v) in [
            ("requests_per_minute", new.limits.requests_per_minute),
            ("tokens_per_minute", new.limits.tokens_per_minute),
            ("in_flight", new.limits.in_flight),
            ("spend cap", new.spend_cap.map(NanoUsd::nanos)),
        ] {
            if v.is_some_and(|v| v <= 0) {
                return Err(StoreError::Invalid(format!("{what} must be positive")));
            }
        }
        let now = now_ms();
        if new.expires_at.is_some_and(|t| t <= now) {
            return Err(StoreError::Invalid("the expiry is in the past".into()));
        }
        let allowed = new.allowed_models.as_ref().map(|m| m.join(","));
        // The account must exist and not be terminated; checked in the same statement.
        let row = sqlx::query(&format!(
            "INSERT INTO api_keys (account_id, key_hash, display_prefix, name, expires_at,
                 requests_per_minute, tokens_per_minute, in_flight, spend_cap_nano, allowed_models,
                 created_at, updated_at)
             SELECT id, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11 FROM accounts
             WHERE id = $1 AND status <> 'terminated'
             RETURNING {KEY_COLUMNS}"
        ))
        .bind(new.account_id)
        .bind(key_hash)
        .bind(display_prefix)
        .bind(name)
        .bind(new.expires_at)
        .bind(new.limits.requests_per_minute)
        .bind(new.limits.tokens_per_minute)
        .bind(new.limits.in_flight)
        .bind(new.spend_cap.map(NanoUsd::nanos))
        .bind(allowed)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Invalid("a key with this hash already exists".into())
            } else {
                e.into()
            }
        })?;
        match row {
            Some(row) => ApiKey::from_row(&row),
            None => Err(StoreError::not_found("active account", new.account_id)),
        }
    }

    pub async fn key(&self, key_id: i64) -> Result<ApiKey, StoreError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("key", key_id))?;
        ApiKey::from_row(&row)
    }

    /// Looks a presented key up by its hash (the gateway's cache fills from this).
    pub async fn key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"
        ))
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(ApiKey::from_row).transpose()
    }

    /// An account's keys, newest first.
    pub async fn list_keys(&self, account_id: i64) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE account_id = $1 ORDER BY created_at DESC, id DESC"
        ))
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(ApiKey::from_row).collect()
    }

    /// Revokes a key for good (recorded in the audit log). Revoking twice is an error that says so.
    pub async fn revoke_key(
        &self,
        key_id: i64,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<ApiKey, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = now_ms();
        let row = sqlx::query(&format!(
            "UPDATE api_keys SET status = 'revoked', revoked_at = $1, updated_at = $1
             WHERE id = $2 AND status <> 'revoked' RETURNING {KEY_COLUMNS}"
        ))
        .bind(now)
        .bind(key_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            let key = self.key(key_id).await?;
            return Err(StoreError::KeyRevoked(key.id));
        };
        let key = ApiKey::from_row(&row)?;
        audit(
            &mut tx,
            actor,
            "key.revoke",
            Some(key.account_id),
            Some(key.id),
            reason,
        )
        .await?;
        tx.commit().await?;
        Ok(key)
    }

    /// Records that a key was used (the gateway batches these).
    pub async fn touch_key(&self, key_id: i64, at_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE api_keys SET last_used_at = $1
             WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)",
        )
        .bind(at_ms)
        .bind(key_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// A key with what the gateway needs to know about its account, for the auth cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAuth {
    pub key_hash: String,
    pub key: ApiKey,
    pub account_status: super::AccountStatus,
    pub account_verified: bool,
    /// The account's own limits (all its keys together); `None` fields keep the conf default.
    pub account_limits: LimitOverrides,
    pub account_throttle: super::accounts::Throttle,
}

static KEY_AUTH_SELECT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let cols: Vec<String> = KEY_COLUMNS
        .split(',')
        .map(|c| format!("k.{}", c.trim()))
        .collect();
    format!(
        "SELECT {}, k.key_hash, a.status AS account_status, a.email_verified_at AS account_verified_at,
                a.requests_per_minute AS account_rpm, a.tokens_per_minute AS account_tpm,
                a.in_flight AS account_in_flight,
                a.throttle_requests_per_minute AS account_throttle_requests_per_minute,
                a.throttle_tokens_per_minute AS account_throttle_tokens_per_minute,
                a.throttle_until AS account_throttle_until
         FROM api_keys k JOIN accounts a ON a.id = k.account_id",
        cols.join(", ")
    )
});

impl KeyAuth {
    fn from_row(r: &AnyRow) -> Result<Self, StoreError> {
        let status: String = r.try_get("account_status")?;
        Ok(KeyAuth {
            key_hash: r.try_get("key_hash")?,
            key: ApiKey::from_row(r)?,
            account_status: super::accounts::parse_status(&status)?,
            account_verified: r
                .try_get::<Option<i64>, _>("account_verified_at")?
                .is_some(),
            account_limits: LimitOverrides {
                requests_per_minute: r.try_get("account_rpm")?,
                tokens_per_minute: r.try_get("account_tpm")?,
                in_flight: r.try_get("account_in_flight")?,
            },
            account_throttle: super::accounts::Throttle::from_row(r, "account_")?,
        })
    }
}

impl Store {
    /// One key with its account's status, by the key's hash (an auth-cache miss).
    pub async fn key_auth_by_hash(&self, key_hash: &str) -> Result<Option<KeyAuth>, StoreError> {
        let row = sqlx::query(&format!("{} WHERE k.key_hash = $1", *KEY_AUTH_SELECT))
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(KeyAuth::from_row).transpose()
    }

    /// Keys whose row or whose account's row changed at or after `since_ms` (`None`: every key
    /// that is not revoked), for warming and refreshing the auth cache.
    pub async fn key_auth_changed_since(
        &self,
        since_ms: Option<i64>,
    ) -> Result<Vec<KeyAuth>, StoreError> {
        let rows = match since_ms {
            Some(since) => {
                sqlx::query(&format!(
                    "{} WHERE k.updated_at >= $1 OR a.updated_at >= $1",
                    *KEY_AUTH_SELECT
                ))
                .bind(since)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("{} WHERE k.status <> 'revoked'", *KEY_AUTH_SELECT))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(KeyAuth::from_row).collect()
    }
}
