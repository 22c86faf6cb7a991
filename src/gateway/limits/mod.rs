//! Step 2: rate limits — requests per minute, tokens per minute and requests in flight, for the
//! key and for its account — checked before any credit is held, so a refused request costs
//! nothing.
//!
//! With `[redis]` configured, every gateway node shares one set of counters in Redis: one Lua
//! script per request checks and takes all six limits atomically, on the server's clock
//! ([`redis`]). Without Redis (the embedded default), or while a configured Redis is down and
//! `redis.on_outage = "local"`, each node enforces the limits in process with `pingora-limits`
//! ([`local`]).
//!
//! Tokens are counted at admission from the request's input bound (its body length, the same
//! bound the credit hold uses) and corrected by the real usage when the request settles.

mod local;
pub mod redis;

use super::auth::Caller;
use crate::conf::{Conf, KeyLimits, OutagePolicy};
use std::sync::Arc;

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    KeyRequests,
    AccountRequests,
    KeyTokens,
    AccountTokens,
    KeyInFlight,
    AccountInFlight,
}

impl Which {
    pub fn describe(self) -> &'static str {
        match self {
            Which::KeyRequests => "requests per minute of this key",
            Which::AccountRequests => "requests per minute of this account (all its keys)",
            Which::KeyTokens => "tokens per minute of this key",
            Which::AccountTokens => "tokens per minute of this account (all its keys)",
            Which::KeyInFlight => "requests in flight of this key",
            Which::AccountInFlight => "requests in flight of this account (all its keys)",
        }
    }

    /// OpenAI's `type` for a 429: `requests` or `tokens`.
    pub fn kind(self) -> &'static str {
        match self {
            Which::KeyTokens | Which::AccountTokens => "tokens",
            _ => "requests",
        }
    }

    fn from_index(i: i64) -> Which {
        match i {
            1 => Which::KeyRequests,
            2 => Which::AccountRequests,
            3 => Which::KeyTokens,
            4 => Which::AccountTokens,
            5 => Which::KeyInFlight,
            _ => Which::AccountInFlight,
        }
    }
}

/// The limits that apply to one request: the key's and its account's, overrides over defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    pub key: Limits3,
    pub account: Limits3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits3 {
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
    pub in_flight: u64,
}

impl Limits3 {
    fn from(
        overrides: &crate::store::LimitOverrides,
        throttle: &crate::store::Throttle,
        defaults: &KeyLimits,
        now_ms: i64,
    ) -> Limits3 {
        let pick = |o: Option<i64>, d: u64| {
            o.and_then(|v| u64::try_from(v).ok())
                .filter(|v| *v > 0)
                .unwrap_or(d)
        };
        let mut l = Limits3 {
            requests_per_minute: pick(
                overrides.requests_per_minute,
                defaults.requests_per_minute.get().into(),
            ),
            tokens_per_minute: pick(
                overrides.tokens_per_minute,
                defaults.tokens_per_minute.get(),
            ),
            in_flight: pick(overrides.in_flight, defaults.in_flight.get().into()),
        };
        if throttle.active_at(now_ms) {
            l.requests_per_minute = pick(throttle.requests_per_minute, l.requests_per_minute)
                .min(l.requests_per_minute);
            l.tokens_per_minute =
                pick(throttle.tokens_per_minute, l.tokens_per_minute).min(l.tokens_per_minute);
        }
        l
    }
}

impl Effective {
    /// The key's and account's limits at `now_ms`: their own over the conf's defaults, lowered
    /// while an operator's throttle is in force.
    pub fn of(caller: &Caller, conf: &Conf, now_ms: i64) -> Effective {
        let l = &conf.limits;
        Effective {
            key: Limits3::from(
                &caller.key_limits,
                &caller.key_throttle,
                &l.default_key,
                now_ms,
            ),
            account: Limits3::from(
                &caller.account_limits,
                &caller.account_throttle,
                &l.default_account,
                now_ms,
            ),
        }
    }

    fn limit_of(&self, w: Which) -> u64 {
        match w {
            Which::KeyRequests => self.key.requests_per_minute,
            Which::AccountRequests => self.account.requests_per_minute,
            Which::KeyTokens => self.key.tokens_per_minute,
            Which::AccountTokens => self.account.tokens_per_minute,
            Which::KeyInFlight => self.key.in_flight,
            Which::AccountInFlight => self.account.in_flight,
        }
    }
}

/// What the client is told on every answer (OpenAI's `x-ratelimit-*` headers): for requests and
/// for tokens, the tighter of the key's and the account's per-minute limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateHeaders {
    pub limit_requests: u64,
    pub remaining_requests: u64,
    pub reset_requests_ms: u64,
    pub limit_tokens: u64,
    pub remaining_tokens: u64,
    pub reset_tokens_ms: u64,
}

/// OpenAI's duration format for the reset headers: `1s`, `6m0s`, `20ms`.
pub fn reset_text(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms.div_ceil(1000);
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{}s", s / 60, s % 60)
    }
}

