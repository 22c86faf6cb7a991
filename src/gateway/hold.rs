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
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// The most headroom a node leases beyond a request's need, so most requests never wait for the
/// store (less when the balance is small: a quarter of what is left, see `take_lease_for`).
const MIN_LEASE_NANOS: i64 = 1_000_000_000; // $1
/// How long a hold the balance cannot cover waits for other nodes to give back what they hold
/// unpromised before it is refused.
const RECALL_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);
/// How often it looks again meanwhile.
const RECALL_POLL: std::time::Duration = std::time::Duration::from_millis(20);

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
    /// Set while this instance may have been swept (it could not renew its heartbeat for half
    /// the lease expiry): leased credit is not spent until a heartbeat goes through again.
    fenced: AtomicBool,
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
        let spared = {
            let mut local = self.credit.local.lock().unwrap_or_else(|p| p.into_inner());
            let spared = (*local).clamp(0, above);
            *local -= spared;
            spared
        };
        self.give_back(0);
        (
            NanoUsd::from_nanos(self.amount.nanos() + spared),
            NanoUsd::from_nanos(above - spared),
        )
    }

    fn give_back(&self, nanos: i64) {
        if nanos != 0
            && let Ok(mut local) = self.credit.local.lock()
        {
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
        if self.fenced.load(Ordering::Acquire) {
            return Err(ApiError::StoreUnavailable);
        }
        let credit = self.account(account_id);
        credit.last_used_ms.store(now_ms, Ordering::Relaxed);
        let want = amount.nanos();
        if Self::try_take(&credit, want).is_err() {
            let store = store.ok_or(ApiError::StoreUnavailable)?;
            // Boxed: the rare slow path keeps its state out of `chat::start`'s, which every
            // request allocates.
            let leasing = Box::pin(Self::lease_more(
                &credit, account_id, amount, store, node_id,
            ));
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

    /// The slow path of a hold: lease what is missing (with some headroom, see
    /// `Store::take_lease_for`); when the balance cannot cover it, recall what other nodes hold
    /// unpromised and try again until [`RECALL_WAIT`] has passed. Takes `amount` from `local` on
    /// success.
    async fn lease_more(
        credit: &AccountCredit,
        account_id: i64,
        amount: NanoUsd,
        store: &Store,
        node_id: &str,
    ) -> Result<(), ApiError> {
        let want = amount.nanos();
        let _one_refill = credit.refill.lock().await;
        let unavailable = |e: crate::store::StoreError| {
            tracing::error!(error = %e, account_id, "taking a credit lease failed");
            ApiError::StoreUnavailable
        };
        let mut recalled = false;
        let deadline = tokio::time::Instant::now() + RECALL_WAIT;
        loop {
            let local = match Self::try_take(credit, want) {
                Ok(()) => return Ok(()),
                Err(local) => local,
            };
            let granted = store
                .take_lease_for(
                    account_id,
                    node_id,
                    NanoUsd::from_nanos(want - local),
                    NanoUsd::from_nanos(MIN_LEASE_NANOS),
                )
                .await
                .map_err(unavailable)?;
            if granted.is_positive() {
                let mut l = credit.local.lock().unwrap_or_else(|p| p.into_inner());
                *l += granted.nanos();
                if *l >= want {
                    *l -= want;
                    return Ok(());
                }
            }
            // Short: other nodes may hold the account's credit unpromised. Ask them for it once,
            // then look again until they have answered or the wait is over.
            let asked = if recalled {
                1
            } else {
                recalled = true;
                store
                    .recall_leases(account_id, node_id)
                    .await
                    .map_err(unavailable)?
            };
            if asked == 0 || tokio::time::Instant::now() >= deadline {
                let local = (*credit.local.lock().unwrap_or_else(|p| p.into_inner())).max(0);
                let balance = store.balance(account_id).await.unwrap_or(NanoUsd::ZERO);
                return Err(ApiError::InsufficientCredits {
                    needed: amount,
                    available: NanoUsd::from_nanos(local + balance.nanos().max(0)),
                });
            }
            tokio::time::sleep(RECALL_POLL).await;
        }
    }

    /// A recall reached this node: takes the account's unpromised credit, to be returned.
    pub fn take_unpromised(&self, account_id: i64) -> NanoUsd {
        let map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = map.get(&account_id) else {
            return NanoUsd::ZERO;
        };
        let mut local = c.local.lock().unwrap_or_else(|p| p.into_inner());
        let taken = (*local).max(0);
        *local -= taken;
        NanoUsd::from_nanos(taken)
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

    /// Stops (or resumes) spending leased credit: see `fenced`.
    pub fn fence(&self, on: bool) {
        self.fenced.store(on, Ordering::Release);
    }

    /// This instance was swept: its leases went back to the balances, so the unpromised credit it
    /// keeps in memory is no longer its own. (Holds in flight settle against the balance.)
    pub fn forget_all(&self) -> NanoUsd {
        let map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = 0i64;
        for c in map.values() {
            let mut local = c.local.lock().unwrap_or_else(|p| p.into_inner());
            total += (*local).max(0);
            *local = 0;
        }
        NanoUsd::from_nanos(total)
    }

    /// Every account's unpromised credit, taken (at shutdown, once nothing is in flight: what
    /// this instance returns).
    pub fn take_all(&self) -> Vec<(i64, NanoUsd)> {
        self.take_idle(i64::MAX)
    }

    /// Gives credit back to `local` (a lease return that failed is not lost).
    pub fn restore(&self, account_id: i64, amount: NanoUsd) {
        let credit = self.account(account_id);
        let mut local = credit.local.lock().unwrap_or_else(|p| p.into_inner());
        *local += amount.nanos();
    }
}
