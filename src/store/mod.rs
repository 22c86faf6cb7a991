//! The store: one repository layer over SQLite (the embedded default) or PostgreSQL, used by both
//! binaries and behaving the same on both (one contract suite runs against each).
//!
//! sqlx's `Any` driver carries the queries, so each is written once in the SQL both dialects
//! share (`$1` placeholders, `RETURNING`, `ON CONFLICT`); integers are `BIGINT` on PostgreSQL so
//! every column decodes as `i64` on both. Writes that must be exact are single conditional
//! statements or short transactions that start with their write (on SQLite, `BEGIN IMMEDIATE`),
//! never a read followed by a write across an await.

mod accounts;
mod caps;
mod controls;
mod export;
mod keys;
mod leases;
mod ledger;
mod nodes;
mod refunds;
mod reports;
mod retention;
mod rollups;
mod sessions;
mod stripe;
mod two_factor;
mod upstream_credit;
mod usage;

pub use accounts::{
    Account, AccountRef, AccountStatus, LimitOverrides, NewAccount, Role, Throttle,
};
pub use caps::CapUse;
pub use controls::Target;
pub use export::{AuditFilter, Exported, RowStream};
pub use keys::{ApiKey, KeyAuth, KeyStatus, NewKey};
pub use leases::Settlement;
pub use ledger::{BalanceProof, LedgerEntry, LedgerKind, NewLedgerEntry};
pub use nodes::{InstanceRow, LeaseRow, Released};
pub use refunds::{RefundAllocation, RefundRequest, StripeDebit};
pub use reports::{DailyMargin, DailyMoney, UpstreamStats};
pub use retention::RetentionReport;
pub use rollups::hour_of;
pub use sessions::Session;
pub use stripe::{CheckoutCredit, PaidSession, Payment};
pub use two_factor::TwoFactor;
pub use upstream_credit::{ProviderCredit, UpstreamCredit};
pub use usage::{DailyUsage, StatusFilter, UsageFilter, UsageRecord};

use crate::conf::{Backend, StoreConf};
use crate::money::{MoneyError, NanoUsd};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Connection, Executor, Row};
use std::path::PathBuf;
use std::time::Duration;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// What can go wrong in the store, in terms a caller can act on. Database errors that are not a
/// user's doing stay inside [`StoreError::Database`] and are logged, not shown to customers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot reach the store at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("no {what} {id}")]
    NotFound { what: &'static str, id: String },
    #[error("an account with e-mail {0} already exists")]
    DuplicateEmail(String),
    #[error("key {0} is already revoked")]
    KeyRevoked(i64),
    #[error("a ledger entry with reference {0:?} already exists (already applied)")]
    DuplicateReference(String),
    #[error("insufficient balance: this needs {needed} but the account has {available}")]
    InsufficientBalance { needed: NanoUsd, available: NanoUsd },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Money(#[from] MoneyError),
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    fn not_found(what: &'static str, id: impl ToString) -> Self {
        StoreError::NotFound {
            what,
            id: id.to_string(),
        }
    }
}

/// Whether an error is a unique-constraint violation (on either backend).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

/// A handle to the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Connects (creating a SQLite file and its folder when needed). Does not migrate.
    pub async fn connect(conf: &StoreConf) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let url = conf.url.expose();
        let shown = redact_url(url);
        let mut connect_url = url.clone();
        if conf.backend == Backend::Sqlite {
            if let Some(path) = sqlite_path(url)
                && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Unreachable {
                    url: shown.clone(),
                    detail: format!("cannot create folder {}: {e}", dir.display()),
                })?;
            }
            if !connect_url.contains("mode=") {
                connect_url.push_str(if connect_url.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
        }
        let backend = conf.backend;
        let unreachable = |e: sqlx::Error| StoreError::Unreachable {
            url: shown.clone(),
            detail: match backend {
                Backend::Postgres => {
                    format!("{e} (is PostgreSQL running, and does the database exist?)")
                }
                Backend::Sqlite => e.to_string(),
            },
        };
        // One direct attempt first: a pool retries a refused connection until its acquire
        // timeout, but an operator wants the reason at once.
        sqlx::AnyConnection::connect(&connect_url)
            .await
            .map_err(unreachable)?
            .close()
            .await
            .map_err(unreachable)?;
        let pool = AnyPoolOptions::new()
            .max_connections(conf.max_connections.get())
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets the gateway read while the admin writes; the busy timeout makes
                        // a second writer wait instead of failing.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                    }
                    Ok(())
                })
            })
            .connect(&connect_url)
            .await
            .map_err(unreachable)?;
        Ok(Store { pool, backend })
    }

    /// Connects and brings the schema up to date: what both binaries do at start.
    pub async fn open(conf: &StoreConf) -> Result<Store, StoreError> {
        let store = Store::connect(conf).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Applies pending migrations (idempotent; safe to run from both binaries).
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let migrator = self.migrator();
        let before = self.applied_migrations().await.unwrap_or(0);
        migrator.run(&self.pool).await?;
        let after = self.applied_migrations().await?;
        Ok(after.saturating_sub(before))
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        }
    }

    async fn applied_migrations(&self) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations WHERE success = TRUE")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for tests and for repository code in this module's children.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A transaction that holds the write lock from its first statement on SQLite, so a
    /// read inside it can never be invalidated by another writer.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(tx)
    }
}

