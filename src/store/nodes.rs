//! Gateway instances and their leases, as the store sees them: registration, heartbeats, the
//! sweep that returns the leases of instances that stopped renewing, and the operator's listing
//! and release (`duang-admin leases`).
//!
//! A lease belongs to an instance (one gateway process: its node id, a slash and its start), so
//! two processes of one node side by side (a rolling deploy) never touch each other's credit, and
//! a process that comes back under another name leaves nothing stranded: its old instance stops
//! renewing and is swept after the lease expiry.

use super::{Store, StoreError};
use crate::money::NanoUsd;
use sqlx::Row;

/// One lease, for the operator's listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub instance_id: String,
    pub account_id: i64,
    pub amount: NanoUsd,
    pub updated_at: i64,
}

/// One instance, for the operator's listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    pub instance_id: String,
    pub node_id: String,
    pub started_at: i64,
    /// `None`: the lease holder has no instance row (swept already, or a gateway from before
    /// instances were recorded).
    pub heartbeat_at: Option<i64>,
    pub leases: usize,
    pub leased: NanoUsd,
}

/// What an operator's release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// Leases returned to balances.
    Returned { leases: usize, total: NanoUsd },
    /// Nothing by that name: neither an instance nor a lease holder.
    Unknown,
    /// The instance renewed its heartbeat `age_ms` ago: it is alive and spending its leases.
    Alive { age_ms: i64 },
}

impl Store {
    /// Records a starting instance.
    pub async fn register_instance(
        &self,
        instance_id: &str,
        node_id: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO gateway_nodes (instance_id, node_id, started_at, heartbeat_at)
             VALUES ($1, $2, $3, $3)
             ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(instance_id)
        .bind(node_id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Renews an instance's heartbeat. `false`: the instance was swept (its leases went back),
    /// so it must forget the credit it holds in memory.
    pub async fn heartbeat(&self, instance_id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = sqlx::query("UPDATE gateway_nodes SET heartbeat_at = $1 WHERE instance_id = $2")
            .bind(now_ms)
            .bind(instance_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Removes a stopped instance (its leases already returned).
    pub async fn forget_instance(&self, instance_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM gateway_nodes WHERE instance_id = $1")
            .bind(instance_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Returns the leases of every instance whose heartbeat is older than `before_ms`, and of
    /// lease holders with no instance row whose leases were last touched before then. Returns
    /// what went back, per instance.
    pub async fn sweep_instances(
        &self,
        before_ms: i64,
    ) -> Result<Vec<(String, usize, NanoUsd)>, StoreError> {
        let stale: Vec<String> = sqlx::query(
            "SELECT instance_id FROM gateway_nodes WHERE heartbeat_at < $1
             UNION
             SELECT DISTINCT l.node_id FROM credit_leases l
              WHERE l.updated_at < $1
                AND NOT EXISTS (SELECT 1 FROM gateway_nodes n WHERE n.instance_id = l.node_id)",
        )
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for instance in stale {
            // The row goes first, conditionally: an instance that renewed in between keeps it,
            // and learns from its next heartbeat only if it really was removed.
            let removed = sqlx::query(
                "DELETE FROM gateway_nodes WHERE instance_id = $1 AND heartbeat_at < $2",
            )
            .bind(&instance)
            .bind(before_ms)
            .execute(&self.pool)
            .await?
            .rows_affected();
            let registered: bool =
                sqlx::query("SELECT 1 FROM gateway_nodes WHERE instance_id = $1")
                    .bind(&instance)
                    .fetch_optional(&self.pool)
                    .await?
                    .is_some();
            if removed == 0 && registered {
                continue;
            }
            let (n, total) = self.return_node_leases(&instance).await?;
            out.push((instance, n, total));
        }
        Ok(out)
    }

    /// Every instance and lease holder, with what it holds.
    pub async fn instances(&self) -> Result<Vec<InstanceRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT n.instance_id, n.node_id, n.started_at, n.heartbeat_at,
                    CAST(COUNT(l.account_id) AS BIGINT), CAST(COALESCE(SUM(l.amount_nano), 0) AS BIGINT)
               FROM gateway_nodes n LEFT JOIN credit_leases l ON l.node_id = n.instance_id
              GROUP BY n.instance_id, n.node_id, n.started_at, n.heartbeat_at
             UNION ALL
             SELECT l.node_id, l.node_id, MIN(l.created_at), CAST(NULL AS BIGINT), CAST(COUNT(*) AS BIGINT), CAST(SUM(l.amount_nano) AS BIGINT)
               FROM credit_leases l
              WHERE NOT EXISTS (SELECT 1 FROM gateway_nodes n WHERE n.instance_id = l.node_id)
              GROUP BY l.node_id
              ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(InstanceRow {
                    instance_id: r.try_get(0)?,
                    node_id: r.try_get(1)?,
                    started_at: r.try_get(2)?,
                    heartbeat_at: r.try_get(3)?,
                    leases: usize::try_from(r.try_get::<i64, _>(4)?).unwrap_or(0),
                    leased: NanoUsd::from_nanos(r.try_get(5)?),
                })
            })
            .collect()
    }

    /// Every lease, by holder then account.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, account_id, amount_nano, updated_at FROM credit_leases
             ORDER BY node_id, account_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LeaseRow {
                    instance_id: r.try_get(0)?,
                    account_id: r.try_get(1)?,
                    amount: NanoUsd::from_nanos(r.try_get(2)?),
                    updated_at: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// The operator's release of one instance's leases: refused while the instance renews its
    /// heartbeat within `alive_within_ms` (unless `force`), a clear answer for a name nobody holds.
    pub async fn release_instance(
        &self,
        instance_id: &str,
        now_ms: i64,
        alive_within_ms: i64,
        force: bool,
    ) -> Result<Released, StoreError> {
        let heartbeat: Option<i64> =
            sqlx::query("SELECT heartbeat_at FROM gateway_nodes WHERE instance_id = $1")
                .bind(instance_id)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| r.try_get(0))
                .transpose()?;
        let holds: bool = sqlx::query("SELECT 1 FROM credit_leases WHERE node_id = $1")
            .bind(instance_id)
            .fetch_optional(&self.pool)
            .await?
            .is_some();
        match heartbeat {
            None if !holds => return Ok(Released::Unknown),
            Some(at) if !force && now_ms - at < alive_within_ms => {
                return Ok(Released::Alive {
                    age_ms: now_ms - at,
                });
            }
            _ => {}
        }
        self.forget_instance(instance_id).await?;
        let (leases, total) = self.return_node_leases(instance_id).await?;
        Ok(Released::Returned { leases, total })
    }
}
