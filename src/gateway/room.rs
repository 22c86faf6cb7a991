//! Leased room held in memory: what a node's credit lease of an account (`hold`) and its lease
//! under a key's spend cap (`spend`) have in common.
//!
//! A [`Room`] is what this node has leased and not promised to a request (`local`). A request
//! takes its worst case from it under a short lock, with no I/O. Only when it falls short does
//! [`Room::lease_more`] go to the store, one top-up at a time per room: it leases what is missing
//! plus some headroom (a quarter of what is left in the store, at most [`HEADROOM_MAX`]), and if
//! the store has too little it asks the other nodes to give back what they hold unpromised (a
//! recall) and looks again until [`RECALL_WAIT`] has passed, before the request is refused.

use super::error::ApiError;
use crate::money::NanoUsd;
use crate::store::{Store, StoreError};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// The most headroom a node leases beyond a request's need, so most requests never wait for the
/// store.
pub const HEADROOM_MAX: NanoUsd = NanoUsd::from_nanos(1_000_000_000); // $1
/// How long a request the store cannot cover waits for other nodes to give back what they hold
/// unpromised before it is refused.
pub const RECALL_WAIT: Duration = Duration::from_millis(2000);
/// How often it looks again meanwhile.
const RECALL_POLL: Duration = Duration::from_millis(20);

#[derive(Default)]
pub struct Room {
    /// Leased, not promised to any request (nano-USD).
    local: Mutex<i64>,
    /// One top-up at a time.
    refill: tokio::sync::Mutex<()>,
    /// Requests holding from this room, not settled yet.
    pub in_flight: AtomicI64,
    pub last_used_ms: AtomicI64,
    /// When a request was last refused after waiting for a recall: those that follow within
    /// [`RECALL_WAIT`] are refused without waiting again (a burst past the money is answered at
    /// once, not one recall wait after another).
    refused_at_ms: AtomicI64,
    /// Set by a recall this node gave way to while it was short itself (see
    /// [`Room::gives_way_to`]): the waiting request is refused instead of taking the credit
    /// back.
    yielded: std::sync::atomic::AtomicBool,
}

/// Where a room's lease comes from: an account's balance or a key's spend cap.
pub enum Source<'a> {
    Credit {
        store: &'a Store,
        account_id: i64,
        node_id: &'a str,
    },
    Cap {
        store: &'a Store,
        key_id: i64,
        cap: NanoUsd,
        node_id: &'a str,
    },
}

impl Source<'_> {
    async fn take(&self, need: NanoUsd) -> Result<NanoUsd, StoreError> {
        match self {
            Source::Credit {
                store,
                account_id,
                node_id,
            } => {
                store
                    .take_lease_for(*account_id, node_id, need, HEADROOM_MAX)
                    .await
            }
            Source::Cap {
                store,
                key_id,
                node_id,
                ..
            } => {
                store
                    .take_cap_lease(*key_id, node_id, need, HEADROOM_MAX)
                    .await
            }
        }
    }

    async fn recall(&self) -> Result<u64, StoreError> {
        match self {
            Source::Credit {
                store,
                account_id,
                node_id,
            } => store.recall_leases(*account_id, node_id).await,
            Source::Cap {
                store,
                key_id,
                node_id,
                ..
            } => store.recall_cap_leases(*key_id, node_id).await,
        }
    }

    /// The refusal, with what the customer really has: the account's credit available now, or
    /// what the key has spent and holds in flight on every node.
    async fn refusal(&self, needed: NanoUsd, mine: i64) -> Result<ApiError, StoreError> {
        Ok(match self {
            Source::Credit {
                store, account_id, ..
            } => ApiError::InsufficientCredits {
                needed,
                available: NanoUsd::from_nanos(mine + store.balance(*account_id).await?.nanos()),
            },
            Source::Cap {
                store, key_id, cap, ..
            } => {
                let used = store.cap_use(*key_id).await?;
                ApiError::SpendCapReached {
                    cap: *cap,
                    spent: used.spent,
                    held: NanoUsd::from_nanos((used.held.nanos() - mine).max(0)),
                }
            }
        })
    }

    fn describe(&self) -> (&'static str, i64) {
        match self {
            Source::Credit { account_id, .. } => ("account", *account_id),
            Source::Cap { key_id, .. } => ("capped key", *key_id),
        }
    }
}

impl Room {
    /// Whether a request here is leasing more right now (short of credit itself).
    pub fn is_leasing(&self) -> bool {
        self.refill.try_lock().is_err()
    }

