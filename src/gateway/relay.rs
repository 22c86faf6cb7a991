//! Step 6: pass the answer through as it arrives and find out what it used. The upstream's
//! bytes go through the request's [`Stream`] (or, for JSON, [`dialect::json_answer`]): the
//! dialect seam decides what the client gets and what the answer reported. What the stream
//! delivered is what is billed: a write that fails is not, and a stream cut short is billed
//! for the events that reached the client.

use super::ctx::RequestCtx;
use super::dialect::{self, Dialect, Fault, Stream};
use super::error::ApiError;
use super::request::ChatRequest;
use super::respond::{response_header, write_body, write_error};
use super::routing::Routing;
use super::state::Gateway;
use super::tokens::Usage;
use super::upstream::{self, Answer};
use crate::conf::{Provider, ResponseModel};
use crate::money::{NanoUsd, Rounding};
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use pingora::proxy::Session;
use std::time::Instant;

/// Largest non-streaming answer we buffer from an upstream.
pub const MAX_JSON_ANSWER: usize = 64 * 1024 * 1024;

/// Bytes gathered into one write to a streaming client at most.
const GATHER_MAX: usize = 16 * 1024;

/// What became of a request after authentication, for its usage record.
pub struct Outcome {
    pub status: u16,
    pub error_code: Option<String>,
    pub usage: Usage,
    /// Paid from the lease (see `Hold::settle`).
    pub billed: NanoUsd,
    /// Cost above what the lease could back, for the balance (see `Settlement::over_hold`).
    pub over_hold: NanoUsd,
    pub provider_cost: NanoUsd,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub attempts: u32,
    /// The answer's last bytes, written after the settlement is journaled.
    pub tail: Option<Bytes>,
}

impl Outcome {
    /// A request that failed before any upstream answered.
    pub fn failed(e: &ApiError) -> Outcome {
        Outcome {
            error_code: Some(e.code().to_owned()),
            ..Outcome::answered(e.status())
        }
    }

    /// An answer with this status, nothing used yet.
    fn answered(status: u16) -> Outcome {
        Outcome {
            status,
            error_code: None,
            usage: Usage::default(),
            billed: NanoUsd::ZERO,
            over_hold: NanoUsd::ZERO,
            provider_cost: NanoUsd::ZERO,
            provider: None,
            model: None,
            attempts: 0,
            tail: None,
        }
    }
}

/// Turns an upstream's refusal into our error shape (OpenAI's and Anthropic's error bodies
/// both keep theirs under `error`).
fn upstream_error(status: u16, body: &[u8], provider: &str) -> ApiError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let e = &v["error"];
    let message = e["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("The upstream provider answered {status}."));
    if status >= 500 {
        return ApiError::UpstreamUnavailable {
            detail: format!("{provider} answered {status}: {message}"),
        };
    }
    ApiError::Upstream {
        status,
        message,
        kind: e["type"]
            .as_str()
            .unwrap_or("invalid_request_error")
            .to_owned(),
        param: e["param"].as_str().map(str::to_owned),
        code: e["code"].as_str().map(str::to_owned),
    }
}

/// The upstream's own `retry-after` and `retry-after-ms`, passed on with its 429.
fn upstream_retry(answer: &Answer) -> Option<super::ctx::RetryAfter> {
    let h = answer.session.response_header()?;
    let get = |name: &str| {
        h.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 64)
            .map(str::to_owned)
    };
    let r = super::ctx::RetryAfter {
        seconds: get("retry-after"),
        ms: get("retry-after-ms"),
    };
    (r.seconds.is_some() || r.ms.is_some()).then_some(r)
}

