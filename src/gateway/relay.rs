//! Step 6: pass the answer through as it arrives and find out what it used.
//!
//! Streams are relayed event by event: read-sized chunks are split on blank lines with a
//! carry-over buffer, the original bytes pass through, and JSON is parsed only for events that
//! carry `usage`. The usage chunk we asked for is dropped when the client did not ask for it.
//! When an upstream reports no usage, the generated text is counted with tiktoken instead.

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use std::sync::OnceLock;

/// Token counts for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Reads OpenAI's `usage` object.
pub fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    Some(Usage {
        input_tokens: u.get("prompt_tokens")?.as_u64()?,
        output_tokens: u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

/// What had reached the client at one point of a stream (see [`SseRelay::delivered`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Delivered {
    uncounted: usize,
    events: u64,
    usage: Option<Usage>,
}

/// The splitter and bookkeeper for one event stream.
pub struct SseRelay {
    carry: BytesMut,
    client_wants_usage: bool,
    pub usage: Option<Usage>,
    /// The text of events seen before any usage, for counting if usage never comes: their
    /// `content` strings as JSON literals (escapes kept), joined by commas. Only the text is
    /// kept, not the events, or a long answer would hold its whole stream here until its end.
    uncounted: Vec<u8>,
    /// Content events relayed (a proxy for "output was delivered").
    pub events: u64,
}

fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| (i, 2));
    // Most upstreams end events with bare line feeds; look for CRLF only where there is a CR.
    let crlf = memchr::memchr(b'\r', buf)
        .and_then(|from| memchr::memmem::find(&buf[from..], b"\r\n\r\n").map(|i| (from + i, 4)));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

impl SseRelay {
    pub fn new(client_wants_usage: bool) -> Self {
        SseRelay {
            carry: BytesMut::new(),
            client_wants_usage,
            usage: None,
            uncounted: Vec::new(),
            events: 0,
        }
    }

    /// Takes one chunk from the upstream; returns the bytes to send on now (whole events only).
    pub fn feed(&mut self, chunk: &[u8]) -> Bytes {
        self.carry.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some((at, sep)) = find_event_end(&self.carry) {
            let event = self.carry.split_to(at + sep);
            if self.keep(&event) {
                // Events kept one after the other are adjacent in `carry`'s buffer: joining them
                // copies nothing.
                if out.is_empty() {
                    out = event;
                } else {
                    out.unsplit(event);
                }
            }
        }
        out.freeze()
    }

    /// What is left when the upstream ends (an unterminated last event), passed through as is.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.carry.split().freeze();
        if !rest.is_empty() && self.usage.is_none() {
            push_content_literals(&rest, &mut self.uncounted);
        }
        rest
    }

    /// Records what the event tells and decides whether the client gets it.
    fn keep(&mut self, event: &[u8]) -> bool {
        if contains(event, b"\"usage\"")
            && let Some(v) = event_json(event)
            && let Some(u) = usage_of(&v)
        {
            self.usage = Some(u);
            self.uncounted = Vec::new();
            let only_usage = v
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty);
            return !only_usage || self.client_wants_usage;
        }
        if !contains(event, b"[DONE]") {
            self.events += 1;
            if self.usage.is_none() {
                push_content_literals(event, &mut self.uncounted);
            }
        }
        true
    }

    /// Where the relay stands, taken after each successful write to the client.
    pub fn delivered(&self) -> Delivered {
        Delivered {
            uncounted: self.uncounted.len(),
            events: self.events,
            usage: self.usage,
        }
    }

    /// The client never got what was fed after `mark` (its write failed): forget it, so a
    /// disconnect is billed for exactly the events that reached the client.
    pub fn undeliver(&mut self, mark: Delivered) {
        self.uncounted.truncate(mark.uncounted);
        self.events = mark.events;
        self.usage = mark.usage;
    }

    /// Output tokens when the upstream reported none: the relayed text, counted with tiktoken.
    pub fn counted_output_tokens(&self) -> u64 {
        let mut list = Vec::with_capacity(self.uncounted.len() + 2);
        list.push(b'[');
        list.extend_from_slice(&self.uncounted);
        list.push(b']');
        let text = serde_json::from_slice::<Vec<String>>(&list)
            .map(|parts| parts.concat())
            .unwrap_or_else(|_| String::from_utf8_lossy(&self.uncounted).into_owned());
        count_tokens(&text)
    }
}

