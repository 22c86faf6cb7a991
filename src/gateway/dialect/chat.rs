//! OpenAI's chat completions: the dialect every translation goes through. Chunks pass through
//! as they came; JSON is parsed only for chunks that carry `usage` or an error, and every other
//! chunk is only checked to be JSON.

use super::sse::Event;
use super::{Fault, Piece, Tally};
use crate::gateway::error::ApiError;
use crate::gateway::tokens::Usage;
use bytes::BytesMut;
use serde_json::Value;

/// Reads the `usage` object of an OpenAI answer or chunk.
pub fn usage_of(v: &Value) -> Option<Usage> {
    usage_in(v.get("usage")?)
}

/// Reads OpenAI's `usage` object, with its cached-input and reasoning details.
pub fn usage_in(u: &Value) -> Option<Usage> {
    Some(Usage {
        input_tokens: u.get("prompt_tokens")?.as_u64()?,
        output_tokens: u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        cached_input_tokens: u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        cache_write_tokens: 0,
        reasoning_tokens: u["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap_or(0),
    })
}

/// An error object sent in a stream, as our error.
pub fn stream_error(e: &Value) -> ApiError {
    ApiError::Upstream {
        status: 502,
        message: e["message"]
            .as_str()
            .unwrap_or("The upstream provider reported an error mid-stream.")
            .to_owned(),
        kind: e["type"].as_str().unwrap_or("api_error").to_owned(),
        param: None,
        code: e["code"].as_str().map(str::to_owned),
    }
}

/// Chat to chat: records what the event tells, and says whether the client gets it and
/// whether it ends the answer (`[DONE]`).
pub fn pass(
    ev: &Event,
    tally: &mut Tally,
    client_wants_usage: bool,
) -> Result<(bool, bool), Fault> {
    let Some(data) = ev.data() else {
        return Ok((true, false));
    };
    let data = data.trim_ascii();
    if data == b"[DONE]" {
        return Ok((true, true));
    }
    // One pass: is it JSON, does it have a top-level `usage` or `error`, where is its text.
    let mut spans = super::Spans::default();
    let found = super::scan::scan(data, &mut |key, start, end| {
        if key == b"content" {
            spans.push(start, end);
        }
    });
    // Parsed into a tree only when it may carry usage or an error.
    let tree = match found {
        Ok(f) => f.usage.is_some() || f.error.is_some(),
        Err(super::scan::Bad::Invalid) => return Err(Fault::Malformed),
        // Nested deeper than the scan goes: judged by serde_json (which skips any depth).
        Err(super::scan::Bad::Deep) => {
            serde_json::from_slice::<serde::de::IgnoredAny>(data).map_err(|_| Fault::Malformed)?;
            spans.full = true;
            memchr::memmem::find(data, b"\"usage\"").is_some()
                || memchr::memmem::find(data, b"\"error\"").is_some()
        }
    };
    if tree {
        let v: Value = serde_json::from_slice(data).map_err(|_| Fault::Malformed)?;
        if let Some(e) = v.get("error").filter(|e| e.is_object()) {
            return Err(Fault::Upstream(stream_error(e)));
        }
        if let Some(u) = usage_of(&v) {
            tally.set_usage(u);
            let only_usage = v
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty);
            return Ok((!only_usage || client_wants_usage, false));
        }
    }
    if spans.full {
        tally.content(data, &crate::gateway::tokens::CONTENT);
    } else {
        tally.content_spans(data, &spans);
    }
    Ok((true, false))
}

/// Chat events as chunks, for another client dialect.
pub fn decode(ev: &Event) -> Result<Option<Piece>, Fault> {
    if ev.is_done() {
        return Ok(Some(Piece::Done));
    }
    match ev.json() {
        None => Ok(None),
        Some(Err(())) => Err(Fault::Malformed),
        Some(Ok(v)) => match v.get("error").filter(|e| e.is_object()) {
            Some(e) => Err(Fault::Upstream(stream_error(e))),
            None => Ok(Some(Piece::Chunk(v))),
        },
    }
}

/// Counts a decoded chunk's content into the tally (its usage is read by the caller).
pub fn tally_chunk(v: &Value, tally: &mut Tally) {
    let Some(choices) = v.get("choices").and_then(Value::as_array) else {
        return;
    };
    if choices.is_empty() {
        return;
    }
    let text: String = choices
        .iter()
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect();
    tally.text(&text);
}

