//! The in-process limiter (no Redis, or Redis down with `on_outage = "local"`): per node, with
//! `pingora-limits`. Requests and tokens per minute are a sliding-window estimate (this minute's
//! count plus the last minute's, weighted by how much of it still overlaps the window), which
//! is what `pingora_limits::rate::Rate` keeps cheaply for any number of keys; requests in flight
//! are `pingora_limits::inflight::Inflight` counters that a guard gives back when dropped.

use super::{Effective, RateHeaders, Refusal, Which};
use crate::gateway::auth::Caller;
use pingora_limits::inflight::{Guard, Inflight};
use pingora_limits::rate::Rate;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WINDOW: Duration = Duration::from_secs(60);
/// Count-min sketch width: collisions only ever over-count, and rarely at this width.
const SLOTS: usize = 16_384;
const HASHES: usize = 4;

pub struct LocalLimiter {
    requests: Rate,
    tokens: Rate,
    in_flight: Inflight,
    /// Check-then-take as one step.
    gate: Mutex<()>,
}

/// What one admitted request took here.
pub struct Taken {
    limiter: Arc<LocalLimiter>,
    key: (u8, i64),
    account: (u8, i64),
    tokens: u64,
    _in_flight: (Guard, Guard),
}

impl Taken {
    pub fn finish(self, tokens_used: u64) {
        let delta = tokens_used as isize - self.tokens as isize;
        if delta != 0 {
            self.limiter.tokens.observe(&self.key, delta);
            self.limiter.tokens.observe(&self.account, delta);
        }
        // The in-flight guards drop with `self`.
    }
}

/// The sliding-window estimate for `key`, and what it is made of: the last window's count,
/// this one's, and how far into this window we are.
fn estimate(rate: &Rate, key: &(u8, i64)) -> (f64, [f64; 3]) {
    rate.rate_with(key, |c| {
        let f = c.current_interval_fraction;
        let (p, n) = (c.prev_samples as f64, c.curr_samples as f64);
        (p * (1.0 - f) + n, [p, n, f])
    })
}

impl LocalLimiter {
    pub fn new() -> LocalLimiter {
        LocalLimiter {
            requests: Rate::new_with_estimator_config(WINDOW, HASHES, SLOTS),
            tokens: Rate::new_with_estimator_config(WINDOW, HASHES, SLOTS),
            in_flight: Inflight::new(),
            gate: Mutex::new(()),
        }
    }

    pub fn admit(
        self: &Arc<Self>,
        caller: &Caller,
        limits: &Effective,
        tokens: u64,
    ) -> Result<(RateHeaders, Taken), Refusal> {
        let key = (b'k', caller.key_id);
        let account = (b'a', caller.account_id);
        let _one_at_a_time = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        let (rk, rk_parts) = estimate(&self.requests, &key);
        let (ra, ra_parts) = estimate(&self.requests, &account);
        let (tk, tk_parts) = estimate(&self.tokens, &key);
        let (ta, ta_parts) = estimate(&self.tokens, &account);
        let f = rk_parts[2];
        let window_left_ms = ((1.0 - f) * WINDOW.as_millis() as f64).ceil() as u64;
        let t = tokens as f64;
        let checks = [
            (Which::KeyRequests, rk + 1.0, rk_parts, 1.0),
            (Which::AccountRequests, ra + 1.0, ra_parts, 1.0),
            (Which::KeyTokens, tk + t, tk_parts, t),
            (Which::AccountTokens, ta + t, ta_parts, t),
        ];
        let remaining = |used: f64, limit: u64| (limit as f64 - used).max(0.0) as u64;
        let (req_limit, req_used) = tighter(
            limits.key.requests_per_minute,
            rk + 1.0,
            limits.account.requests_per_minute,
            ra + 1.0,
        );
        let (tok_limit, tok_used) = tighter(
            limits.key.tokens_per_minute,
            tk + t,
            limits.account.tokens_per_minute,
            ta + t,
        );
        let headers = RateHeaders {
            limit_requests: req_limit,
            remaining_requests: remaining(req_used, req_limit),
            reset_requests_ms: window_left_ms,
            limit_tokens: tok_limit,
            remaining_tokens: remaining(tok_used, tok_limit),
            reset_tokens_ms: window_left_ms,
        };
        for (which, used, [prev, curr, f], need) in checks {
            let limit = limits.limit_of(which);
            if used > limit as f64 {
                return Err(Refusal {
                    which,
                    limit,
                    retry_after_ms: super::sliding_wait_ms(
                        prev,
                        curr,
                        f,
                        need,
                        limit as f64,
                        WINDOW.as_millis() as f64,
                    ),
                    headers: RateHeaders {
                        remaining_requests: headers
                            .remaining_requests
                            .min(remaining(rk, req_limit)),
                        remaining_tokens: headers.remaining_tokens.min(remaining(tk, tok_limit)),
                        ..headers
                    },
                });
            }
        }
        let (gk, nk) = self.in_flight.incr(key, 1);
        let (ga, na) = self.in_flight.incr(account, 1);
        for (which, n) in [(Which::KeyInFlight, nk), (Which::AccountInFlight, na)] {
            let limit = limits.limit_of(which);
            if n as u64 > limit {
                // The guards drop here and give the counts back.
                return Err(Refusal {
                    which,
                    limit,
                    retry_after_ms: 1000,
                    headers,
                });
            }
        }
        self.requests.observe(&key, 1);
        self.requests.observe(&account, 1);
        if tokens > 0 {
            self.tokens.observe(&key, tokens as isize);
            self.tokens.observe(&account, tokens as isize);
        }
        Ok((
            headers,
            Taken {
                limiter: self.clone(),
                key,
                account,
                tokens,
                _in_flight: (gk, ga),
            },
        ))
    }
}

/// The limit (and its use) that leaves less room: what the headers report.
fn tighter(l1: u64, used1: f64, l2: u64, used2: f64) -> (u64, f64) {
    if (l1 as f64 - used1) <= (l2 as f64 - used2) {
        (l1, used1)
    } else {
        (l2, used2)
    }
}