/// Appends the string value of each `"content"` key in an event to `out`, as a JSON literal
/// (a `null` or non-string content is skipped). Keys only: a quote inside a JSON string is
/// escaped, so `"content"` followed by a colon cannot come from inside a value.
fn push_content_literals(event: &[u8], out: &mut Vec<u8>) {
    let mut rest = event;
    while let Some(at) = memchr::memmem::find(rest, b"\"content\"") {
        rest = &rest[at + b"\"content\"".len()..];
        let Some(value) = rest.trim_ascii_start().strip_prefix(b":") else {
            continue;
        };
        let Some(body) = value.trim_ascii_start().strip_prefix(b"\"") else {
            continue;
        };
        let mut i = 0;
        let end = loop {
            match body.get(i) {
                Some(b'\\') => i += 2,
                Some(b'"') => break Some(i),
                Some(_) => i += 1,
                None => break None,
            }
        };
        let Some(end) = end else {
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

/// Appends the `content` of each choice's `field` (`message` in answers, `delta` in chunks).
fn push_choice_text(v: &Value, field: &str, text: &mut String) {
    let choices = v
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for c in choices {
        if let Some(t) = c
            .get(field)
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
        {
            text.push_str(t);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// The JSON of an event's `data:` line(s).
fn event_json(event: &[u8]) -> Option<Value> {
    let mut data = Vec::new();
    for line in event.split(|b| *b == b'\n') {
        if let Some(d) = line.strip_prefix(b"data:") {
            data.extend_from_slice(d.trim_ascii());
        }
    }
    serde_json::from_slice(&data).ok()
}

/// Output tokens of a whole JSON answer without `usage`.
pub fn counted_json_output_tokens(v: &Value) -> u64 {
    let mut text = String::new();
    push_choice_text(v, "message", &mut text);
    count_tokens(&text)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str) -> String {
        format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}]}}\n\n"
        )
    }
    #[test]
    fn a_write_that_failed_is_not_counted() {
        let mut sse = SseRelay::new(false);
        let _ = sse.feed(chunk("one").as_bytes());
        let _ = sse.feed(chunk(" two").as_bytes());
        let mark = sse.delivered();
        let _ = sse.feed(chunk(" three four five").as_bytes());
        let all = sse.counted_output_tokens();
        sse.undeliver(mark);
        assert_eq!(sse.events, 2);
        assert_eq!(sse.counted_output_tokens(), count_tokens("one two"));
        assert!(sse.counted_output_tokens() < all);
    }

    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n";

    #[test]
    fn splits_events_across_chunks_and_drops_the_usage_chunk_when_not_asked() {
        let stream = format!("{}{}{}data: [DONE]\n\n", chunk("Hel"), chunk("lo"), USAGE);
        for cut in 1..stream.len() {
            let mut r = SseRelay::new(false);
            let mut out = Vec::new();
            out.extend_from_slice(&r.feed(&stream.as_bytes()[..cut]));
            out.extend_from_slice(&r.feed(&stream.as_bytes()[cut..]));
            out.extend_from_slice(&r.finish());
            let expected = format!("{}{}data: [DONE]\n\n", chunk("Hel"), chunk("lo"));
            assert_eq!(
                String::from_utf8(out).expect("utf8"),
                expected,
                "cut at {cut}"
            );
            assert_eq!(
                r.usage,
                Some(Usage {
                    input_tokens: 7,
                    output_tokens: 3
                })
            );
        }
    }

    #[test]
    fn counts_only_the_content_strings_of_a_stream_without_usage() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"He said \\\"hi\\\"\\n\"}}]}\n\n",
            "data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"caf\\u00e9 \"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":\"{\\\"content\\\":\\\"no\\\"}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"done\"}}]}",
        );
        let mut r = SseRelay::new(false);
        let out = r.feed(stream.as_bytes());
        let rest = r.finish();
        assert_eq!([&out[..], &rest[..]].concat(), stream.as_bytes());
        assert_eq!(r.events, 4);
        assert_eq!(
            r.counted_output_tokens(),
            count_tokens("He said \"hi\"\ncafé done")
        );
        // What is kept is the text, not the events.
        assert!(
            r.uncounted.len() < 64,
            "{}",
            String::from_utf8_lossy(&r.uncounted)
        );
    }

    #[test]
    fn keeps_the_usage_chunk_when_asked_and_counts_text_without_usage() {
        let mut r = SseRelay::new(true);
        let out = r.feed(format!("{}{}", chunk("hi"), USAGE).as_bytes());
        assert!(String::from_utf8_lossy(&out).contains("usage"));
        let mut r = SseRelay::new(false);
        let _ = r.feed(format!("{}{}data: [DONE]\n\n", chunk("Hello"), chunk(" world")).as_bytes());
        assert_eq!(r.usage, None);
        assert_eq!(r.counted_output_tokens(), count_tokens("Hello world"));
        assert!(r.counted_output_tokens() >= 2);
    }
}
