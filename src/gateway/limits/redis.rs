//! The shared limiter: counters in Redis, one Lua script per request, on the server's clock
//! (`TIME`, so the nodes' clocks do not matter).
//!
//! - Requests per minute: a sliding log, a sorted set of the request ids of the last 60 s. It
//!   is exact — never more than the limit in any 60 s, however the requests are spread over
//!   nodes — and its memory is bounded by the limit itself (at most `limits.key_max` entries per
//!   key). It also gives an exact `Retry-After`: when the oldest entry leaves the window.
//!   (GCRA would need one number instead of a set, but it lets a full limit through at once and
//!   then refills, so up to twice the limit can pass in the first minute.)
//! - Tokens per minute: a sliding-window counter, one hash per limit with this minute's and the
//!   last minute's count; the estimate is `last × (share of the window still in the last
//!   minute) + this`. Tokens are too many for a log; the estimate is the one the in-process
//!   fallback (`pingora-limits`) uses too.
//! - Requests in flight: a sorted set of request ids scored by when they expire, so a node that
//!   dies mid-request cannot leave its requests counted forever.
//!
//! Every key of a request carries the account's hash tag (`{a42}`), so the script touches one
//! slot and works on Redis Cluster. A value another program left in one of our keys (wrong type
//! or not a number) is dropped and overwritten, never an error.

use super::{Effective, RateHeaders, Refusal, Which};
use crate::conf::RedisConf;
use crate::gateway::auth::Caller;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long an in-flight entry counts at most (a stream longer than this stops counting).
const IN_FLIGHT_TTL_MS: u64 = 15 * 60 * 1000;

const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local period = 60000
local function zset(k, floor)
  local ok = pcall(redis.call, 'ZREMRANGEBYSCORE', k, '-inf', floor)
  if not ok then redis.call('DEL', k) end
  return redis.call('ZCARD', k)
end
local function oldest(k)
  local o = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  if o[2] then return tonumber(o[2]) end
  return now
end
local idx = math.floor(now / period)
local f = (now % period) / period
local function window(k)
  local ok, h = pcall(redis.call, 'HMGET', k, 'w', 'c', 'p')
  if not ok then redis.call('DEL', k) return 0, 0 end
  local w, c, p = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if w == idx then return p, c end
  if w == idx - 1 then return c, 0 end
  return 0, 0
end
local tokens = tonumber(ARGV[7])
local id = ARGV[8]
-- requests per minute (key, account): sliding log
local used = {}
for i = 1, 2 do
  local limit = tonumber(ARGV[i])
  local n = zset(KEYS[i], now - period)
  if n + 1 > limit then
    return {0, i, oldest(KEYS[i]) + period - now, limit, 0, oldest(KEYS[i]) + period - now}
  end
  used[i] = n + 1
end
-- tokens per minute (key, account): sliding-window counter
local prevs, curs = {}, {}
for i = 3, 4 do
  local limit = tonumber(ARGV[i])
  local p, c = window(KEYS[i])
  prevs[i], curs[i] = p, c
  if p * (1 - f) + c + tokens > limit then
    -- until the estimate leaves room (`sliding_wait_ms` in limits/mod.rs, the same formula)
    local room = limit - tokens
    local windows
    if room < 0 then windows = 2
    elseif c <= room then
      if p > 0 then windows = math.max(0, 1 - (room - c) / p - f) else windows = 0 end
    else windows = (1 - f) + (1 - room / c) end
    local wait = math.ceil(windows * period) + 1
    return {0, i, wait, limit, math.max(0, math.floor(limit - p * (1 - f) - c)), math.ceil((1 - f) * period)}
  end
end
-- requests in flight (key, account)
for i = 5, 6 do
  local n = zset(KEYS[i], now)
  if n + 1 > tonumber(ARGV[i]) then return {0, i, 1000, tonumber(ARGV[i]), 0, 1000} end
end
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], now, id)
  redis.call('PEXPIRE', KEYS[i], period + 1000)
end
if tokens > 0 then
  for i = 3, 4 do
    redis.call('HSET', KEYS[i], 'w', idx, 'c', curs[i] + tokens, 'p', prevs[i])
    redis.call('PEXPIRE', KEYS[i], 2 * period + 1000)
  end
