//! The one SSE framer every stream goes through, whatever its dialect: events end at a blank
//! line; lines end with CRLF, LF or CR (all three, mixed, as the standard allows); `data:` lines
//! of one event are joined with line feeds; comments (`:` lines) and unknown fields are ignored.
//! An event comes out with its original bytes, so a stream that needs no translation passes
//! through untouched.

use bytes::BytesMut;

/// One whole event: its bytes as the upstream sent them, blank line included.
#[derive(Debug, Clone)]
pub struct Event {
    pub raw: BytesMut,
}

/// The lines of an event, without their terminators.
fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = raw;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (line, skip) = match memchr::memchr2(b'\n', b'\r', rest) {
            Some(i) if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') => (&rest[..i], i + 2),
            Some(i) => (&rest[..i], i + 1),
            None => (rest, rest.len()),
        };
        rest = &rest[skip..];
        Some(line)
    })
}

/// A field's value: after its colon, one leading space dropped.
fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let v = line.strip_prefix(name)?.strip_prefix(b":")?;
    Some(v.strip_prefix(b" ").unwrap_or(v))
}

impl Event {
    /// The event's data: its `data:` lines joined by line feeds (`None` when it has none: a
    /// comment, a keep-alive, a bare blank line).
    pub fn data(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        let mut found: Option<std::borrow::Cow<'_, [u8]>> = None;
        for line in lines(&self.raw) {
            if let Some(d) = field(line, b"data") {
                found = Some(match found {
                    None => std::borrow::Cow::Borrowed(d),
                    Some(prev) => {
                        let mut joined = prev.into_owned();
                        joined.push(b'\n');
                        joined.extend_from_slice(d);
                        std::borrow::Cow::Owned(joined)
                    }
                });
            }
        }
        found
    }

    /// The `event:` field, if any.
    pub fn name(&self) -> Option<&[u8]> {
        lines(&self.raw).find_map(|l| field(l, b"event"))
    }

    /// The data parsed as JSON: `None` without data, `Some(Err)` for data that is not JSON.
    pub fn json(&self) -> Option<Result<serde_json::Value, ()>> {
        self.data()
            .map(|d| serde_json::from_slice(d.trim_ascii()).map_err(|_| ()))
    }

    /// Whether the data is OpenAI's `[DONE]`.
    pub fn is_done(&self) -> bool {
        self.data().is_some_and(|d| d.trim_ascii() == b"[DONE]")
    }
}

/// Splits a byte stream into events, across reads of any size.
#[derive(Debug, Default)]
pub struct Framer {
    buf: BytesMut,
    /// Where the first line not yet known to be whole starts in `buf`: a long event arriving
    /// in many reads is scanned once, not once per read.
    scanned: usize,
}

impl Framer {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole event, if one has arrived.
    pub fn next_event(&mut self) -> Option<Event> {
        let mut pos = self.scanned;
        loop {
            let Some(off) = memchr::memchr2(b'\n', b'\r', &self.buf[pos..]) else {
                self.scanned = pos;
                return None;
            };
            let i = pos + off;
            let len = if self.buf[i] == b'\r' {
                match self.buf.get(i + 1) {
                    // A CR at the end of what arrived may be the first half of a CRLF.
                    None => {
                        self.scanned = pos;
                        return None;
                    }
                    Some(b'\n') => 2,
                    Some(_) => 1,
                }
            } else {
                1
            };
            if i == pos {
                // A blank line: the event ends here.
                let raw = self.buf.split_to(i + len);
                self.scanned = 0;
                return Some(Event { raw });
            }
            pos = i + len;
        }
    }

    /// At a clean end of the stream: an event whose last line ended but whose blank line never
    /// came is still whole (some servers close right after `data: [DONE]\n`); anything else
    /// left is a partial event and is dropped.
    pub fn finish(&mut self) -> Option<Event> {
        let rest = self.buf.split();
        self.scanned = 0;
        let ends_a_line = matches!(rest.last(), Some(b'\n' | b'\r'));
        (ends_a_line && lines(&rest).any(|l| !l.is_empty())).then_some(Event { raw: rest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(stream: &[u8], cut: usize) -> Vec<Event> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for part in [&stream[..cut], &stream[cut..]] {
            f.push(part);
            while let Some(e) = f.next_event() {
                out.push(e);
            }
        }
        out.extend(f.finish());
        out
    }

    #[test]
    fn lf_crlf_and_cr_framing_split_alike_at_every_byte() {
        let lf =
            "event: a\ndata: {\"x\":1}\n\n: keep-alive\n\ndata: one\ndata: two\n\ndata: [DONE]\n\n";
        for sep in ["\n", "\r\n", "\r"] {
            let stream = lf.replace('\n', sep);
            for cut in 0..=stream.len() {
                let ev = all(stream.as_bytes(), cut);
                assert_eq!(ev.len(), 4, "{sep:?} cut at {cut}");
                assert_eq!(ev[0].name(), Some(&b"a"[..]));
                assert_eq!(ev[0].json(), Some(Ok(serde_json::json!({"x": 1}))));
                assert!(ev[1].data().is_none(), "a comment has no data");
                assert_eq!(ev[2].data().as_deref(), Some(&b"one\ntwo"[..]));
                assert!(ev[3].is_done());
                let joined: Vec<u8> = ev.iter().flat_map(|e| e.raw.to_vec()).collect();
                assert_eq!(joined, stream.as_bytes(), "bytes pass through as they came");
            }
        }
    }

    #[test]
    fn a_partial_event_at_the_end_is_dropped_and_a_whole_last_line_kept() {
        let mut f = Framer::default();
        f.push(b"data: {\"a\":1}\n\ndata: {\"cho");
        assert!(f.next_event().is_some());
        assert!(f.next_event().is_none());
        assert!(f.finish().is_none(), "half an event never reaches anyone");
        let mut f = Framer::default();
        f.push(b"data: [DONE]\n");
        assert!(f.next_event().is_none());
        assert!(f.finish().is_some_and(|e| e.is_done()));
    }
}
