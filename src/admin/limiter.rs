//! Login attempt limits, per account and per client address, kept in the admin process.
//!
//! A fixed window per name: at most `max` failures (per account) or attempts (per address) in
//! `window`, each taken (checked and counted in one step) before the attempt is made. Memory is bounded: when the table is full, windows that have ended are dropped, and
//! if none have, the oldest window goes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAX_ENTRIES: usize = 100_000;

pub struct Limiter {
    max: u32,
    window: Duration,
    entries: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Limiter {
    pub fn new(max: u32, window: Duration) -> Limiter {
        Limiter {
            max,
            window,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Checks and counts one attempt for `name` in one step: `Err(seconds to wait)` when its
    /// window is used up, and then nothing is counted. Concurrent attempts each take their own
    /// place, so `max` of them pass in a window however they race.
    pub fn take(&self, name: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((start, n)) = entries.get(name)
            && *n >= self.max
            && now < *start + self.window
        {
            return Err((*start + self.window - now).as_secs().max(1));
        }
        self.count(&mut entries, name, now);
        Ok(())
    }

    fn count(&self, entries: &mut HashMap<String, (Instant, u32)>, name: &str, now: Instant) {
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(name) {
            let window = self.window;
            entries.retain(|_, (start, _)| now < *start + window);
            if entries.len() >= MAX_ENTRIES
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(k, _)| k.clone())
            {
                entries.remove(&oldest);
            }
        }
        let e = entries.entry(name.to_owned()).or_insert((now, 0));
        if now >= e.0 + self.window {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    pub fn clear(&self, name: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_within_a_window_and_clears() {
        let l = Limiter::new(2, Duration::from_secs(60));
        assert!(l.take("a").is_ok());
        assert!(l.take("a").is_ok());
        let wait = l.take("a").expect_err("third is refused");
        assert!((1..=60).contains(&wait));
        assert!(l.take("b").is_ok());
        l.clear("a");
        assert!(l.take("a").is_ok());
    }

    #[test]
    fn taking_counts_and_refuses_in_one_step_across_threads() {
        let l = std::sync::Arc::new(Limiter::new(5, Duration::from_secs(60)));
        let passed: usize = (0..12)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || l.take("a").is_ok())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| usize::from(t.join().expect("thread")))
            .sum();
        assert_eq!(passed, 5, "twelve racing attempts, five places");
    }

    #[test]
    fn a_window_that_ended_starts_again() {
        let l = Limiter::new(1, Duration::ZERO);
        assert!(l.take("a").is_ok());
        assert!(l.take("a").is_ok());
    }
}
