//! Wire formats ("dialects"): what a client speaks, what an upstream speaks, and the one seam
//! between them. A request is validated, held and billed in one shape whatever its dialect; what
//! goes to an upstream and what comes back to the client is converted here, once per (client,
//! upstream) pair:
//!
//! - the same dialect on both sides is the identity: bytes pass through event by event, and
//!   only usage and the end of the answer are read (OpenAI to OpenAI, Anthropic to Anthropic,
//!   Responses to Responses);
//! - any other pair goes through chat-completion chunks: the upstream's events are decoded
//!   into chunks ([`chat`], [`messages`]) and the chunks encoded as the client's events
//!   ([`chat`], [`messages`], [`responses`]).
//!
//! Every stream is split by the one framer in [`sse`]; translators take and return events,
//! never text that is split again. A stream's truth is decided here too: an answer is whole at
//! its dialect's terminal event (`[DONE]`, `message_stop`, `response.completed`), a stream
//! that ends before it or carries data that is not JSON is a [`Fault`], and a partial event is
//! never passed on.

pub mod chat;
pub mod messages;
pub mod responses;
pub mod scan;
pub mod sse;

use super::error::ApiError;
use super::tokens::{Usage, count_literals, push_literals};
use crate::conf::{Provider, ProviderKind};
use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// An API shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI's chat completions (`/v1/chat/completions`), also Gemini's OpenAI endpoint.
    #[default]
    Chat,
    /// Anthropic's Messages API (`/v1/messages`).
    Messages,
    /// OpenAI's Responses API (`/v1/responses`).
    Responses,
    /// OpenAI's embeddings (`/v1/embeddings`): JSON only, the same on both sides.
    Embeddings,
}

impl Dialect {
    /// What `p` is sent for a client speaking `client`: its native API, or chat completions.
    pub fn of_upstream(p: &Provider, client: Dialect) -> Dialect {
        match p.kind {
            // The conf gives embeddings tiers no Anthropic upstream.
            ProviderKind::Anthropic => Dialect::Messages,
            ProviderKind::OpenAi | ProviderKind::Gemini if client == Dialect::Embeddings => {
                Dialect::Embeddings
            }
            ProviderKind::OpenAi if p.responses_api && client == Dialect::Responses => {
                Dialect::Responses
            }
            ProviderKind::OpenAi | ProviderKind::Gemini => Dialect::Chat,
        }
    }

    /// The upstream path, after the provider's base URL.
    pub fn path(self) -> &'static str {
        match self {
            Dialect::Chat => "/chat/completions",
            Dialect::Messages => "/messages",
            Dialect::Responses => "/responses",
            Dialect::Embeddings => "/embeddings",
        }
    }

    /// An error answer's body in this dialect.
    pub fn error_body(self, e: &ApiError) -> Bytes {
        match self {
            Dialect::Chat | Dialect::Responses | Dialect::Embeddings => e.body(),
            Dialect::Messages => messages::error_body(e),
        }
    }

    /// Whether a whole 2xx JSON answer from an upstream of this dialect is an answer (not an
    /// error object or something else), for a client of `client`: checked before anything
    /// reaches the client. An answer that goes to the client as it came (chat completions and
    /// embeddings, the same on both sides) is read for its usage only, without building a tree
    /// of the whole body; one to translate is parsed whole.
    pub fn check_answer(self, client: Dialect, body: &[u8]) -> Result<Checked, String> {
        if self == client && matches!(self, Dialect::Chat | Dialect::Embeddings) {
            let found = match scan::scan(body, &mut |_, _, _| {}) {
                Ok(found) => found,
                Err(scan::Bad::Invalid) => return Err(NOT_JSON.into()),
                // Deeper than the scan goes: parsed whole.
                Err(scan::Bad::Deep) => return self.checked_answer(body).map(Checked::Whole),
            };
            // A part the scan found is JSON already: parsing it alone cannot fail.
            let part = |at: Option<scan::Span>| {
                at.and_then(|(start, end)| serde_json::from_slice::<Value>(&body[start..end]).ok())
            };
            if let Some(e) = part(found.error).filter(|e| !e.is_null()) {
                return Err(answered_error(&e));
            }
            let list = match self {
                Dialect::Chat => found.choices,
                _ => found.data,
            };
            if list.is_none_or(|(start, _)| body[start] != b'[') {
                return Err(format!("answered 200 without {}", self.what()));
            }
            return Ok(Checked::Usage(
                part(found.usage).as_ref().and_then(chat::usage_in),
            ));
        }
        self.checked_answer(body).map(Checked::Whole)
    }

    /// Whether a whole 2xx JSON answer from an upstream of this dialect is an answer, parsed.
    pub fn checked_answer(self, body: &[u8]) -> Result<Value, String> {
        match serde_json::from_slice(body) {
            Ok(v) => self.checked_answer_value(v),
            Err(_) => Err(NOT_JSON.into()),
        }
    }

    /// [`Dialect::checked_answer`] for a body already parsed.
    pub fn checked_answer_value(self, v: Value) -> Result<Value, String> {
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            return Err(answered_error(e));
        }
        let fine = match self {
            Dialect::Chat => v["choices"].is_array(),
            Dialect::Messages => messages::is_message(&v),
            Dialect::Responses => v["output"].is_array(),
            Dialect::Embeddings => v["data"].is_array(),
        };
        if fine {
            Ok(v)
        } else {
            Err(format!("answered 200 without {}", self.what()))
        }
    }

    fn what(self) -> &'static str {
        match self {
            Dialect::Chat => "choices",
            Dialect::Messages => "a message",
            Dialect::Responses => "output",
            Dialect::Embeddings => "data",
        }
    }

    /// The usage in a whole JSON answer of this dialect.
    fn usage_of(self, v: &Value) -> Option<Usage> {
        match self {
            Dialect::Chat | Dialect::Embeddings => chat::usage_of(v),
            Dialect::Messages => messages::usage_of(&v["usage"]),
            Dialect::Responses => responses::usage_of(&v["usage"]),
        }
    }
}

