//! The admin's background usage maintenance: once an hour (and at start) it prepares the coming
//! months' partitions on PostgreSQL and applies `usage.retention_days` to the raw usage records
//! (see `store::retention`). Several admins may run it at once: each step is idempotent.

use std::time::Duration;

/// Rows per delete statement, and the pause between two, so a large backlog of old rows is
/// removed in many short transactions that the usage writer can slip between.
pub const BATCH_ROWS: i64 = 10_000;
pub const BATCH_PAUSE: Duration = Duration::from_millis(100);

pub async fn usage_retention_loop(live: super::server::Live, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The current conf's retention (a reload may have changed it).
        let state = live.state();
        match state
            .store
            .apply_usage_retention(
                crate::time::now_ms(),
                state.conf.usage.retention,
                BATCH_ROWS,
                BATCH_PAUSE,
            )
            .await
        {
            Ok(r) if r.rows_deleted > 0 || r.partitions_dropped > 0 => tracing::info!(
                rows_deleted = r.rows_deleted,
                batches = r.batches,
                partitions_dropped = r.partitions_dropped,
                "usage retention: old raw usage records removed (roll-ups kept)"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "usage retention failed; trying again within the hour")
            }
        }
    }
}