    /// A recall from `asker` reached this node: whether to answer it. A node that is not short
    /// itself always does. Of two nodes both short at once, each holding a fragment that alone
    /// cannot serve its request, the one whose instance id sorts later gives way (its waiting
    /// request is refused), so the fragments meet on one node instead of going back and forth.
    pub fn gives_way_to(&self, me: &str, asker: &str) -> bool {
        if !self.is_leasing() {
            return true;
        }
        if me > asker {
            self.yielded.store(true, Ordering::Release);
            return true;
        }
        false
    }

    fn local(&self) -> std::sync::MutexGuard<'_, i64> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `amount` from what is unpromised, or says how much there is.
    pub fn try_take(&self, amount: i64) -> Result<(), i64> {
        let mut local = self.local();
        if *local >= amount {
            *local -= amount;
            Ok(())
        } else {
            Err(*local)
        }
    }

    /// Gives `nanos` back to what is unpromised (a settlement's rest, a failed return).
    pub fn give_back(&self, nanos: i64) {
        if nanos != 0 {
            *self.local() += nanos;
        }
    }

    /// Takes up to `nanos` of what is unpromised (for a cost above its hold); returns what it took.
    pub fn spare(&self, nanos: i64) -> i64 {
        let mut local = self.local();
        let spared = (*local).clamp(0, nanos.max(0));
        *local -= spared;
        spared
    }

    /// Takes everything unpromised (a recall, an idle return).
    pub fn take_unpromised(&self) -> NanoUsd {
        let mut local = self.local();
        let taken = (*local).max(0);
        *local -= taken;
        NanoUsd::from_nanos(taken)
    }

    /// The slow path: leases what is missing for `amount` (see the module doc) and takes it, or
    /// refuses.
    /// `wait`: after asking for a recall, look again until [`RECALL_WAIT`] has passed (without it
    /// the request is refused at once and the recall stays asked, for the next requests: what a
    /// deterministic simulation, which answers recalls as steps of its own, needs).
    pub async fn lease_more(
        &self,
        amount: NanoUsd,
        source: Source<'_>,
        wait: bool,
    ) -> Result<(), ApiError> {
        let want = amount.nanos();
        let _one_refill = self.refill.lock().await;
        let unavailable = |e: StoreError| {
            let (what, id) = source.describe();
            tracing::error!(error = %e, what, id, "leasing from the store failed");
            ApiError::StoreUnavailable
        };
        let waited_lately = crate::time::now_ms() - self.refused_at_ms.load(Ordering::Relaxed)
            < RECALL_WAIT.as_millis() as i64;
        // Asked lately and refused: this one is refused without asking and waiting again.
        let mut recalled = wait && waited_lately;
        let deadline = tokio::time::Instant::now() + RECALL_WAIT;
        self.yielded.store(false, Ordering::Release);
        loop {
            let local = match self.try_take(want) {
                Ok(()) => return Ok(()),
                Err(local) => local,
            };
            let granted = source
                .take(NanoUsd::from_nanos(want - local))
                .await
                .map_err(unavailable)?;
            if granted.is_positive() {
                let mut l = self.local();
                *l += granted.nanos();
                if *l >= want {
                    *l -= want;
                    return Ok(());
                }
            }
            // Short: other nodes may hold some unpromised. Ask them once, then look again until
            // they have answered or the wait is over.
            let asked = if recalled && waited_lately {
                1
            } else if recalled {
                // Asked again while waiting: a node that answered (and took the credit back for
                // its own request since) is asked anew, until one of the two gives way.
                source.recall().await.map_err(unavailable)?.max(1)
            } else {
                recalled = true;
                source.recall().await.map_err(unavailable)?
            };
            let gave_way = self.yielded.swap(false, Ordering::AcqRel);
            if asked == 0
                || !wait
                || waited_lately
                || gave_way
                || tokio::time::Instant::now() >= deadline
            {
                if wait && !waited_lately {
                    self.refused_at_ms
                        .store(crate::time::now_ms(), Ordering::Relaxed);
                }
                let mine = (*self.local()).max(0);
                return Err(source.refusal(amount, mine).await.map_err(unavailable)?);
            }
            tokio::time::sleep(RECALL_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_what_is_unpromised_and_no_more() {
        let room = Room::default();
        room.give_back(100);
        assert_eq!(room.try_take(60), Ok(()));
        assert_eq!(room.try_take(60), Err(40));
        assert_eq!(room.spare(25), 25);
        assert_eq!(room.spare(25), 15);
        assert_eq!(room.take_unpromised(), NanoUsd::ZERO);
        room.give_back(7);
        assert_eq!(room.take_unpromised(), NanoUsd::from_nanos(7));
    }
}