/// Relays the answer to the client and returns what was used.
///
/// An `async` block rather than an `async fn`: an `async fn` moves each by-value argument into a
/// second slot of its state, and this state lives as long as the answer, so every open stream
/// would carry a dead copy of the `Answer` (1.3 KB).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep a second copy of `answer` in its state"
)]
pub fn relay<'a>(
    gw: &'a Gateway,
    live: &'a Routing,
    session: &'a mut Session,
    ctx: &'a mut RequestCtx,
    req: &'a ChatRequest,
    mut answer: Answer,
) -> impl std::future::Future<Output = Outcome> + Send + 'a {
    async move {
        let u = &live.conf.tiers[req.tier].upstreams[answer.upstream];
        let p = &live.conf.providers[u.provider];
        let mut out = Outcome {
            status: answer.status,
            provider: Some(u.provider_name.clone()),
            model: Some(u.model.clone()),
            attempts: answer.attempts,
            ..Outcome::answered(answer.status)
        };
        // Only the stream's relay is awaited in place: this future lives as long as the answer
        // (minutes for a stream), so the other branches' larger state machines are boxed and live
        // only while they run.
        if !(200..300).contains(&answer.status) {
            let refused = Box::pin(async {
                let body = read_all(&mut answer, p.idle_timeout)
                    .await
                    .unwrap_or_default();
                let e = upstream_error(answer.status, &body, &p.name);
                if answer.status == 429
                    && let Some(r) = upstream_retry(&answer)
                {
                    ctx.set_upstream_retry(r);
                }
                out.status = e.status();
                out.error_code = Some(e.code().to_owned());
                upstream::release(&gw.connector, answer).await;
                let _ = write_error(session, ctx, &e).await;
            });
            refused.await;
            return out;
        }
        let tier = &live.conf.tiers[req.tier];
        let speaks = Dialect::of_upstream(p, req.client);
        if req.stream {
            let shown = live.shown_models[req.tier].as_deref();
            let mut stream = Stream::new(req.client, speaks, req.client_wants_usage, shown);
            relay_stream(gw, session, ctx, req, p, &mut answer, &mut out, &mut stream).await;
        } else {
            let shown = match tier.response_model {
                ResponseModel::Tier => Some(tier.name.as_str()),
                ResponseModel::Upstream => None,
            };
            let json = Box::pin(relay_json(
                session,
                ctx,
                req,
                &mut answer,
                &mut out,
                p.idle_timeout,
                (speaks, shown),
            ));
            json.await;
        }
        out.provider_cost = out
            .usage
            .cost(&u.cost, &u.cache, Rounding::Conservative)
            .unwrap_or(NanoUsd::ZERO);
        let released = Box::pin(upstream::release(&gw.connector, answer));
        released.await;
        out
    }
}

/// Reads an upstream's whole body (bounded), see [`upstream::read_body`].
async fn read_all(answer: &mut Answer, timeout: std::time::Duration) -> Result<Bytes, String> {
    upstream::read_body(&mut answer.session, timeout, MAX_JSON_ANSWER).await
}

/// Whether the client has closed its connection (a FIN waiting on the socket), looked at once
/// without waiting: one read of the socket, before the answer's first byte is written.
fn client_left(session: &mut Session) -> bool {
    matches!(
        session.as_mut().read_body_or_idle(true).now_or_never(),
        Some(Err(_))
    )
}

async fn relay_json(
    session: &mut Session,
    ctx: &mut RequestCtx,
    req: &ChatRequest,
    answer: &mut Answer,
    out: &mut Outcome,
    timeout: std::time::Duration,
    (speaks, shown): (Dialect, Option<&str>),
) {
    let pre_read = answer.body.take().map(|b| (b, answer.checked.take()));
    let read = match pre_read {
        Some(b) => Ok(b),
        None => read_all(answer, timeout).await.map(|b| (b, None)),
    };
    let (body, checked) = match read {
        Ok(b) => b,
        Err(detail) => {
            let e = ApiError::UpstreamUnavailable { detail };
            out.status = e.status();
            out.error_code = Some(e.code().to_owned());
            let _ = write_error(session, ctx, &e).await;
            return;
        }
    };
    let checked = checked.unwrap_or_else(|| {
        dialect::Checked::Whole(serde_json::from_slice(&body).unwrap_or_default())
    });
    let (body, usage) = dialect::json_answer(req.client, speaks, body, checked, shown);
    out.usage = usage.unwrap_or_else(|| Usage {
        input_tokens: req.counted_input_tokens(),
        output_tokens: dialect::counted_json_output_tokens(req.client, &body),
        ..Usage::default()
    });
    if client_left(session) {
        // Gone while the upstream answered: nothing reached the client, nothing is billed.
        out.error_code = Some("client_disconnected".into());
        out.usage = Usage::default();
        return;
    }
    ctx.first_byte = Some(Instant::now());
    let written = async {
        session
            .write_response_header(
                response_header(200, "application/json", ctx, Some(body.len()))?,
                false,
            )
            .await
    }
    .await;
    if written.is_err() {
        // The client left before anything reached it: nothing to bill.
        out.error_code = Some("client_disconnected".into());
        out.usage = Usage::default();
        return;
    }
    // Written once the settlement is journaled (`record`).
    out.tail = Some(body);
}