/// Milliseconds until a sliding-window estimate, `prev × (1 − f) + curr` at fraction `f` of the
/// current window, leaves room for `need` more under `limit`, if nothing else is taken
/// meanwhile: later in this window, as the last window's count fades out, or in the next one,
/// where this window's count fades out in turn. One millisecond more than the exact figure, so
/// a client that waits what it is told is admitted. What the in-process limiter and the Redis
/// script (the same formula in Lua) give as `Retry-After`.
pub fn sliding_wait_ms(prev: f64, curr: f64, f: f64, need: f64, limit: f64, period_ms: f64) -> u64 {
    let room = limit - need;
    let windows = if room < 0.0 {
        // Larger than the limit itself: it never fits; the most a window can ask.
        2.0
    } else if curr <= room {
        if prev <= 0.0 {
            0.0
        } else {
            (1.0 - (room - curr) / prev - f).max(0.0)
        }
    } else {
        (1.0 - f) + (1.0 - room / curr)
    };
    (windows * period_ms).ceil() as u64 + 1
}

/// A request over a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub which: Which,
    pub limit: u64,
    pub retry_after_ms: u64,
    pub headers: RateHeaders,
}

/// A request let through: its share of the counters, given back (in-flight) and corrected
/// (tokens) by [`Admission::finish`]; dropped unfinished, it counts no tokens.
pub struct Admission {
    pub headers: RateHeaders,
    inner: Option<Taken>,
}

enum Taken {
    Redis(redis::Taken),
    Local(local::Taken),
}

impl Admission {
    /// Corrects the tokens to what the request really used and ends its in-flight count.
    pub fn finish(mut self, tokens_used: u64) {
        self.finish_inner(tokens_used);
    }

    fn finish_inner(&mut self, tokens_used: u64) {
        match self.inner.take() {
            Some(Taken::Redis(t)) => t.finish(tokens_used),
            Some(Taken::Local(t)) => t.finish(tokens_used),
            None => {}
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.finish_inner(0);
    }
}

/// Why a request got no admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Over(Refusal),
    /// Redis is down and `redis.on_outage = "refuse"`.
    Unavailable,
}

pub struct Limiter {
    redis: Option<Arc<redis::RedisLimiter>>,
    local: Arc<local::LocalLimiter>,
    on_outage: OutagePolicy,
}

impl Limiter {
    pub fn new(conf: &Conf) -> Limiter {
        Limiter {
            redis: conf
                .redis
                .as_ref()
                .map(|r| Arc::new(redis::RedisLimiter::new(r))),
            local: Arc::new(local::LocalLimiter::new()),
            on_outage: conf
                .redis
                .as_ref()
                .map_or(OutagePolicy::Local, |r| r.on_outage),
        }
    }

    pub fn redis(&self) -> Option<&Arc<redis::RedisLimiter>> {
        self.redis.as_ref()
    }

    /// Checks and takes one request with `tokens` (its input bound) for `caller`.
    pub async fn admit(
        &self,
        caller: &Caller,
        limits: &Effective,
        tokens: u64,
        request_id: &str,
    ) -> Result<Admission, Denied> {
        if let Some(r) = &self.redis {
            match r.admit(caller, limits, tokens, request_id).await {
                Ok(Ok((headers, taken))) => {
                    return Ok(Admission {
                        headers,
                        inner: Some(Taken::Redis(taken)),
                    });
                }
                Ok(Err(refusal)) => return Err(Denied::Over(refusal)),
                Err(()) if self.on_outage == OutagePolicy::Refuse => {
                    return Err(Denied::Unavailable);
                }
                Err(()) => {}
            }
        }
        match self.local.admit(caller, limits, tokens) {
            Ok((headers, taken)) => Ok(Admission {
                headers,
                inner: Some(Taken::Local(taken)),
            }),
            Err(refusal) => Err(Denied::Over(refusal)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{reset_text, sliding_wait_ms};

    #[test]
    fn the_wait_is_exactly_until_the_estimate_leaves_room() {
        let period = 60_000.0;
        let estimate = |prev: f64, curr: f64, f: f64, later_ms: f64| {
            let t = f + later_ms / period;
            if t < 1.0 {
                prev * (1.0 - t) + curr
            } else {
                curr * (1.0 - (t - 1.0)).max(0.0)
            }
        };
        for (prev, curr, f, need, limit) in [
            (6.0, 0.0, 0.5, 1.0, 3.0),
            (0.0, 3.0, 0.5, 1.0, 3.0),
            (2.0, 2.0, 0.25, 1.0, 3.0),
            (10.0, 9.0, 0.9, 1.0, 10.0),
            (1000.0, 400.0, 0.1, 300.0, 1000.0),
            (0.0, 900.0, 0.0, 200.0, 1000.0),
        ] {
            assert!(estimate(prev, curr, f, 0.0) + need > limit, "refused now");
            let wait = sliding_wait_ms(prev, curr, f, need, limit, period) as f64;
            assert!(
                estimate(prev, curr, f, wait) + need <= limit,
                "admitted after {wait} ms: {prev} {curr} {f}"
            );
            assert!(
                estimate(prev, curr, f, wait - 3.0) + need > limit,
                "not sooner than {wait} ms: {prev} {curr} {f}"
            );
        }
    }

    #[test]
    fn resets_read_like_openais() {
        assert_eq!(reset_text(20), "20ms");
        assert_eq!(reset_text(1000), "1s");
        assert_eq!(reset_text(1001), "2s");
        assert_eq!(reset_text(360_000), "6m0s");
        assert_eq!(reset_text(61_000), "1m1s");
    }
}