end
local ttl = tonumber(ARGV[9])
for i = 5, 6 do
  redis.call('ZADD', KEYS[i], now + ttl, id)
  redis.call('PEXPIRE', KEYS[i], ttl)
end
-- the tighter of key and account, for the headers
local r = 1
if tonumber(ARGV[2]) - used[2] < tonumber(ARGV[1]) - used[1] then r = 2 end
local tk = 3
local left3 = tonumber(ARGV[3]) - (prevs[3] * (1 - f) + curs[3] + tokens)
local left4 = tonumber(ARGV[4]) - (prevs[4] * (1 - f) + curs[4] + tokens)
if left4 < left3 then tk = 4 end
local lefttk = math.max(0, math.floor(math.min(left3, left4)))
return {1, tonumber(ARGV[r]), tonumber(ARGV[r]) - used[r], oldest(KEYS[r]) + period - now,
        tonumber(ARGV[tk]), lefttk, math.ceil((1 - f) * period)}
"#;

const FINISH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local period = 60000
local idx = math.floor(now / period)
local delta = tonumber(ARGV[1])
if delta ~= 0 then
  for i = 1, 2 do
    local ok, h = pcall(redis.call, 'HMGET', KEYS[i], 'w', 'c', 'p')
    if ok then
      local w, c, p = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
      if w == idx - 1 then p, c = c, 0 end
      if w ~= idx and w ~= idx - 1 then p, c = 0, 0 end
      c = math.max(0, c + delta)
      redis.call('HSET', KEYS[i], 'w', idx, 'c', c, 'p', p)
      redis.call('PEXPIRE', KEYS[i], 2 * period + 1000)
    end
  end
end
pcall(redis.call, 'ZREM', KEYS[3], ARGV[2])
pcall(redis.call, 'ZREM', KEYS[4], ARGV[2])
return 1
"#;

pub struct RedisLimiter {
    url: String,
    prefix: String,
    timeout: Duration,
    conn: OnceLock<ConnectionManager>,
    up: AtomicBool,
    admit: Script,
    finish: Script,
}

/// What one admitted request took in Redis.
pub struct Taken {
    limiter: std::sync::Arc<RedisLimiter>,
    keys: [String; 4],
    request_id: String,
    tokens: u64,
}

impl Taken {
    /// Corrects the tokens and ends the in-flight entries, off the request's path.
    pub fn finish(self, tokens_used: u64) {
        let Some(conn) = self.limiter.conn.get().cloned() else {
            return;
        };
        let delta = tokens_used as i64 - self.tokens as i64;
        tokio::spawn(async move {
            let mut conn = conn;
            let mut call = self.limiter.finish.prepare_invoke();
            for k in &self.keys {
                call.key(k);
            }
            call.arg(delta).arg(&self.request_id);
            let done = call.invoke_async::<i64>(&mut conn);
            if let Ok(Err(e)) = tokio::time::timeout(self.limiter.timeout * 10, done).await {
                tracing::debug!(error = %e, "releasing a rate-limit entry failed; it expires by itself");
            }
        });
    }
}

