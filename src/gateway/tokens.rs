//! Token counts: what an upstream reports, and tiktoken's count of the text when it reports none.

use std::sync::OnceLock;

/// Token counts for one request. `input_tokens` counts every input token, cached and written to
/// a cache included; `reasoning_tokens` are part of `output_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Input read from the upstream's prompt cache (OpenAI's `cached_tokens`, Anthropic's
    /// `cache_read_input_tokens`, the Responses API's `input_tokens_details.cached_tokens`).
    pub cached_input_tokens: u64,
    /// Input written to the upstream's prompt cache (Anthropic's `cache_creation_input_tokens`).
    pub cache_write_tokens: u64,
    /// Output spent on reasoning (`reasoning_tokens`), where the upstream reports it.
    pub reasoning_tokens: u64,
}

impl Usage {
    /// What the customer pays for this usage, at the tier's prices (cached input at the tier's
    /// own cached-input price when it sets one, cache writes as fresh input).
    pub fn cost(
        &self,
        prices: &crate::money::TokenPrices,
        cache: &crate::money::CachePrices,
        rounding: crate::money::Rounding,
    ) -> Result<crate::money::NanoUsd, crate::money::MoneyError> {
        prices.cost_with_cache(
            cache,
            crate::money::TokenCounts {
                input: self.input_tokens,
                cached_input: self.cached_input_tokens,
                cache_write: self.cache_write_tokens,
                output: self.output_tokens,
            },
            rounding,
        )
    }
}

/// Counts tokens with the `o200k_base` encoding (loaded once, on first use or at start).
pub fn count_tokens(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    match tokenizer() {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        // Without a tokenizer, one token per byte is an upper bound for byte-level BPE.
        None => text.len() as u64,
    }
}

/// Loads the tokenizer; call it at start so the first request without usage does not wait.
pub fn tokenizer() -> Option<&'static tiktoken_rs::CoreBPE> {
    static BPE: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::o200k_base().ok()).as_ref()
}

/// A JSON key (with its quotes) searched for in raw event text, its searcher built once:
/// `memchr::memmem::find` builds one on every call, and on a stream's short events building it
/// cost more than searching (see BENCHMARKS.md, "The data plane at the limit").
pub type Key = std::sync::LazyLock<memchr::memmem::Finder<'static>>;

pub static CONTENT: Key = Key::new(|| memchr::memmem::Finder::new(b"\"content\""));
pub static TEXT: Key = Key::new(|| memchr::memmem::Finder::new(b"\"text\""));
pub static DELTA: Key = Key::new(|| memchr::memmem::Finder::new(b"\"delta\""));
pub static MODEL: Key = Key::new(|| memchr::memmem::Finder::new(b"\"model\""));

/// Appends the string value of each `key` in some JSON text to `out`, as a JSON literal (a
/// `null` or non-string value is skipped), joined by commas. Keys only: a quote inside a JSON
/// string is escaped, so `"key"` followed by a colon cannot come from inside a value.
pub fn push_literals(json: &[u8], key: &Key, out: &mut Vec<u8>) {
    let mut rest = json;
    let key: &memchr::memmem::Finder<'static> = key;
    while let Some(at) = key.find(rest) {
        rest = &rest[at + key.needle().len()..];
        let Some(value) = rest.trim_ascii_start().strip_prefix(b":") else {
            continue;
        };
        let Some(body) = value.trim_ascii_start().strip_prefix(b"\"") else {
            continue;
        };
        let Some(end) = string_end(body) else {
            return;
        };
        if !out.is_empty() {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(&body[..end]);
        out.push(b'"');
        rest = &body[end + 1..];
    }
}

/// Where a JSON string's body (after its opening quote) ends: the index of its closing quote.
pub fn string_end(body: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        match body.get(i) {
            Some(b'\\') => i += 2,
            Some(b'"') => return Some(i),
            Some(_) => i += 1,
            None => return None,
        }
    }
}

/// Counts the text of literals gathered by [`push_literals`].
pub fn count_literals(list: &[u8]) -> u64 {
    let mut joined = Vec::with_capacity(list.len() + 2);
    joined.push(b'[');
    joined.extend_from_slice(list);
    joined.push(b']');
    let text = serde_json::from_slice::<Vec<String>>(&joined)
        .map(|parts| parts.concat())
        .unwrap_or_else(|_| String::from_utf8_lossy(list).into_owned());
    count_tokens(&text)
}
