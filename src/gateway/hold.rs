//! Step 4: hold credits for a request's worst case, from this node's credit lease.
//!
//! Each account has a [`Room`]: credit this node has leased from the store and not yet promised
//! to a request. A hold takes from it under a short lock (no I/O); only when it falls short does
//! the hold lease more from the store, with recalls from other nodes before a 402 (see `room`).
//! A [`Hold`] must be consumed by [`Hold::settle`]; dropped unsettled (a request that failed
//! before any output) it gives its whole amount back. The store side (leases, batched
//! settlement) is in `store::leases`.

use super::error::ApiError;
use super::room::{Room, Source};
use crate::money::NanoUsd;
use crate::store::Store;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct CreditBook {
    accounts: Mutex<HashMap<i64, Arc<Room>>>,
    holds_in_flight: AtomicI64,
    /// Set while this instance may have been swept (it could not renew its heartbeat for half
    /// the lease expiry): leased credit is not spent until a heartbeat goes through again.
    fenced: AtomicBool,
    /// Refuse at once after asking for a recall instead of waiting for it (the simulation).
    no_recall_wait: AtomicBool,
}

/// Credit promised to one request. Settle it with what the request really cost; dropping it
/// unsettled returns everything.
#[must_use = "a hold must be settled, or dropped to release it"]
pub struct Hold {
    amount: NanoUsd,
    credit: Arc<Room>,
    book_in_flight: Arc<CreditBook>,
    settled: bool,
}

impl Hold {
    pub fn amount(&self) -> NanoUsd {
        self.amount
    }

    /// Keeps `cost` and gives the rest back. Returns what the lease pays (the hold, and for a
    /// cost above it whatever leased credit this node has to spare) and what is left over for the
    /// balance (or, if that cannot pay either, a platform loss): see `Settlement::over_hold`.
    pub fn settle(mut self, cost: NanoUsd) -> (NanoUsd, NanoUsd) {
        let cost = cost.max(NanoUsd::ZERO);
        self.settled = true;
        if cost <= self.amount {
            self.give_back(self.amount.nanos() - cost.nanos());
            return (cost, NanoUsd::ZERO);
        }
        let above = cost.nanos() - self.amount.nanos();
        let spared = self.credit.spare(above);
        self.give_back(0);
        (
            NanoUsd::from_nanos(self.amount.nanos() + spared),
            NanoUsd::from_nanos(above - spared),
        )
    }

    fn give_back(&self, nanos: i64) {
        self.credit.give_back(nanos);
        self.credit.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.book_in_flight
            .holds_in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.settled {
            self.give_back(self.amount.nanos());
        }
    }
}

impl CreditBook {
    fn account(&self, account_id: i64) -> Arc<Room> {
        let mut map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(account_id).or_default().clone()
    }

    /// Holds in flight on this node (a metric, and what shutdown waits for).
    pub fn holds_in_flight(&self) -> i64 {
        self.holds_in_flight.load(Ordering::Relaxed)
    }

    /// Holds `amount` for a request of `account_id`, leasing more from the store if needed.
    pub async fn hold(
        self: &Arc<Self>,
        account_id: i64,
        amount: NanoUsd,
        store: Option<&Store>,
        node_id: &str,
        now_ms: i64,
    ) -> Result<Hold, ApiError> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(ApiError::StoreUnavailable);
        }
        let credit = self.account(account_id);
        credit.last_used_ms.store(now_ms, Ordering::Relaxed);
        let want = amount.nanos();
        if credit.try_take(want).is_err() {
            let store = store.ok_or(ApiError::StoreUnavailable)?;
            let source = Source::Credit {
                store,
                account_id,
                node_id,
            };
            // Boxed: the rare slow path keeps its state out of `chat::start`'s, which every
            // request allocates.
            let wait = !self.no_recall_wait.load(Ordering::Relaxed);
            let leasing = Box::pin(credit.lease_more(amount, source, wait));
            leasing.await?;
        }
        credit.in_flight.fetch_add(1, Ordering::Relaxed);
        self.holds_in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Hold {
            amount,
            credit,
            book_in_flight: self.clone(),
            settled: false,
        })
    }

    /// The account's room on this node, if it has one.
    pub fn room(&self, account_id: i64) -> Option<Arc<Room>> {
        let map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&account_id).cloned()
    }

    /// A recall reached this node: takes the account's unpromised credit, to be returned.
    pub fn take_unpromised(&self, account_id: i64) -> NanoUsd {
        let map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&account_id)
            .map_or(NanoUsd::ZERO, |c| c.take_unpromised())
    }

    /// Takes the unpromised credit of accounts idle since `idle_before_ms`, for returning to the
    /// store. The caller returns each amount with `Store::return_lease`.
    pub fn take_idle(&self, idle_before_ms: i64) -> Vec<(i64, NanoUsd)> {
        let map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (id, c) in map.iter() {
            if c.last_used_ms.load(Ordering::Relaxed) < idle_before_ms
                && c.in_flight.load(Ordering::Relaxed) == 0
            {
                let taken = c.take_unpromised();
                if taken.is_positive() {
                    out.push((*id, taken));
                }
            }
        }
        out
    }

    /// Holds that fall short ask for a recall and are refused at once, without waiting for the
    /// answer: for a simulation that answers recalls as steps of its own.
    pub fn without_recall_wait(self) -> Self {
        self.no_recall_wait.store(true, Ordering::Relaxed);
        self
    }

    /// Stops (or resumes) spending leased credit: see `fenced`.
    pub fn fence(&self, on: bool) {
        self.fenced.store(on, Ordering::Release);
    }

    /// This instance was swept: its leases went back to the balances, so the unpromised credit it
    /// keeps in memory is no longer its own. (Holds in flight settle against the balance.)
    pub fn forget_all(&self) -> NanoUsd {
        let map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let total: i64 = map.values().map(|c| c.take_unpromised().nanos()).sum();
        NanoUsd::from_nanos(total)
    }

    /// Every account's unpromised credit, taken (at shutdown, once nothing is in flight: what
    /// this instance returns).
    pub fn take_all(&self) -> Vec<(i64, NanoUsd)> {
        self.take_idle(i64::MAX)
    }

    /// Gives credit back to `local` (a lease return that failed is not lost).
    pub fn restore(&self, account_id: i64, amount: NanoUsd) {
        self.account(account_id).give_back(amount.nanos());
    }
}
