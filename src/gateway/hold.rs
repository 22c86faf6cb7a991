//! Step 4: hold credits for a request's worst case, from this node's credit lease.
//!
//! Each account has an in-memory `local` amount: credit this node has leased from the store and
//! not yet promised to a request. A hold takes from `local` under a short lock (no I/O); only when
//! `local` cannot cover it does the hold top the lease up from the store, once per account at a
//! time. A [`Hold`] must be consumed by [`Hold::settle`]; dropped unsettled (a request that failed
//! before any output) it gives its whole amount back. The store side (leases, batched settlement)
//! is in `store::leases`.

use super::error::ApiError;
use crate::money::NanoUsd;
use crate::store::Store;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// The smallest slice a node leases at once, so most requests never wait for the store.
const MIN_LEASE_NANOS: i64 = 1_000_000_000; // $1

#[derive(Default)]
pub struct AccountCredit {
    /// Leased credit not promised to any request (nano-USD).
    local: Mutex<i64>,
    /// One lease top-up at a time per account.
    refill: tokio::sync::Mutex<()>,
    /// Holds not yet settled.
    in_flight: AtomicI64,
    last_used_ms: AtomicI64,
}

#[derive(Default)]
pub struct CreditBook {
    accounts: Mutex<HashMap<i64, Arc<AccountCredit>>>,
    holds_in_flight: AtomicI64,
}

/// Credit promised to one request. Settle it with what the request really cost; dropping it
/// unsettled returns everything.
#[must_use = "a hold must be settled, or dropped to release it"]
pub struct Hold {
    amount: NanoUsd,
    credit: Arc<AccountCredit>,
    book_in_flight: Arc<CreditBook>,
    settled: bool,
}

impl Hold {
    pub fn amount(&self) -> NanoUsd {
        self.amount
    }

    /// Keeps `cost` (never more than the hold) and gives the rest back; returns what is billed.
    pub fn settle(mut self, cost: NanoUsd) -> NanoUsd {
        let billed = cost.clamp(NanoUsd::ZERO, self.amount);
        self.give_back(self.amount.nanos() - billed.nanos());
        self.settled = true;
        billed
    }

    fn give_back(&self, nanos: i64) {
        if let Ok(mut local) = self.credit.local.lock() {
            *local += nanos;
        }
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
    fn account(&self, account_id: i64) -> Arc<AccountCredit> {
        let mut map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(account_id).or_default().clone()
    }

    /// Holds in flight on this node (a metric, and what shutdown waits for).
    pub fn holds_in_flight(&self) -> i64 {
        self.holds_in_flight.load(Ordering::Relaxed)
    }

    fn try_take(credit: &AccountCredit, amount: i64) -> Result<(), i64> {
        let mut local = credit.local.lock().unwrap_or_else(|p| p.into_inner());
        if *local >= amount {
            *local -= amount;
            Ok(())
        } else {
            Err(*local)
        }
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
        let credit = self.account(account_id);
        credit.last_used_ms.store(now_ms, Ordering::Relaxed);
        let want = amount.nanos();
        if Self::try_take(&credit, want).is_err() {
            let _one_refill = credit.refill.lock().await;
            if let Err(local) = Self::try_take(&credit, want) {
                let store = store.ok_or(ApiError::StoreUnavailable)?;
                let slice = (want - local).max(MIN_LEASE_NANOS);
                // Boxed, in a statement of its own: the rare slow path keeps its state out of
                // `chat::start`'s, which every request allocates.
                let leasing =
                    Box::pin(store.take_lease(account_id, node_id, NanoUsd::from_nanos(slice)));
                let granted = leasing.await.map_err(|e| {
                    tracing::error!(error = %e, account_id, "taking a credit lease failed");
                    ApiError::StoreUnavailable
                })?;
                let mut l = credit.local.lock().unwrap_or_else(|p| p.into_inner());
                *l += granted.nanos();
                if *l < want {
                    return Err(ApiError::InsufficientCredits {
                        needed: amount,
                        available: NanoUsd::from_nanos(*l),
                    });
                }
                *l -= want;
            }
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

    /// Takes the unpromised credit of accounts idle since `idle_before_ms`, for returning to the
    /// store. The caller returns each amount with `Store::return_lease`.
    pub fn take_idle(&self, idle_before_ms: i64) -> Vec<(i64, NanoUsd)> {
        let map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (id, c) in map.iter() {
            if c.last_used_ms.load(Ordering::Relaxed) < idle_before_ms
                && c.in_flight.load(Ordering::Relaxed) == 0
            {
                let mut local = c.local.lock().unwrap_or_else(|p| p.into_inner());
                if *local > 0 {
                    out.push((*id, NanoUsd::from_nanos(*local)));
                    *local = 0;
                }
            }
        }
        out
    }

    /// Gives credit back to `local` (a lease return that failed is not lost).
    pub fn restore(&self, account_id: i64, amount: NanoUsd) {
        let credit = self.account(account_id);
        let mut local = credit.local.lock().unwrap_or_else(|p| p.into_inner());
        *local += amount.nanos();
    }
}
