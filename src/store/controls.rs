//! An operator's abuse controls besides suspension: an account's own rate limits, and
//! throttles (temporarily lower limits) on an account or a key. Each change bumps `updated_at`
//! (so every gateway's key cache picks it up within a second) and goes to the audit log.

use super::accounts::{LimitOverrides, Throttle};
use super::{Store, StoreError, audit};
use crate::time::now_ms;

/// What a control applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Account(i64),
    Key(i64),
}

fn check_positive(what: &str, v: Option<i64>) -> Result<(), StoreError> {
    if v.is_some_and(|v| v <= 0) {
        return Err(StoreError::Invalid(format!(
            "{what} must be 1 or more (leave it empty for the default)"
        )));
    }
    Ok(())
}

impl Store {
    /// Sets an account's or a key's own limits (`None` fields: the conf's defaults).
    pub async fn set_limits(
        &self,
        target: Target,
        limits: &LimitOverrides,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        check_positive("requests per minute", limits.requests_per_minute)?;
        check_positive("tokens per minute", limits.tokens_per_minute)?;
        check_positive("requests in flight", limits.in_flight)?;
        let (table, id, noun) = match target {
            Target::Account(id) => ("accounts", id, "account"),
            Target::Key(id) => ("api_keys", id, "key"),
        };
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(&format!(
            "UPDATE {table} SET requests_per_minute = $1, tokens_per_minute = $2, in_flight = $3,
                 updated_at = $4 WHERE id = $5"
        ))
        .bind(limits.requests_per_minute)
        .bind(limits.tokens_per_minute)
        .bind(limits.in_flight)
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::not_found(noun, id));
        }
        let (account_id, key_id) = owner(&mut tx, target).await?;
        let what = format!(
            "limits: {} req/min, {} tok/min, {} in flight{}",
            shown(limits.requests_per_minute),
            shown(limits.tokens_per_minute),
            shown(limits.in_flight),
            reason.map(|r| format!(" ({r})")).unwrap_or_default()
        );
        let action = format!("{noun}.limits");
        audit(&mut tx, actor, &action, account_id, key_id, Some(&what)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Throttles an account or a key until `throttle.until_ms`, or lifts a throttle
    /// (`until_ms: None`).
    pub async fn set_throttle(
        &self,
        target: Target,
        throttle: &Throttle,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        check_positive("requests per minute", throttle.requests_per_minute)?;
        check_positive("tokens per minute", throttle.tokens_per_minute)?;
        let now = now_ms();
        let lifting = throttle.until_ms.is_none();
        if !lifting {
            if throttle.until_ms.is_some_and(|u| u <= now) {
                return Err(StoreError::Invalid(
                    "a throttle must end in the future".into(),
                ));
            }
            if throttle.requests_per_minute.is_none() && throttle.tokens_per_minute.is_none() {
                return Err(StoreError::Invalid(
                    "a throttle lowers requests or tokens per minute: give at least one".into(),
                ));
            }
        }
        let (table, id) = match target {
            Target::Account(id) => ("accounts", id),
            Target::Key(id) => ("api_keys", id),
        };
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(&format!(
            "UPDATE {table} SET throttle_requests_per_minute = $1, throttle_tokens_per_minute = $2,
                 throttle_until = $3, updated_at = $4 WHERE id = $5"
        ))
        .bind(throttle.requests_per_minute)
        .bind(throttle.tokens_per_minute)
        .bind(throttle.until_ms)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::not_found(
                if table == "accounts" {
                    "account"
                } else {
                    "key"
                },
                id,
            ));
        }
        let (account_id, key_id) = owner(&mut tx, target).await?;
        let noun = if key_id.is_some() { "key" } else { "account" };
        let action = format!("{noun}.{}", if lifting { "unthrottle" } else { "throttle" });
        let what = if lifting {
            reason.unwrap_or("lifted").to_owned()
        } else {
            format!(
                "{} req/min, {} tok/min until {}{}",
                shown(throttle.requests_per_minute),
                shown(throttle.tokens_per_minute),
                throttle
                    .until_ms
                    .map(crate::time::format_utc)
                    .unwrap_or_default(),
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            )
        };
        audit(&mut tx, actor, &action, account_id, key_id, Some(&what)).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The account (and key) a target names, for the audit log.
async fn owner(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    target: Target,
) -> Result<(Option<i64>, Option<i64>), StoreError> {
    use sqlx::Row;
    match target {
        Target::Account(id) => Ok((Some(id), None)),
        Target::Key(id) => {
            let row = sqlx::query("SELECT account_id FROM api_keys WHERE id = $1")
                .bind(id)
                .fetch_one(&mut **tx)
                .await?;
            Ok((Some(row.try_get::<i64, _>("account_id")?), Some(id)))
        }
    }
}

fn shown(v: Option<i64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "default".into())
}
