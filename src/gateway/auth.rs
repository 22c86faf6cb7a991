//! Step 1: parse and check the key, from an in-memory cache.
//!
//! The cache maps a key's SHA-256 to what the gateway needs (key status and expiry, limits,
//! allowed tiers, the account's status and verification). It is warmed at start and refreshed
//! every [`REFRESH_EVERY`] from the rows changed since the last pass, so a key revoked or an
//! account suspended anywhere stops working here within a second, without a database round trip
//! per request. A key never seen before costs one look-up, then lives in the cache.

use super::error::ApiError;
use crate::store::{AccountStatus, KeyAuth, KeyStatus, Store};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often the cache picks up changed keys and accounts.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);
/// Rows are re-read with this overlap, so a change committed with a slightly older timestamp
/// (another node's clock, a long transaction) is not missed.
const REFRESH_OVERLAP_MS: i64 = 5_000;
/// Unknown keys remembered (so a flood of bad keys does not reach the store) at most.
const MAX_NEGATIVE: usize = 10_000;

/// What a request may do, decided from a cached key.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: i64,
    pub account_id: i64,
    pub allowed_models: Option<Vec<String>>,
    /// The key's own spend cap, if its owner set one.
    pub spend_cap: Option<crate::money::NanoUsd>,
    /// The key's and its account's own rate limits (`None` fields: the conf's defaults).
    pub key_limits: crate::store::LimitOverrides,
    pub account_limits: crate::store::LimitOverrides,
    /// Operators' temporary lowerings of the key's and the account's limits.
    pub key_throttle: crate::store::Throttle,
    pub account_throttle: crate::store::Throttle,
}

#[derive(Default)]
pub struct KeyCache {
    known: RwLock<HashMap<String, Arc<KeyAuth>>>,
    unknown: RwLock<HashMap<String, ()>>,
    /// When a store look-up last failed with nothing succeeding since (0: the store answers).
    /// While it is down a key the cache has never seen is refused at once with 503, instead of
    /// waiting on the store's pool; the worker's refresh (every [`REFRESH_EVERY`]) clears it.
    store_down_since_ms: std::sync::atomic::AtomicI64,
}

/// The longest a key the cache has never seen waits for the store before its 503.
pub const MISS_LOOKUP_TIMEOUT: Duration = Duration::from_millis(750);

/// The key a request presents: `Authorization: Bearer …`, or `x-api-key` for clients that send it.
pub fn presented_key(req: &pingora::http::RequestHeader) -> Option<&str> {
    if let Some(v) = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .unwrap_or(v);
        return Some(token.trim());
    }
    req.headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// A short, safe rendering of a presented key for messages.
fn shown(key: &str) -> String {
    let head: String = key.chars().take(12).collect();
    format!("{head}***")
}

impl KeyCache {
    /// Replaces or adds entries (a refresh or a warm-up).
    pub fn upsert(&self, entries: Vec<KeyAuth>) {
        if entries.is_empty() {
            return;
        }
        if let Ok(mut unknown) = self.unknown.write() {
            for e in &entries {
                unknown.remove(&e.key_hash);
            }
        }
        if let Ok(mut known) = self.known.write() {
            for e in entries {
                known.insert(e.key_hash.clone(), Arc::new(e));
            }
        }
    }

    /// A store call failed (a look-up, a refresh): the store counts as down from now.
    pub fn store_failed(&self) {
        let now = crate::time::now_ms().max(1);
        let _ = self.store_down_since_ms.compare_exchange(
            0,
            now,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        );
    }

    /// A store call succeeded: it is up.
    pub fn store_answered(&self) {
        self.store_down_since_ms
            .store(0, std::sync::atomic::Ordering::Release);
    }

    /// Since when the store has been failing (`None`: it answers).
    pub fn store_down_since(&self) -> Option<i64> {
        match self
            .store_down_since_ms
            .load(std::sync::atomic::Ordering::Acquire)
        {
            0 => None,
            t => Some(t),
        }
    }

    pub fn len(&self) -> usize {
        self.known.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, hash: &str) -> Option<Arc<KeyAuth>> {
        self.known.read().ok().and_then(|m| m.get(hash).cloned())
    }

    fn is_known_unknown(&self, hash: &str) -> bool {
        self.unknown
            .read()
            .map(|m| m.contains_key(hash))
            .unwrap_or(false)
    }

    fn remember_unknown(&self, hash: String) {
        if let Ok(mut m) = self.unknown.write() {
            if m.len() >= MAX_NEGATIVE {
                m.clear();
            }
            m.insert(hash, ());
        }
    }

