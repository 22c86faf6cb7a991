//! Step 5b: cool-downs. An upstream that fails `cooldown_after_failures` times in a row (a
//! connect error, a timeout, a 5xx, an unusable answer) is skipped for the provider's
//! `cooldown_ms`; a 429 with `Retry-After` is skipped for as long as it asks. When the time is
//! up the next request probes it: a success clears the state, a failure starts another
//! cool-down. An upstream in cool-down is still tried last, when every other one has failed, so
//! a tier never refuses a request only because all of its upstreams had a bad minute.

use crate::conf::{Conf, Provider, Upstream};
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

/// The longest a `Retry-After` is honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

#[derive(Default)]
pub struct Health {
    failures: AtomicU32,
    until_ms: AtomicI64,
}

impl Health {
    pub fn cooling(&self, now_ms: i64) -> bool {
        self.until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub fn until_ms(&self) -> i64 {
        self.until_ms.load(Ordering::Relaxed)
    }

    /// Counts a failure; starts a cool-down after enough in a row, or for `retry_after`.
    pub fn failed(&self, p: &Provider, u: &Upstream, now_ms: i64, retry_after: Option<Duration>) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let pause = match retry_after {
            Some(ra) => Some(ra.min(MAX_RETRY_AFTER)),
            None if n >= p.cooldown_after_failures => Some(p.cooldown),
            None => None,
        };
        if let Some(pause) = pause {
            let until = now_ms + pause.as_millis() as i64;
            if self.until_ms.swap(until, Ordering::Relaxed) <= now_ms {
                tracing::warn!(provider = %u.provider_name, model = %u.model, failures = n, pause_ms = pause.as_millis() as u64, "upstream cooling down");
            }
            super::metrics::METRICS
                .upstream_cooling
                .with_label_values(&[u.provider_name.as_str(), u.model.as_str()])
                .set(1);
        }
    }

    pub fn succeeded(&self, u: &Upstream) {
        if self.failures.swap(0, Ordering::Relaxed) > 0
            || self.until_ms.swap(0, Ordering::Relaxed) > 0
        {
            super::metrics::METRICS
                .upstream_cooling
                .with_label_values(&[u.provider_name.as_str(), u.model.as_str()])
                .set(0);
        }
    }
}

/// One [`Health`] per upstream of each tier, in conf order.
pub struct HealthBook {
    tiers: Vec<Vec<Health>>,
}

impl HealthBook {
    pub fn new(conf: &Conf) -> HealthBook {
        HealthBook {
            tiers: conf
                .tiers
                .iter()
                .map(|t| t.upstreams.iter().map(|_| Health::default()).collect())
                .collect(),
        }
    }

    /// Carries `before`'s state (made for `old`) over to the upstreams of `conf` that are the
    /// same tier, provider and model: a reload does not forget that an upstream is cooling down.
    pub fn take_over(&self, conf: &Conf, before: &HealthBook, old: &Conf) {
        for (t, tier) in conf.tiers.iter().enumerate() {
            let Some(ot) = old.tiers.iter().position(|o| o.name == tier.name) else {
                continue;
            };
            for (u, up) in tier.upstreams.iter().enumerate() {
                let same = old.tiers[ot]
                    .upstreams
                    .iter()
                    .position(|o| o.provider_name == up.provider_name && o.model == up.model);
                if let Some(ou) = same {
                    let (from, to) = (&before.tiers[ot][ou], &self.tiers[t][u]);
                    to.failures
                        .store(from.failures.load(Ordering::Relaxed), Ordering::Relaxed);
                    to.until_ms
                        .store(from.until_ms.load(Ordering::Relaxed), Ordering::Relaxed);
                }
            }
        }
    }

    pub fn tier(&self, tier: usize) -> &[Health] {
        &self.tiers[tier]
    }
}

/// `Retry-After` as seconds (the HTTP-date form is not used by AI providers).
pub fn retry_after(h: &pingora::http::ResponseHeader) -> Option<Duration> {
    h.headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}