/// What ends a stream early.
fn fault_error(f: Fault, provider: &str) -> ApiError {
    match f {
        Fault::Malformed => ApiError::UpstreamMalformed {
            detail: format!("{provider} sent an event that is not JSON"),
        },
        Fault::Incomplete => ApiError::UpstreamIncomplete {
            detail: format!("the stream from {provider} ended before its last event"),
        },
        Fault::Upstream(e) => e,
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the parts of one request, each borrowed for the stream's length"
)]
async fn relay_stream(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    req: &ChatRequest,
    p: &Provider,
    answer: &mut Answer,
    out: &mut Outcome,
    stream: &mut Stream<'_>,
) {
    if client_left(session) {
        // Gone while the upstream prepared its answer: nothing reached the client, nothing is
        // billed.
        out.error_code = Some("client_disconnected".into());
        return;
    }
    let header = match response_header(200, "text/event-stream", ctx, None) {
        Ok(h) => h,
        Err(_) => return,
    };
    // Boxed for the reason given at `write_body`, in a block so the box is freed once written.
    let written = {
        let writing = Box::pin(session.write_response_header(header, false));
        writing.await
    };
    if written.is_err() {
        out.error_code = Some("client_disconnected".into());
        return;
    }
    answer.session.set_read_timeout(Some(p.idle_timeout));
    let mut failed: Option<ApiError> = None;
    // What the client has had of the stream: a write that fails is not billed.
    let mut delivered = stream.tally.mark();
    // A read already made while gathering (see below), handled before reading again.
    let mut ahead: Option<pingora::Result<Option<Bytes>>> = None;
    loop {
        let read = match ahead.take() {
            Some(r) => r,
            None => {
                // A graceful shutdown's deadline ends the stream here, billed for what was
                // delivered (see `drain`). The cut comes first: a fast upstream must not keep
                // the stream going past it.
                tokio::select! {
                    biased;
                    () = gw.drain.cut.wait() => {
                        failed = Some(ApiError::ShuttingDown);
                        break;
                    }
                    r = answer.session.read_response_body() => r,
                }
            }
        };
        let mut pass = BytesMut::new();
        let fed = match read {
            Ok(Some(chunk)) => stream.feed(&chunk, &mut pass),
            Ok(None) => stream.finish(&mut pass),
            Err(e) => {
                let detail = format!(
                    "the stream from {} broke off ({})",
                    p.name,
                    e.etype().as_str()
                );
                failed = Some(if matches!(e.etype(), pingora::ErrorType::ReadTimedout) {
                    ApiError::UpstreamTimeout { detail }
                } else {
                    ApiError::UpstreamUnavailable { detail }
                });
                // What the stream had whole before it broke still goes out.
                out.tail = Some(pass.freeze());
                break;
            }
        };
        // What the upstream has already sent goes out in the same write: one system call and
        // one TCP segment for events that arrived together, where writing each chunk as read
        // cost a system call per event. Nothing waits for more: only reads that complete at
        // once are gathered (Pingora's body reads resume safely).
        let mut fed = fed;
        while fed.is_ok() && !stream.complete && pass.len() < GATHER_MAX {
            match answer.session.read_response_body().now_or_never() {
                Some(Ok(Some(more))) => fed = stream.feed(&more, &mut pass),
                Some(r) => {
                    ahead = Some(r);
                    break;
                }
                None => break,
            }
        }
        if let Err(f) = fed {
            failed = Some(fault_error(f, &p.name));
            out.tail = Some(pass.freeze());
            break;
        }
        if stream.complete {
            // Whole at its terminal event, whatever the upstream's connection does next: the
            // end goes out once its settlement is journaled (`record`). The framing's end may
            // already be here, and the connection then goes back to the pool.
            if !answer.session.response_done() {
                let _ = answer.session.read_response_body().now_or_never();
            }
            out.tail = Some(pass.freeze());
            break;
        }
        if pass.is_empty() {
            continue;
        }
        ctx.first_byte.get_or_insert_with(Instant::now);
        if write_body(session, pass.freeze(), false).await.is_err() {
            // The client left: stop the upstream (the session is not reused) and bill what
            // reached the client, not the events of the write that failed.
            stream.tally.undeliver(delivered);
            out.error_code = Some("client_disconnected".into());
            answer.session.shutdown().await;
            break;
        }
        delivered = stream.tally.mark();
    }
    if let Some(e) = failed {
        let mut tail = BytesMut::from(&out.tail.take().unwrap_or_default()[..]);
        tail.extend_from_slice(&stream.error_event(&e));
        out.tail = Some(tail.freeze());
        out.error_code = Some(e.code().to_owned());
        if stream.tally.events == 0 {
            // Nothing was generated: the request costs nothing.
            return;
        }
    }
    if out.tail.as_ref().is_some_and(|t| !t.is_empty()) {
        ctx.first_byte.get_or_insert_with(Instant::now);
    }
    let t = &stream.tally;
    out.usage = t.usage.unwrap_or_else(|| Usage {
        output_tokens: t.counted_output_tokens(),
        ..t.input.unwrap_or_else(|| Usage {
            input_tokens: req.counted_input_tokens(),
            ..Usage::default()
        })
    });
}