const NOT_JSON: &str = "answered 200 with a body that is not JSON";

/// An error object in a 2xx answer, as the reason it is not used.
fn answered_error(e: &Value) -> String {
    let m = e["message"].as_str().unwrap_or("no message");
    format!("answered 200 with an error: {m}")
}

/// What [`Dialect::check_answer`] found in a usable answer.
#[derive(Debug)]
pub enum Checked {
    /// The answer parsed whole, to be translated.
    Whole(Value),
    /// The usage of an answer that goes to the client as it came.
    Usage(Option<Usage>),
}

/// A whole JSON answer from an upstream of `upstream`, as the client of `client` gets it, and
/// the usage it reports. `shown` replaces the answer's `model` (the tier's name, unless the
/// tier shows its upstream's).
pub fn json_answer(
    client: Dialect,
    upstream: Dialect,
    body: Bytes,
    checked: Checked,
    shown: Option<&str>,
) -> (Bytes, Option<Usage>) {
    let v = match checked {
        Checked::Usage(usage) => {
            let body = match shown {
                Some(name) => rename_model(&body, name).map_or(body, BytesMut::freeze),
                None => body,
            };
            return (body, usage);
        }
        Checked::Whole(v) => v,
    };
    if client == upstream {
        let usage = upstream.usage_of(&v);
        let body = match shown {
            Some(name) => rename_model(&body, name).map_or(body, BytesMut::freeze),
            None => body,
        };
        return (body, usage);
    }
    // Read in the upstream's own shape: a translation may have nowhere to put some of it.
    let usage = upstream.usage_of(&v);
    let mut completion = match upstream {
        Dialect::Messages => messages::answer_to_chat(&v),
        Dialect::Chat | Dialect::Responses | Dialect::Embeddings => v,
    };
    if let Some(name) = shown {
        completion["model"] = Value::String(name.to_owned());
    }
    let out = match client {
        Dialect::Chat | Dialect::Embeddings => completion.to_string(),
        Dialect::Messages => messages::answer_from_chat(&completion).to_string(),
        Dialect::Responses => responses::answer_from_chat(&completion).to_string(),
    };
    (Bytes::from(out), usage)
}

/// Output text of a whole chat completion without `usage`, counted.
pub fn counted_json_output_tokens(client: Dialect, body: &[u8]) -> u64 {
    let mut list = Vec::new();
    let key = match client {
        Dialect::Chat => &super::tokens::CONTENT,
        Dialect::Messages | Dialect::Responses => &super::tokens::TEXT,
        // Embeddings have no output tokens.
        Dialect::Embeddings => return 0,
    };
    push_literals(body, key, &mut list);
    count_literals(&list)
}

