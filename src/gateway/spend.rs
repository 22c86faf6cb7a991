//! Step 4b: a key's own spend cap (set by its owner on the dashboard), checked with the hold.
//!
//! For each capped key this node keeps what the store says the key has spent (the sum of its
//! billed usage, re-read every [`REFRESH_SPENT_EVERY`] between batch writes, so the two never
//! race), plus what it settled and has not written yet, plus what its requests in flight may
//! still cost. A request is refused when that and its own worst case would pass the cap. On one
//! node the cap is exact; with several, each sees the others' spending within about a second.

use super::error::ApiError;
use crate::money::NanoUsd;
use crate::store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the spent amounts of capped keys are re-read from the store.
pub const REFRESH_SPENT_EVERY: Duration = Duration::from_secs(1);
/// A key unused this long (and with nothing held or unwritten) is forgotten; its next request
/// reads its spending from the store again.
const FORGET_AFTER_MS: i64 = 10 * 60 * 1000;

#[derive(Default)]
struct Spent {
    loaded: bool,
    /// In the store (as last read, plus what this node wrote since).
    stored: i64,
    /// Settled here, not written yet.
    unwritten: i64,
    /// Worst cases of requests in flight.
    holding: i64,
    last_used_ms: i64,
}

#[derive(Default)]
pub struct SpendBook {
    keys: Mutex<HashMap<i64, Arc<Mutex<Spent>>>>,
}

/// A capped key's share of one request; settle it with what was billed.
#[must_use = "a cap hold must be settled, or dropped to release it"]
pub struct CapHold {
    spent: Arc<Mutex<Spent>>,
    worst: i64,
    settled: bool,
}

impl CapHold {
    pub fn settle(mut self, billed: NanoUsd) {
        let mut s = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        s.holding -= self.worst;
        s.unwritten += billed.nanos();
        self.settled = true;
    }
}

impl Drop for CapHold {
    fn drop(&mut self) {
        if !self.settled {
            let mut s = self.spent.lock().unwrap_or_else(|p| p.into_inner());
            s.holding -= self.worst;
        }
    }
}

impl SpendBook {
    fn entry(&self, key_id: i64) -> Arc<Mutex<Spent>> {
        let mut map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key_id)
            .or_insert_with(|| {
                // Used from its creation on: a new entry waiting for its first read of the store
                // must not look idle to `followed`, or it would be forgotten while its request
                // goes on, and that request's spending with it.
                Arc::new(Mutex::new(Spent {
                    last_used_ms: crate::time::now_ms(),
                    ..Spent::default()
                }))
            })
            .clone()
    }

    /// Reserves `worst` of the key's cap, or says the cap is reached. The first request of a
    /// key on this node reads its spending from the store once.
    pub async fn hold(
        &self,
        key_id: i64,
        cap: NanoUsd,
        worst: NanoUsd,
        store: Option<&Store>,
    ) -> Result<CapHold, ApiError> {
        let spent = self.entry(key_id);
        let loaded = spent.lock().unwrap_or_else(|p| p.into_inner()).loaded;
        if !loaded {
            let store = store.ok_or(ApiError::StoreUnavailable)?;
            // Boxed, in a statement of its own: the rare slow path keeps its state out of
            // `chat::start`'s, which every request allocates.
            let keys = [key_id];
            let reading = Box::pin(store.key_spent(&keys));
            let from_store = reading.await.map_err(|e| {
                tracing::error!(error = %e, key_id, "reading a key's spending failed");
                ApiError::StoreUnavailable
            })?;
            let mut s = spent.lock().unwrap_or_else(|p| p.into_inner());
            if !s.loaded {
                s.stored = from_store.first().map_or(0, |(_, n)| n.nanos());
                s.loaded = true;
            }
        }
        let mut s = spent.lock().unwrap_or_else(|p| p.into_inner());
        s.last_used_ms = crate::time::now_ms();
        let used = s.stored + s.unwritten;
        if used + s.holding + worst.nanos() > cap.nanos() {
            return Err(ApiError::SpendCapReached {
                cap,
                spent: NanoUsd::from_nanos(used),
            });
        }
        s.holding += worst.nanos();
        drop(s);
        Ok(CapHold {
            spent,
            worst: worst.nanos(),
            settled: false,
        })
    }

    /// After a batch was written: what was unwritten is now stored.
    pub fn written(&self, billed: &[(i64, NanoUsd)]) {
        let map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        for (key_id, amount) in billed {
            if let Some(spent) = map.get(key_id) {
                let mut s = spent.lock().unwrap_or_else(|p| p.into_inner());
                s.unwritten -= amount.nanos();
                s.stored += amount.nanos();
            }
        }
    }

    /// Keys whose spending this node follows; keys idle for [`FORGET_AFTER_MS`] with nothing
    /// held or unwritten are forgotten first, so the book and the refresh stay as small as the
    /// set of keys in use.
    pub fn followed(&self, now_ms: i64) -> Vec<i64> {
        let mut map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, spent| {
            let s = spent.lock().unwrap_or_else(|p| p.into_inner());
            s.holding != 0 || s.unwritten != 0 || now_ms - s.last_used_ms < FORGET_AFTER_MS
        });
        map.keys().copied().collect()
    }

    /// The store's totals (every node's spending), read between batch writes.
    pub fn refreshed(&self, stored: &[(i64, NanoUsd)], followed: &[i64]) {
        let map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        for key_id in followed {
            if let Some(spent) = map.get(key_id) {
                let mut s = spent.lock().unwrap_or_else(|p| p.into_inner());
                if s.loaded {
                    s.stored = stored
                        .iter()
                        .find(|(k, _)| k == key_id)
                        .map_or(0, |(_, n)| n.nanos());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_just_met_is_not_forgotten_while_its_spending_is_read() {
        let book = SpendBook::default();
        let first = book.entry(7);
        assert_eq!(book.followed(crate::time::now_ms()), [7]);
        // Its request goes on with the same entry a second request finds.
        assert!(Arc::ptr_eq(&first, &book.entry(7)));
    }

    #[test]
    fn idle_keys_are_forgotten_unless_something_is_pending() {
        let book = SpendBook::default();
        let idle = book.entry(1);
        idle.lock().expect("lock").last_used_ms = 0;
        let pending = book.entry(2);
        {
            let mut p = pending.lock().expect("lock");
            p.last_used_ms = 0;
            p.unwritten = 5;
        }
        let recent = book.entry(3);
        recent.lock().expect("lock").last_used_ms = FORGET_AFTER_MS;
        let mut followed = book.followed(FORGET_AFTER_MS + 1);
        followed.sort_unstable();
        assert_eq!(followed, [2, 3]);
    }
}
