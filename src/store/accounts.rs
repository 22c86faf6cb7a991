//! Accounts: identity, verification, status, role and the cached balance.

use super::{Store, StoreError, audit, is_unique_violation};
use crate::money::NanoUsd;
use crate::time::now_ms;
use sqlx::Row;
use sqlx::any::AnyRow;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountStatus {
    Active,
    Suspended,
    Terminated,
}

pub(super) fn parse_status(s: &str) -> Result<AccountStatus, StoreError> {
    AccountStatus::parse(s)
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::Suspended => "suspended",
            AccountStatus::Terminated => "terminated",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "active" => Ok(AccountStatus::Active),
            "suspended" => Ok(AccountStatus::Suspended),
            "terminated" => Ok(AccountStatus::Terminated),
            other => Err(StoreError::Invalid(format!(
                "unknown account status {other:?}"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Customer,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Operator => "operator",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "customer" => Ok(Role::Customer),
            "operator" => Ok(Role::Operator),
            other => Err(StoreError::Invalid(format!("unknown role {other:?}"))),
        }
    }
}

/// Limits set on an account or key that override the conf defaults; `None` keeps the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    pub requests_per_minute: Option<i64>,
    pub tokens_per_minute: Option<i64>,
    pub in_flight: Option<i64>,
}

impl LimitOverrides {
    pub(super) fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(LimitOverrides {
            requests_per_minute: r.try_get("requests_per_minute")?,
            tokens_per_minute: r.try_get("tokens_per_minute")?,
            in_flight: r.try_get("in_flight")?,
        })
    }
}

/// An operator's temporary lowering of rate limits, in force until `until_ms`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttle {
    pub requests_per_minute: Option<i64>,
    pub tokens_per_minute: Option<i64>,
    pub until_ms: Option<i64>,
}

impl Throttle {
    pub(super) fn from_row(r: &AnyRow, prefix: &str) -> Result<Self, sqlx::Error> {
        Ok(Throttle {
            requests_per_minute: r
                .try_get(format!("{prefix}throttle_requests_per_minute").as_str())?,
            tokens_per_minute: r.try_get(format!("{prefix}throttle_tokens_per_minute").as_str())?,
            until_ms: r.try_get(format!("{prefix}throttle_until").as_str())?,
        })
    }

    /// Whether it lowers anything at `now_ms`.
    pub fn active_at(&self, now_ms: i64) -> bool {
        self.until_ms.is_some_and(|u| u > now_ms)
            && (self.requests_per_minute.is_some() || self.tokens_per_minute.is_some())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: i64,
    pub email: String,
    pub has_password: bool,
    pub email_verified_at: Option<i64>,
    pub status: AccountStatus,
    pub role: Role,
    /// The cached balance (proved equal to the ledger by [`Store::balance_proof`]), without
    /// what gateway nodes have leased of it.
    pub balance: NanoUsd,
    /// Credit gateway nodes have leased for requests (still the customer's); filled only by
    /// [`Store::with_leases`], zero otherwise.
    pub leased: NanoUsd,
    pub limits: LimitOverrides,
    pub throttle: Throttle,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Account {
    pub fn is_verified(&self) -> bool {
        self.email_verified_at.is_some()
    }

    /// What the customer has: the balance plus what gateways hold leased of it (the ledger's
    /// sum). Only meaningful after [`Store::with_leases`].
    pub fn credit(&self) -> NanoUsd {
        self.balance
            .checked_add(self.leased)
            .unwrap_or(self.balance)
    }

    fn from_row(r: &AnyRow) -> Result<Self, StoreError> {
        let hash: Option<String> = r.try_get("password_hash")?;
        Ok(Account {
            id: r.try_get("id")?,
            email: r.try_get("email")?,
            has_password: hash.is_some(),
            email_verified_at: r.try_get("email_verified_at")?,
            status: AccountStatus::parse(&r.try_get::<String, _>("status")?)?,
            role: Role::parse(&r.try_get::<String, _>("role")?)?,
            balance: NanoUsd::from_nanos(r.try_get("balance_nano")?),
            leased: NanoUsd::ZERO,
            limits: LimitOverrides::from_row(r)?,
            throttle: Throttle::from_row(r, "")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }
}

/// How an operator names an account on the command line: its id or its e-mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountRef {
    Id(i64),
    Email(String),
}

impl FromStr for AccountRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(AccountRef::Id)
                .map_err(|e| format!("{s}: {e}"));
        }
        if crate::email::is_valid(s) {
            return Ok(AccountRef::Email(crate::email::normalize(s)));
        }
        Err(format!(
            "{s:?} is neither an account id nor an e-mail address"
        ))
    }
}

impl fmt::Display for AccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountRef::Id(id) => write!(f, "{id}"),
            AccountRef::Email(e) => f.write_str(e),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewAccount {
    pub email: String,
    pub password_hash: Option<String>,
    pub role: Role,
    pub verified: bool,
}

const ACCOUNT_COLUMNS: &str = "id, email, password_hash, email_verified_at, status, role, balance_nano, \
     requests_per_minute, tokens_per_minute, in_flight, throttle_requests_per_minute, \
     throttle_tokens_per_minute, throttle_until, created_at, updated_at";