/// Replaces the value of every `"model"` key in some JSON text with `name`; `None` when there
/// is none. Keys only, as in [`push_literals`].
pub fn rename_model(json: &[u8], name: &str) -> Option<BytesMut> {
    let escaped = escaped(name);
    let mut out = BytesMut::new();
    rename_model_into(json, &escaped, &mut out).then_some(out)
}

/// `name` as the inside of a JSON string literal.
pub fn escaped(name: &str) -> Box<[u8]> {
    let quoted = serde_json::to_vec(name).unwrap_or_else(|_| b"\"\"".to_vec());
    quoted[1..quoted.len() - 1].into()
}

/// Appends `json` to `out` with every `"model"` key's value replaced by `escaped` (the inside
/// of a JSON string); returns whether there was one (when not, nothing is appended).
fn rename_model_into(json: &[u8], escaped: &[u8], out: &mut BytesMut) -> bool {
    let key = &*super::tokens::MODEL;
    let mut done = 0;
    let mut from = 0;
    let mut found = false;
    while let Some(at) = key.find(&json[from..]) {
        let after_key = from + at + key.needle().len();
        from = after_key;
        let rest = &json[after_key..];
        let Some(value) = rest.trim_ascii_start().strip_prefix(b":") else {
            continue;
        };
        let Some(body) = value.trim_ascii_start().strip_prefix(b"\"") else {
            continue;
        };
        let start = json.len() - body.len();
        let Some(end) = super::tokens::string_end(body) else {
            break;
        };
        if !found {
            out.reserve(json.len() + escaped.len());
            found = true;
        }
        out.extend_from_slice(&json[done..start]);
        out.extend_from_slice(escaped);
        done = start + end;
        from = done;
    }
    if found {
        out.extend_from_slice(&json[done..]);
    }
    found
}

/// What an answer's events told about its cost, as far as they reached the client.
#[derive(Debug, Default)]
pub struct Tally {
    /// The usage the upstream reported for the whole answer.
    pub usage: Option<Usage>,
    /// The input side the upstream reported before its final usage (Anthropic's
    /// `message_start`).
    pub input: Option<Usage>,
    /// The text of content events seen before any usage, as JSON literals joined by commas,
    /// for counting if usage never comes. Only the text is kept, not the events, or a long
    /// answer would hold its whole stream here until its end.
    uncounted: Vec<u8>,
    /// Content events relayed (a proxy for "output was delivered").
    pub events: u64,
}

/// Where an event's `content` strings are (as [`scan::scan`] reports them), without an
/// allocation for the usual one or two; `full` when there were more than it holds.
#[derive(Default)]
pub struct Spans {
    at: [(usize, usize); 4],
    n: usize,
    pub full: bool,
}

impl Spans {
    pub fn push(&mut self, start: usize, end: usize) {
        if self.n == self.at.len() {
            self.full = true;
        } else {
            self.at[self.n] = (start, end);
            self.n += 1;
        }
    }
}

/// What had reached the client at one point of a stream (see [`Tally::mark`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mark {
    uncounted: usize,
    events: u64,
    usage: Option<Usage>,
}

impl Tally {
    /// Where the stream stands, taken after each successful write to the client.
    pub fn mark(&self) -> Mark {
        Mark {
            uncounted: self.uncounted.len(),
            events: self.events,
            usage: self.usage,
        }
    }

    /// The client never got what was fed after `mark` (its write failed): forget it, so a
    /// disconnect is billed for exactly the events that reached the client.
    pub fn undeliver(&mut self, mark: Mark) {
        self.uncounted.truncate(mark.uncounted);
        self.events = mark.events;
        self.usage = mark.usage;
    }

    fn set_usage(&mut self, u: Usage) {
        self.usage = Some(u);
        self.uncounted = Vec::new();
    }

    /// A content event: its `key` strings are the text to count if no usage comes.
    fn content(&mut self, json: &[u8], key: &super::tokens::Key) {
        self.events += 1;
        if self.usage.is_none() {
            push_literals(json, key, &mut self.uncounted);
        }
    }

    /// A content event whose `content` strings (insides, escapes unresolved) were found by
    /// [`scan::scan`]: the text to count if no usage comes.
    fn content_spans(&mut self, json: &[u8], spans: &Spans) {
        self.events += 1;
        if self.usage.is_some() {
            return;
        }
        for &(start, end) in &spans.at[..spans.n] {
            if !self.uncounted.is_empty() {
                self.uncounted.push(b',');
            }
            self.uncounted.push(b'"');
            self.uncounted.extend_from_slice(&json[start..end]);
            self.uncounted.push(b'"');
        }
    }

