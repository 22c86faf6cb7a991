//! Step 4b: a key's own spend cap (set by its owner on the dashboard), checked with the hold,
//! exact across nodes.
//!
//! A cap is money too, so it is held the way balances are: each node leases room under a capped
//! key's cap from the store (`store::caps`: the cap less the key's billed usage less every node's
//! lease, taken in one short transaction), holds each request's worst case against that room in
//! memory, and gives back on settlement what the request did not cost. The lease shrinks in the
//! transaction that writes the usage. A node short of room asks the other nodes to give back what
//! they hold unpromised (a recall) before it refuses with 402 `spend_cap_reached`; idle room goes
//! back after a while, and all of it at shutdown.

use super::error::ApiError;
use super::room::{Room, Source};
use crate::money::NanoUsd;
use crate::store::Store;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct SpendBook {
    keys: Mutex<HashMap<i64, Arc<Room>>>,
}

/// A capped key's share of one request; settle it with what was billed.
#[must_use = "a cap hold must be settled, or dropped to release it"]
pub struct CapHold {
    room: Arc<Room>,
    worst: i64,
    settled: bool,
}

impl CapHold {
    /// Keeps what the request cost (it leaves the lease when its usage is written) and gives
    /// the rest of the worst case back.
    pub fn settle(mut self, billed: NanoUsd) {
        let billed = billed.nanos().max(0);
        if billed <= self.worst {
            self.room.give_back(self.worst - billed);
        } else {
            // Above its hold: what the lease has to spare pays for it.
            self.room.spare(billed - self.worst);
        }
        self.room.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.settled = true;
    }
}

impl Drop for CapHold {
    fn drop(&mut self) {
        if !self.settled {
            self.room.give_back(self.worst);
            self.room.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl SpendBook {
    fn entry(&self, key_id: i64) -> Arc<Room> {
        let mut map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key_id).or_default().clone()
    }

    /// Reserves `worst` under the key's cap, leasing room from the store when this node has
    /// too little, or says the cap is reached.
    pub async fn hold(
        &self,
        key_id: i64,
        cap: NanoUsd,
        worst: NanoUsd,
        store: Option<&Store>,
        node_id: &str,
    ) -> Result<CapHold, ApiError> {
        let room = self.entry(key_id);
        room.last_used_ms
            .store(crate::time::now_ms(), Ordering::Relaxed);
        if room.try_take(worst.nanos()).is_err() {
            let store = store.ok_or(ApiError::StoreUnavailable)?;
            let source = Source::Cap {
                store,
                key_id,
                cap,
                node_id,
            };
            // Boxed, in a statement of its own: the rare slow path keeps its state out of
            // `chat::start`'s, which every request allocates.
            let leasing = Box::pin(room.lease_more(worst, source, true));
            leasing.await?;
        }
        room.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(CapHold {
            room,
            worst: worst.nanos(),
            settled: false,
        })
    }

    /// Takes the unpromised room of keys idle since `idle_before_ms` (with nothing in flight),
    /// for returning to the store; idle keys are forgotten.
    pub fn take_idle(&self, idle_before_ms: i64) -> Vec<(i64, NanoUsd)> {
        let mut map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        map.retain(|id, r| {
            let idle = r.last_used_ms.load(Ordering::Relaxed) < idle_before_ms
                && r.in_flight.load(Ordering::Relaxed) == 0;
            if idle {
                let taken = r.take_unpromised();
                if taken.is_positive() {
                    out.push((*id, taken));
                }
            }
            !idle
        });
        out
    }

    /// The key's room on this node, if it has one.
    pub fn room(&self, key_id: i64) -> Option<Arc<Room>> {
        let map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&key_id).cloned()
    }

    /// A recall reached this node: takes the key's unpromised room, to be returned.
    pub fn take_unpromised(&self, key_id: i64) -> NanoUsd {
        let map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&key_id)
            .map_or(NanoUsd::ZERO, |r| r.take_unpromised())
    }

    /// Gives room back to a key's `local` (a return that failed is not lost).
    pub fn restore(&self, key_id: i64, amount: NanoUsd) {
        self.entry(key_id).give_back(amount.nanos());
    }

    /// This instance was swept: its cap leases are gone, so is the room it kept.
    pub fn forget_all(&self) {
        let map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        for r in map.values() {
            r.take_unpromised();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room_of(book: &SpendBook, key: i64) -> i64 {
        let r = book.entry(key);
        let n = r.take_unpromised();
        r.give_back(n.nanos());
        n.nanos()
    }

    #[test]
    fn a_settled_hold_keeps_what_it_cost_and_gives_back_the_rest() {
        let book = SpendBook::default();
        book.restore(1, NanoUsd::from_nanos(100));
        let room = book.entry(1);
        room.try_take(60).expect("room");
        room.in_flight.fetch_add(1, Ordering::Relaxed);
        let hold = CapHold {
            room: room.clone(),
            worst: 60,
            settled: false,
        };
        hold.settle(NanoUsd::from_nanos(25));
        assert_eq!(room_of(&book, 1), 75);
        // Dropped unsettled, a hold gives back everything.
        room.try_take(50).expect("room");
        room.in_flight.fetch_add(1, Ordering::Relaxed);
        drop(CapHold {
            room: room.clone(),
            worst: 50,
            settled: false,
        });
        assert_eq!(room_of(&book, 1), 75);
        assert_eq!(room.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn idle_keys_give_their_room_back_and_are_forgotten_busy_ones_are_not() {
        let book = SpendBook::default();
        book.restore(1, NanoUsd::from_nanos(10));
        book.restore(2, NanoUsd::from_nanos(20));
        book.entry(2).in_flight.fetch_add(1, Ordering::Relaxed);
        let idle = book.take_idle(i64::MAX);
        assert_eq!(idle, vec![(1, NanoUsd::from_nanos(10))]);
        assert_eq!(book.keys.lock().expect("lock").len(), 1);
        assert_eq!(book.take_unpromised(2), NanoUsd::from_nanos(20));
    }
}