impl Store {
    /// Creates an account with a zero balance. The e-mail must be valid; it is stored normalized.
    pub async fn create_account(&self, new: &NewAccount) -> Result<Account, StoreError> {
        if !crate::email::is_valid(&new.email) {
            return Err(StoreError::Invalid(format!(
                "{:?} is not a valid e-mail address",
                new.email
            )));
        }
        let email = crate::email::normalize(&new.email);
        let now = now_ms();
        let sql = format!(
            "INSERT INTO accounts (email, password_hash, email_verified_at, role, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $5) RETURNING {ACCOUNT_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&email)
            .bind(new.password_hash.as_deref())
            .bind(new.verified.then_some(now))
            .bind(new.role.as_str())
            .bind(now)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::DuplicateEmail(email.clone())
                } else {
                    e.into()
                }
            })?;
        Account::from_row(&row)
    }

    pub async fn account(&self, r: &AccountRef) -> Result<Account, StoreError> {
        let row = match r {
            AccountRef::Id(id) => {
                sqlx::query(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"
                ))
                .bind(*id)
                .fetch_optional(&self.pool)
                .await?
            }
            AccountRef::Email(email) => {
                sqlx::query(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE email = $1"
                ))
                .bind(crate::email::normalize(email))
                .fetch_optional(&self.pool)
                .await?
            }
        };
        match row {
            Some(row) => Account::from_row(&row),
            None => Err(StoreError::not_found("account", r)),
        }
    }

    /// The stored argon2id hash, for login.
    pub async fn password_hash(&self, account_id: i64) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT password_hash FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("account", account_id))?;
        Ok(row.try_get("password_hash")?)
    }

    /// Marks the e-mail verified (idempotent: the first verification time is kept).
    pub async fn mark_verified(&self, account_id: i64) -> Result<Account, StoreError> {
        let now = now_ms();
        let row = sqlx::query(&format!(
            "UPDATE accounts SET email_verified_at = COALESCE(email_verified_at, $1), updated_at = $1
             WHERE id = $2 RETURNING {ACCOUNT_COLUMNS}"
        ))
        .bind(now)
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found("account", account_id))?;
        Account::from_row(&row)
    }

    /// Suspends, reactivates or terminates an account, with the reason in the audit log, in one
    /// transaction. A terminated account stays terminated.
    pub async fn set_account_status(
        &self,
        account_id: i64,
        status: AccountStatus,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<Account, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "UPDATE accounts SET status = $1, updated_at = $2
             WHERE id = $3 AND status <> 'terminated' RETURNING {ACCOUNT_COLUMNS}"
        ))
        .bind(status.as_str())
        .bind(now_ms())
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            // Either it does not exist or it is terminated; say which.
            let account = self.account(&AccountRef::Id(account_id)).await?;
            return Err(StoreError::Invalid(format!(
                "account {} is {}; a terminated account cannot change status",
                account.email,
                account.status.as_str()
            )));
        };
        let action = format!("account.{}", status.as_str());
        audit(&mut tx, actor, &action, Some(account_id), None, reason).await?;
        tx.commit().await?;
        Account::from_row(&row)
    }

    /// Accounts whose e-mail contains `query` (empty: all), newest first.
    pub async fn search_accounts(
        &self,
        query: &str,
        limit: i64,
    ) -> Result<Vec<Account>, StoreError> {
        let pattern = format!(
            "%{}%",
            query.trim().to_ascii_lowercase().replace(['%', '_'], "")
        );
        let rows = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE email LIKE $1 ORDER BY id DESC LIMIT $2"
        ))
        .bind(pattern)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Account::from_row).collect()
    }
}

impl Store {
    /// Active accounts whose credit (balance plus what gateways hold leased) is below `below`,
    /// that have bought or been given credit before and were not yet told: each is marked told
    /// here, atomically (two admins never mail one crossing twice), and returned.
    pub async fn take_low_balance_crossings(
        &self,
        below: NanoUsd,
    ) -> Result<Vec<(Account, NanoUsd)>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.id,
                    CAST(a.balance_nano + COALESCE((SELECT SUM(l.amount_nano) FROM credit_leases l
                                                    WHERE l.account_id = a.id), 0) AS BIGINT) AS credit
             FROM accounts a
             WHERE a.status = 'active' AND a.low_balance_mailed_at IS NULL
               AND EXISTS (SELECT 1 FROM ledger e WHERE e.account_id = a.id AND e.amount_nano > 0)",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut crossed = Vec::new();
        for r in rows {
            let credit = NanoUsd::from_nanos(r.try_get("credit")?);
            if credit >= below {
                continue;
            }
            let id: i64 = r.try_get("id")?;
            let n = sqlx::query(
                "UPDATE accounts SET low_balance_mailed_at = $1
                 WHERE id = $2 AND low_balance_mailed_at IS NULL",
            )
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if n == 1 {
                crossed.push((self.account(&super::AccountRef::Id(id)).await?, credit));
            }
        }
        Ok(crossed)
    }

    /// Clears the low-balance mark of accounts whose credit is back at `below` or above, so the
    /// next crossing is told again. How many were cleared.
    pub async fn clear_low_balance_marks(&self, below: NanoUsd) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE accounts SET low_balance_mailed_at = NULL
             WHERE low_balance_mailed_at IS NOT NULL
               AND balance_nano + COALESCE((SELECT SUM(l.amount_nano) FROM credit_leases l
                                            WHERE l.account_id = accounts.id), 0) >= $1",
        )
        .bind(below.nanos())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}