/// A chunk as a chat event (the usage-only chunk only when the client asked for it).
pub fn encode(v: &Value, client_wants_usage: bool, out: &mut BytesMut) {
    let only_usage = v
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty);
    if only_usage && !client_wants_usage {
        return;
    }
    let Ok(json) = serde_json::to_vec(v) else {
        return;
    };
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&json);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::super::{Dialect, Stream};
    use crate::gateway::tokens::{Usage, count_tokens};
    use bytes::BytesMut;

    fn chunk(content: &str) -> String {
        format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}]}}\n\n"
        )
    }
    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n";

    fn relay(stream: &str, cut: usize, wants_usage: bool) -> (String, Stream<'static>, bool) {
        let mut s = Stream::new(Dialect::Chat, Dialect::Chat, wants_usage, None);
        let mut out = BytesMut::new();
        let mut ok = s.feed(&stream.as_bytes()[..cut], &mut out).is_ok();
        ok &= s.feed(&stream.as_bytes()[cut..], &mut out).is_ok();
        ok &= s.finish(&mut out).is_ok();
        (String::from_utf8(out.to_vec()).expect("utf8"), s, ok)
    }

    #[test]
    fn splits_events_across_chunks_and_drops_the_usage_chunk_when_not_asked() {
        let stream = format!("{}{}{}data: [DONE]\n\n", chunk("Hel"), chunk("lo"), USAGE);
        for cut in 0..=stream.len() {
            let (out, s, ok) = relay(&stream, cut, false);
            assert!(ok);
            assert_eq!(
                out,
                format!("{}{}data: [DONE]\n\n", chunk("Hel"), chunk("lo")),
                "cut at {cut}"
            );
            assert_eq!(
                s.tally.usage,
                Some(Usage {
                    input_tokens: 7,
                    output_tokens: 3,
                    ..Usage::default()
                })
            );
            let (out, _, _) = relay(&stream, cut, true);
            assert!(out.contains("usage"));
        }
    }

    #[test]
    fn a_write_that_failed_is_not_counted() {
        let mut s = Stream::new(Dialect::Chat, Dialect::Chat, false, None);
        let mut out = BytesMut::new();
        s.feed(chunk("one").as_bytes(), &mut out).expect("ok");
        s.feed(chunk(" two").as_bytes(), &mut out).expect("ok");
        let mark = s.tally.mark();
        s.feed(chunk(" three four five").as_bytes(), &mut out)
            .expect("ok");
        let all = s.tally.counted_output_tokens();
        s.tally.undeliver(mark);
        assert_eq!(s.tally.events, 2);
        assert_eq!(s.tally.counted_output_tokens(), count_tokens("one two"));
        assert!(s.tally.counted_output_tokens() < all);
    }

    #[test]
    fn counts_only_the_content_strings_of_a_stream_without_usage() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"He said \\\"hi\\\"\\n\"}}]}\n\n",
            "data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"caf\\u00e9 \"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":\"{\\\"content\\\":\\\"no\\\"}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"done\"}}]}\n\n",
            "data: [DONE]\n\n",
        );
        let (out, s, ok) = relay(stream, 0, false);
        assert!(ok);
        assert_eq!(out, stream);
        assert_eq!(s.tally.events, 5);
        assert_eq!(
            s.tally.counted_output_tokens(),
            count_tokens("He said \"hi\"\ncafé done")
        );
    }

    #[test]
    fn a_stream_without_done_or_with_a_chunk_that_is_not_json_is_a_fault() {
        let early = format!("{}{}", chunk("Hel"), chunk("lo"));
        for cut in 0..=early.len() {
            let (out, _, ok) = relay(&early, cut, false);
            assert!(!ok, "ended before [DONE]");
            assert_eq!(out, early);
        }
        let partial = format!("{}data: {{\"choi", chunk("Hel"));
        let (out, _, ok) = relay(&partial, 3, false);
        assert!(!ok);
        assert_eq!(
            out,
            chunk("Hel"),
            "the partial event never reaches the client"
        );
        let bad = format!("{}data: {{not json\n\n{}", chunk("a"), chunk("b"));
        assert_malformed_after(&bad, &chunk("a"));
    }

    /// Fed whole, `stream` is malformed after relaying `before`.
    fn assert_malformed_after(stream: &str, before: &str) {
        let mut s = Stream::new(Dialect::Chat, Dialect::Chat, false, None);
        let mut out = BytesMut::new();
        assert_eq!(
            s.feed(stream.as_bytes(), &mut out),
            Err(super::Fault::Malformed)
        );
        assert_eq!(&out[..], before.as_bytes());
    }

    #[test]
    fn an_event_nested_deeper_than_the_scan_goes_is_judged_as_before() {
        // serde_json skips a value nested to any depth, but parses one into a tree only to
        // 128 levels: a deep event is content, unless it names `usage` or `error` (then it
        // must be parsed, and is malformed).
        let deep = |extra: &str| {
            format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"deep\"}}}}],\"x\":{}0{}{extra}}}\n\n",
                "[".repeat(200),
                "]".repeat(200)
            )
        };
        let stream = format!("{}{}data: [DONE]\n\n", chunk("Hel"), deep(""));
        let (out, s, ok) = relay(&stream, 0, false);
        assert!(ok);
        assert_eq!(out, stream);
        assert_eq!(s.tally.events, 2);
        assert_eq!(s.tally.counted_output_tokens(), count_tokens("Heldeep"));
        let stream = format!(
            "{}{}data: [DONE]\n\n",
            chunk("Hel"),
            deep(",\"usage\":null")
        );
        assert_malformed_after(&stream, &chunk("Hel"));
    }

    #[test]
    fn the_answer_is_complete_at_done_whatever_follows() {
        let stream = format!("{}data: [DONE]\n\ndata: {{late", chunk("hi"));
        let mut s = Stream::new(Dialect::Chat, Dialect::Chat, false, None);
        let mut out = BytesMut::new();
        s.feed(stream.as_bytes(), &mut out).expect("ok");
        assert!(s.complete);
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("{}data: [DONE]\n\n", chunk("hi"))
        );
    }
}