/// Appends the `n`th bind placeholder of a generated multi-row statement. SQLite gets anonymous
/// `?` (numbered names cost a linear search per bind there, quadratic over a large statement);
/// PostgreSQL gets `$n`.
fn placeholder(sql: &mut String, backend: Backend, n: usize) {
    use std::fmt::Write;
    match backend {
        Backend::Sqlite => sql.push('?'),
        Backend::Postgres => {
            let _ = write!(sql, "${n}");
        }
    }
}

/// Appends the `VALUES` tuples of a multi-row statement: `rows` of `per_row` placeholders each.
fn push_values(sql: &mut String, backend: Backend, rows: usize, per_row: usize) {
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..per_row {
            if c > 0 {
                sql.push(',');
            }
            placeholder(sql, backend, i * per_row + c + 1);
        }
        sql.push(')');
    }
}

/// Insert an audit-log row inside a caller's transaction.
async fn audit(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    actor: &str,
    action: &str,
    account_id: Option<i64>,
    key_id: Option<i64>,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_log (actor, action, account_id, key_id, reason, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(actor)
    .bind(action)
    .bind(account_id)
    .bind(key_id)
    .bind(reason)
    .bind(crate::time::now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One audit-log row, as the operator reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub actor: String,
    pub action: String,
    pub account_id: Option<i64>,
    pub key_id: Option<i64>,
    pub reason: Option<String>,
    pub created_at: i64,
}

impl Store {
    /// The audit trail of one account, newest first.
    pub async fn audit_log(&self, account_id: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT actor, action, account_id, key_id, reason, created_at FROM audit_log
             WHERE account_id = $1 ORDER BY created_at DESC, id DESC",
        )
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(AuditEntry::from_row).collect()
    }
}

impl AuditEntry {
    fn from_row(r: &AnyRow) -> Result<Self, StoreError> {
        Ok(AuditEntry {
            actor: r.try_get("actor")?,
            action: r.try_get("action")?,
            account_id: r.try_get("account_id")?,
            key_id: r.try_get("key_id")?,
            reason: r.try_get("reason")?,
            created_at: r.try_get("created_at")?,
        })
    }
}

/// The file behind a `sqlite:` URL, if it names one (not `:memory:`).
pub fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && !path.starts_with(":memory:")).then(|| PathBuf::from(path))
}

/// A URL fit for messages: any password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            sqlite_path("sqlite://data/duang.db"),
            Some(PathBuf::from("data/duang.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:///tmp/x.db?mode=rwc"),
            Some(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(
            redact_url("postgres://u:hunter2@h/db"),
            "postgres://u:***@h/db"
        );
    }
}