    /// A content event's text, from a decoded chunk.
    fn text(&mut self, text: &str) {
        self.events += 1;
        if self.usage.is_none() && !text.is_empty() {
            if !self.uncounted.is_empty() {
                self.uncounted.push(b',');
            }
            let _ = serde_json::to_writer(&mut self.uncounted, text);
        }
    }

    /// Output tokens when the upstream reported none: the relayed text, counted with tiktoken.
    pub fn counted_output_tokens(&self) -> u64 {
        count_literals(&self.uncounted)
    }
}

/// Why a stream cannot be relayed to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// An event whose data is not JSON.
    Malformed,
    /// The upstream sent an error event.
    Upstream(ApiError),
    /// The stream ended cleanly but before its terminal event.
    Incomplete,
}

/// One stream on its way from an upstream to the client.
pub struct Stream<'a> {
    framer: sse::Framer,
    pub tally: Tally,
    /// The terminal event has been passed on: the answer is whole.
    pub complete: bool,
    client: Dialect,
    /// The name shown in `model`, when not the upstream's (as the inside of a JSON string).
    shown: Option<&'a [u8]>,
    how: How,
}

enum How {
    /// Chat to chat: the usage chunk we asked for is dropped unless the client asked too.
    Chat {
        client_wants_usage: bool,
    },
    Messages,
    Responses,
    Translate(Box<Translate>),
}

struct Translate {
    from: Decoder,
    to: Encoder,
}

/// Upstream events as chat-completion chunks.
enum Decoder {
    Chat,
    Messages(messages::Decoder),
}

/// Chat-completion chunks as client events.
enum Encoder {
    Chat { client_wants_usage: bool },
    Messages(messages::Encoder),
    Responses(responses::Encoder),
}

/// What a decoder makes of one upstream event.
pub enum Piece {
    Chunk(Value),
    Done,
}