impl RedisLimiter {
    pub fn new(conf: &RedisConf) -> RedisLimiter {
        RedisLimiter {
            url: conf.url.expose().clone(),
            prefix: conf.key_prefix.clone(),
            timeout: conf.timeout,
            conn: OnceLock::new(),
            up: AtomicBool::new(false),
            admit: Script::new(ADMIT),
            finish: Script::new(FINISH),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Connects (from the gateway's background worker, inside Pingora's runtime), retrying until
    /// Redis answers; the connection then reconnects by itself.
    pub async fn connect(&self) {
        if self.conn.get().is_some() {
            return;
        }
        let client = match redis::Client::open(self.url.as_str()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "the Redis URL is not usable; rate limits stay local");
                return;
            }
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let mut logged = false;
        loop {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                Ok(conn) => {
                    let _ = self.conn.set(conn);
                    self.mark(true);
                    return;
                }
                Err(e) => {
                    if !logged {
                        tracing::error!(error = %e, "Redis is not reachable; rate limits are enforced per node until it is");
                        logged = true;
                    }
                    crate::gateway::metrics::METRICS.redis_up.set(0);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Records Redis's state; logs only the changes (an outage once, the recovery once).
    fn mark(&self, up: bool) {
        let was = self.up.swap(up, Ordering::Relaxed);
        crate::gateway::metrics::METRICS.redis_up.set(i64::from(up));
        if was != up {
            if up {
                tracing::info!("Redis answers: rate limits are shared across nodes again");
            } else {
                tracing::error!(
                    "Redis does not answer: rate limits follow redis.on_outage until it does"
                );
            }
        }
        if !up {
            crate::gateway::metrics::METRICS.rate_limit_fallbacks.inc();
        }
    }

    fn key(&self, account_id: i64, what: &str) -> String {
        format!("{}:{{a{account_id}}}:{what}", self.prefix)
    }

    /// `Ok(Ok)`: admitted; `Ok(Err)`: over a limit; `Err(())`: Redis did not answer.
    pub async fn admit(
        self: &std::sync::Arc<Self>,
        caller: &Caller,
        limits: &Effective,
        tokens: u64,
        request_id: &str,
    ) -> Result<Result<(RateHeaders, Taken), Refusal>, ()> {
        let Some(conn) = self.conn.get() else {
            self.mark(false);
            return Err(());
        };
        let mut conn = conn.clone();
        let (a, k) = (caller.account_id, caller.key_id);
        let keys = [
            self.key(a, &format!("rpm:k{k}")),
            self.key(a, "rpm:a"),
            self.key(a, &format!("tpm:k{k}")),
            self.key(a, "tpm:a"),
            self.key(a, &format!("inf:k{k}")),
            self.key(a, "inf:a"),
        ];
        let mut call = self.admit.prepare_invoke();
        for key in &keys {
            call.key(key);
        }
        call.arg(limits.key.requests_per_minute)
            .arg(limits.account.requests_per_minute)
            .arg(limits.key.tokens_per_minute)
            .arg(limits.account.tokens_per_minute)
            .arg(limits.key.in_flight)
            .arg(limits.account.in_flight)
            .arg(tokens)
            .arg(request_id)
            .arg(IN_FLIGHT_TTL_MS);
        let answer =
            tokio::time::timeout(self.timeout, call.invoke_async::<Vec<i64>>(&mut conn)).await;
        let v = match answer {
            Ok(Ok(v)) if v.len() >= 6 => v,
            Ok(Ok(v)) => {
                tracing::error!(answer = ?v, "unexpected answer from the rate-limit script");
                self.mark(false);
                return Err(());
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "rate-limit check failed");
                self.mark(false);
                return Err(());
            }
            Err(_) => {
                self.mark(false);
                return Err(());
            }
        };
        self.mark(true);
        let n = |i: usize| u64::try_from(v[i]).unwrap_or(0);
        if v[0] == 0 {
            let which = Which::from_index(v[1]);
            let over_tokens = matches!(which, Which::KeyTokens | Which::AccountTokens);
            let headers = RateHeaders {
                limit_requests: if over_tokens {
                    limits.key.requests_per_minute
                } else {
                    n(3)
                },
                remaining_requests: if over_tokens { 0 } else { n(4) },
                reset_requests_ms: if over_tokens { 0 } else { n(5) },
                limit_tokens: if over_tokens {
                    n(3)
                } else {
                    limits.key.tokens_per_minute
                },
                remaining_tokens: if over_tokens { n(4) } else { 0 },
                reset_tokens_ms: if over_tokens { n(5) } else { 0 },
            };
            return Ok(Err(Refusal {
                which,
                limit: n(3),
                retry_after_ms: n(2).max(1),
                headers,
            }));
        }
        let headers = RateHeaders {
            limit_requests: n(1),
            remaining_requests: n(2),
            reset_requests_ms: n(3),
            limit_tokens: n(4),
            remaining_tokens: n(5),
            reset_tokens_ms: n(6),
        };
        let [rk, _, tk, ta, ik, ia] = keys;
        let _ = rk;
        Ok(Ok((
            headers,
            Taken {
                limiter: self.clone(),
                keys: [tk, ta, ik, ia],
                request_id: request_id.to_owned(),
                tokens,
            },
        )))
    }
}
