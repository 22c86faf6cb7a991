//! The request context: what each step of a request writes for the later ones and for its
//! metrics and usage record.

use super::dialect::Dialect;
use std::time::Instant;

/// An upstream's own retry advice, passed on with its 429.
#[derive(Debug, Clone, Default)]
pub struct RetryAfter {
    pub seconds: Option<String>,
    pub ms: Option<String>,
}

/// Per-request state: written by the phase named in each comment, read when the request is logged.
#[derive(Debug)]
pub struct RequestCtx {
    /// Set at creation; returned to the client as `x-request-id` and kept in the usage record.
    pub request_id: String,
    pub started: Instant,
    pub started_ms: i64,
    /// The status sent to the client (request_filter).
    pub status: u16,
    /// The tier named by the request, as its index in the conf (chat, step 3).
    pub tier: Option<usize>,
    pub stream: bool,
    /// When the first byte of the answer went to the client (relay, step 6).
    pub first_byte: Option<Instant>,
    /// The `x-ratelimit-*` figures for this answer (chat, step 2).
    pub rate_headers: Option<super::limits::RateHeaders>,
    /// The API shape the client speaks (set by the route).
    pub dialect: Dialect,
    /// What few requests need, boxed: the context lives (inside Pingora's request task) as
    /// long as a stream, and every byte of it is a byte of every open stream.
    rare: Option<Box<Rare>>,
}

/// The parts of a request's context most requests never set.
#[derive(Debug, Default)]
struct Rare {
    /// Milliseconds until a request refused by our rate limits would be admitted.
    retry_after_ms: Option<u64>,
    /// An upstream's 429 advice, passed on (relay).
    upstream_retry: Option<RetryAfter>,
    /// The request's `Origin`, when `[gateway.cors]` allows it (request_filter).
    cors_origin: Option<String>,
}

impl RequestCtx {
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    pub fn retry_after_ms(&self) -> Option<u64> {
        self.rare.as_ref()?.retry_after_ms
    }

    pub fn set_retry_after_ms(&mut self, ms: u64) {
        self.rare().retry_after_ms = Some(ms);
    }

    pub fn upstream_retry(&self) -> Option<&RetryAfter> {
        self.rare.as_ref()?.upstream_retry.as_ref()
    }

    pub fn set_upstream_retry(&mut self, r: RetryAfter) {
        self.rare().upstream_retry = Some(r);
    }

    pub fn cors_origin(&self) -> Option<&str> {
        self.rare.as_ref()?.cors_origin.as_deref()
    }

    pub fn set_cors_origin(&mut self, origin: &str) {
        self.rare().cors_origin = Some(origin.to_owned());
    }
}

/// A request id: `req_` and 24 hex digits, the first 12 the time in milliseconds, the rest
/// random. Ids in time order make the store's unique indexes on them (the usage record's
/// request id, the ledger's reference) grow at their end: a batch then dirties a few index pages
/// instead of one page per row, which made usage writing several times cheaper on SQLite.
pub fn request_id(now_ms: i64) -> String {
    let mut id = [0u8; 12];
    id[..6].copy_from_slice(&now_ms.to_be_bytes()[2..]);
    id[6..].copy_from_slice(&rand::random::<[u8; 6]>());
    format!("req_{}", hex::encode(id))
}

impl Default for RequestCtx {
    fn default() -> Self {
        let now_ms = crate::time::now_ms();
        RequestCtx {
            request_id: request_id(now_ms),
            started: Instant::now(),
            started_ms: now_ms,
            status: 0,
            tier: None,
            stream: false,
            first_byte: None,
            rate_headers: None,
            dialect: Dialect::Chat,
            rare: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::request_id;

    #[test]
    fn request_ids_sort_by_time_and_differ_within_a_millisecond() {
        let a = request_id(1_764_547_200_000);
        let b = request_id(1_764_547_200_000);
        let c = request_id(1_764_547_200_001);
        assert_eq!(a.len(), 28);
        assert!(a.starts_with("req_019ad"), "{a}");
        assert_ne!(a, b);
        assert!(a < c && b < c);
    }
}