impl<'a> Stream<'a> {
    pub fn new(
        client: Dialect,
        upstream: Dialect,
        client_wants_usage: bool,
        shown: Option<&'a [u8]>,
    ) -> Stream<'a> {
        let how = match (client, upstream) {
            (Dialect::Chat, Dialect::Chat) => How::Chat { client_wants_usage },
            (Dialect::Messages, Dialect::Messages) => How::Messages,
            (Dialect::Responses, Dialect::Responses) => How::Responses,
            (client, upstream) => How::Translate(Box::new(Translate {
                from: match upstream {
                    Dialect::Messages => Decoder::Messages(messages::Decoder::default()),
                    Dialect::Chat | Dialect::Responses | Dialect::Embeddings => Decoder::Chat,
                },
                to: match client {
                    Dialect::Chat | Dialect::Embeddings => Encoder::Chat { client_wants_usage },
                    Dialect::Messages => Encoder::Messages(messages::Encoder::default()),
                    Dialect::Responses => Encoder::Responses(responses::Encoder::default()),
                },
            })),
        };
        Stream {
            framer: sse::Framer::default(),
            tally: Tally::default(),
            complete: false,
            client,
            shown,
            how,
        }
    }

    /// Takes bytes from the upstream and appends what the client gets of them to `out` (whole
    /// events only). Stops at the terminal event, and at a fault, whose error event the caller
    /// writes ([`Stream::error_event`]).
    pub fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), Fault> {
        self.framer.push(chunk);
        while !self.complete
            && let Some(ev) = self.framer.next_event()
        {
            self.event(ev, out)?;
        }
        Ok(())
    }

    /// At the upstream's clean end: a last whole event is relayed; a stream that has not had
    /// its terminal event is [`Fault::Incomplete`]. A partial event is dropped.
    pub fn finish(&mut self, out: &mut BytesMut) -> Result<(), Fault> {
        if !self.complete
            && let Some(ev) = self.framer.finish()
        {
            self.event(ev, out)?;
        }
        if self.complete {
            Ok(())
        } else {
            Err(Fault::Incomplete)
        }
    }

    /// The error that ends this stream, as the client's dialect writes it mid-stream.
    pub fn error_event(&mut self, e: &ApiError) -> Bytes {
        // A Responses encoder numbers its events; the error is the next one.
        if let How::Translate(t) = &mut self.how
            && let Encoder::Responses(r) = &mut t.to
        {
            return r.error_event(e);
        }
        match self.client {
            Dialect::Chat | Dialect::Embeddings => e.sse_event(),
            Dialect::Messages => messages::error_event(e),
            // Passed through from a Responses upstream: its own numbering is not kept.
            Dialect::Responses => responses::error_event(e, 0),
        }
    }

    fn pass(&self, raw: BytesMut, out: &mut BytesMut) {
        if let Some(name) = self.shown
            && rename_model_into(&raw, name, out)
        {
            return;
        }
        // Events passed one after the other are adjacent in the framer's buffer: joining them
        // copies nothing.
        if out.is_empty() {
            *out = raw;
        } else {
            out.unsplit(raw);
        }
    }

    fn event(&mut self, ev: sse::Event, out: &mut BytesMut) -> Result<(), Fault> {
        match &mut self.how {
            How::Chat { client_wants_usage } => {
                let (keep, done) = chat::pass(&ev, &mut self.tally, *client_wants_usage)?;
                self.complete = done;
                if keep {
                    self.pass(ev.raw, out);
                }
            }
            How::Messages => {
                self.complete = messages::pass(&ev, &mut self.tally)?;
                self.pass(ev.raw, out);
            }
            How::Responses => {
                self.complete = responses::pass(&ev, &mut self.tally)?;
                self.pass(ev.raw, out);
            }
            How::Translate(t) => {
                let mut pieces = Vec::new();
                match &mut t.from {
                    Decoder::Chat => pieces.extend(chat::decode(&ev)?),
                    Decoder::Messages(d) => d.decode(&ev, &mut self.tally, &mut pieces)?,
                }
                for piece in pieces {
                    match piece {
                        Piece::Chunk(mut v) => {
                            // Other decoders set the usage from the upstream's own shape.
                            if matches!(t.from, Decoder::Chat)
                                && let Some(u) = chat::usage_of(&v)
                            {
                                self.tally.set_usage(u);
                            }
                            chat::tally_chunk(&v, &mut self.tally);
                            if let Some(name) = self.shown {
                                v["model"] =
                                    Value::String(String::from_utf8_lossy(name).into_owned());
                            }
                            match &mut t.to {
                                Encoder::Chat { client_wants_usage } => {
                                    chat::encode(&v, *client_wants_usage, out)
                                }
                                Encoder::Messages(m) => m.chunk(&v, out),
                                Encoder::Responses(r) => r.chunk(&v, out),
                            }
                        }
                        Piece::Done => {
                            self.complete = true;
                            match &mut t.to {
                                Encoder::Chat { .. } => out.extend_from_slice(b"data: [DONE]\n\n"),
                                Encoder::Messages(m) => m.close(out),
                                Encoder::Responses(r) => r.close(out),
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANTHROPIC: &str = include_str!("../../../tests/fixtures/anthropic/stream.sse");
    const ANTHROPIC_TOOLS: &str = include_str!("../../../tests/fixtures/anthropic/tool_stream.sse");
    const GEMINI: &str = include_str!("../../../tests/fixtures/gemini/stream.sse");
    const RESPONSES: &str = include_str!("../../../tests/fixtures/responses/stream.sse");

    /// A recorded stream through one (client, upstream) pair, cut in two at `cut`: what the
    /// client gets (as LF-framed text, the clock's `created` fields zeroed) and the tally.
    fn through(client: Dialect, upstream: Dialect, stream: &str, cut: usize) -> (String, Tally) {
        let mut s = Stream::new(client, upstream, true, Some(b"tier"));
        let mut out = BytesMut::new();
        s.feed(&stream.as_bytes()[..cut], &mut out).expect("whole");
        s.feed(&stream.as_bytes()[cut..], &mut out).expect("whole");
        s.finish(&mut out).expect("complete");
        let mut text = String::from_utf8(out.to_vec())
            .expect("utf8")
            .replace("\r\n", "\n");
        for key in ["\"created\":", "\"created_at\":"] {
            let mut at = 0;
            while let Some(i) = text[at..].find(key) {
                let from = at + i + key.len();
                let to = from
                    + text[from..]
                        .find(|c: char| !c.is_ascii_digit())
                        .unwrap_or(0);
                text.replace_range(from..to, "0");
                at = from;
            }
        }
        (text, s.tally)
    }

    #[test]
    fn recorded_streams_cut_at_every_byte_and_framed_either_way_come_out_alike() {
        let pairs = [
            (Dialect::Messages, Dialect::Messages, ANTHROPIC),
            (Dialect::Chat, Dialect::Messages, ANTHROPIC),
            (Dialect::Responses, Dialect::Messages, ANTHROPIC_TOOLS),
            (Dialect::Chat, Dialect::Messages, ANTHROPIC_TOOLS),
            (Dialect::Chat, Dialect::Chat, GEMINI),
            (Dialect::Messages, Dialect::Chat, GEMINI),
            (Dialect::Responses, Dialect::Chat, GEMINI),
            (Dialect::Responses, Dialect::Responses, RESPONSES),
        ];
        for (client, upstream, fixture) in pairs {
            let (whole, tally) = through(client, upstream, fixture, 0);
            assert!(
                tally.usage.is_some(),
                "{client:?} from {upstream:?}: usage read"
            );
            assert!(!whole.is_empty());
            for framing in ["\n", "\r\n"] {
                let framed = fixture.replace('\n', framing);
                for cut in 0..=framed.len() {
                    let (out, t) = through(client, upstream, &framed, cut);
                    assert_eq!(
                        t.usage, tally.usage,
                        "{client:?} from {upstream:?} cut at {cut}"
                    );
                    assert!(
                        out == whole,
                        "{client:?} from {upstream:?}, {framing:?}, cut at {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_answer_passed_as_it_came_is_checked_and_its_usage_read_without_a_tree() {
        let check = |d: Dialect, body: &str| d.check_answer(d, body.as_bytes());
        let usage = |body: &str| match check(Dialect::Chat, body) {
            Ok(Checked::Usage(u)) => u,
            other => panic!("{body}: {other:?}"),
        };
        assert_eq!(
            usage(
                r#"{"id":"c","choices":[{"message":{"content":"hi"}}],"error":null,
                    "usage":{"prompt_tokens":7,"completion_tokens":3,
                             "prompt_tokens_details":{"cached_tokens":2}}}"#
            ),
            Some(Usage {
                input_tokens: 7,
                output_tokens: 3,
                cached_input_tokens: 2,
                ..Usage::default()
            })
        );
        assert_eq!(usage(r#"{"choices":[]}"#), None);
        // A key written twice counts as its last, as a parser reads it.
        assert_eq!(
            usage(r#"{"choices":[],"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":5}}"#)
                .map(|u| u.input_tokens),
            Some(5)
        );
        let refused = |d: Dialect, body: &str| check(d, body).expect_err(body);
        assert_eq!(
            refused(
                Dialect::Chat,
                r#"{"error":{"message":"overloaded"},"choices":[]}"#
            ),
            "answered 200 with an error: overloaded"
        );
        assert_eq!(
            refused(Dialect::Chat, r#"{"choices":{}}"#),
            "answered 200 without choices"
        );
        assert_eq!(
            refused(Dialect::Chat, r#"{"data":[]}"#),
            "answered 200 without choices"
        );
        assert_eq!(
            refused(Dialect::Chat, r#"{"choices":[]"#),
            "answered 200 with a body that is not JSON"
        );
        assert!(matches!(
            check(
                Dialect::Embeddings,
                r#"{"data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":4}}"#
            ),
            Ok(Checked::Usage(Some(Usage {
                input_tokens: 4,
                ..
            })))
        ));
        assert_eq!(
            refused(Dialect::Embeddings, r#"{"choices":[]}"#),
            "answered 200 without data"
        );
        // Translated answers are parsed whole.
        assert!(matches!(
            Dialect::Chat.check_answer(Dialect::Messages, br#"{"choices":[]}"#),
            Ok(Checked::Whole(_))
        ));
    }

    #[test]
    fn the_model_is_renamed_in_keys_only() {
        let j = br#"{"id":"x","model":"gpt-4.1-nano-2025","choices":[{"delta":{"content":"\"model\": \"no\""}}],"m":{"model" : "also"}}"#;
        let out = rename_model(j, "budget").expect("renamed");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["model"], "budget");
        assert_eq!(v["m"]["model"], "budget");
        assert_eq!(v["choices"][0]["delta"]["content"], "\"model\": \"no\"");
        assert!(rename_model(b"{\"role\":\"model\"}", "x").is_none());
    }
}