    /// Authenticates a presented key: from the cache, or with one store look-up on a miss.
    pub async fn authenticate(
        &self,
        presented: Option<&str>,
        store: Option<&Store>,
        now_ms: i64,
        support: &str,
    ) -> Result<Caller, ApiError> {
        let key = presented
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::MissingKey)?;
        let invalid = || ApiError::InvalidKey {
            reason: format!(
                "Incorrect API key provided: {}. Find your keys in the dashboard.",
                shown(key)
            ),
        };
        if !crate::keys::looks_like_key(key) {
            return Err(invalid());
        }
        let hash = crate::keys::hash(key);
        let entry = match self.get(&hash) {
            Some(e) => e,
            None => {
                if self.is_known_unknown(&hash) {
                    return Err(invalid());
                }
                let store = store.ok_or(ApiError::StoreUnavailable)?;
                // The store is known to be down: answer now, not after the pool's timeout.
                if self.store_down_since().is_some() {
                    return Err(ApiError::StoreUnavailable);
                }
                // Boxed, in a statement of its own: the rare slow path keeps its state out of
                // `chat::start`'s, which every request allocates.
                let looking_up = Box::pin(tokio::time::timeout(
                    MISS_LOOKUP_TIMEOUT,
                    store.key_auth_by_hash(&hash),
                ));
                match looking_up.await {
                    Ok(Ok(Some(found))) => {
                        self.store_answered();
                        self.upsert(vec![found]);
                        self.get(&hash).ok_or(ApiError::Internal)?
                    }
                    Ok(Ok(None)) => {
                        self.store_answered();
                        self.remember_unknown(hash);
                        return Err(invalid());
                    }
                    Ok(Err(e)) => {
                        self.store_failed();
                        tracing::error!(error = %e, "auth cache miss: store look-up failed");
                        return Err(ApiError::StoreUnavailable);
                    }
                    Err(_) => {
                        self.store_failed();
                        tracing::error!(
                            timeout_ms = MISS_LOOKUP_TIMEOUT.as_millis() as u64,
                            "auth cache miss: the store did not answer in time"
                        );
                        return Err(ApiError::StoreUnavailable);
                    }
                }
            }
        };
        check(&entry, now_ms, support, key)
    }
}

/// The decision for a known key, in the order a customer would want to be told.
fn check(e: &KeyAuth, now_ms: i64, support: &str, key: &str) -> Result<Caller, ApiError> {
    match e.key.status {
        KeyStatus::Revoked => {
            return Err(ApiError::InvalidKey {
                reason: format!("The API key {} has been revoked.", shown(key)),
            });
        }
        KeyStatus::Suspended => {
            return Err(ApiError::KeySuspended {
                support: support.to_owned(),
            });
        }
        KeyStatus::Active => {}
    }
    if e.key.expires_at.is_some_and(|t| t <= now_ms) {
        return Err(ApiError::InvalidKey {
            reason: format!("The API key {} has expired.", shown(key)),
        });
    }
    match e.account_status {
        AccountStatus::Active => {}
        AccountStatus::Suspended => {
            return Err(ApiError::AccountBlocked {
                status: "suspended",
                support: support.to_owned(),
            });
        }
        AccountStatus::Terminated => {
            return Err(ApiError::AccountBlocked {
                status: "terminated",
                support: support.to_owned(),
            });
        }
    }
    if !e.account_verified {
        return Err(ApiError::EmailNotVerified);
    }
    Ok(Caller {
        key_id: e.key.id,
        account_id: e.key.account_id,
        allowed_models: e.key.allowed_models.clone(),
        spend_cap: e.key.spend_cap,
        key_limits: e.key.limits,
        account_limits: e.account_limits,
        key_throttle: e.key.throttle,
        account_throttle: e.account_throttle,
    })
}

/// Keeps the cache fresh: warm at start, then the changed rows every [`REFRESH_EVERY`].
pub struct Refresher {
    since_ms: Option<i64>,
}

impl Refresher {
    pub fn new() -> Self {
        Refresher { since_ms: None }
    }

    /// One pass; returns how many entries changed.
    pub async fn pass(
        &mut self,
        cache: &KeyCache,
        store: &Store,
    ) -> Result<usize, crate::store::StoreError> {
        let started = crate::time::now_ms();
        let rows = store
            .key_auth_changed_since(self.since_ms.map(|s| s - REFRESH_OVERLAP_MS))
            .await?;
        let n = rows.len();
        cache.upsert(rows);
        self.since_ms = Some(started);
        Ok(n)
    }
}

impl Default for Refresher {
    fn default() -> Self {
        Self::new()
    }
}
