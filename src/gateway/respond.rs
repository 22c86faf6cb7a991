//! Writing answers to the client: the response header every answer carries (request id, rate
//! limits, retry advice, CORS), error answers in the client's dialect, and stream writes.

use super::ctx::RequestCtx;
use super::error::ApiError;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// The headers a browser app may read from an answer (`[gateway.cors]`).
const EXPOSED: &str = "x-request-id, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, retry-after, retry-after-ms";

pub fn response_header(
    status: u16,
    content_type: &str,
    ctx: &RequestCtx,
    len: Option<usize>,
) -> pingora::Result<Box<ResponseHeader>> {
    // Room for exactly the headers below and the two Pingora adds (`date`, `connection`): the
    // header stays in memory as long as the answer (minutes for a stream), and a map that grows
    // keeps twice the room. Names go out in lower case (`build_no_case`), which HTTP allows;
    // keeping their case would take a second map of the same size.
    let retry = ctx.upstream_retry();
    let headers = 4
        + if ctx.rate_headers.is_some() { 6 } else { 0 }
        + if ctx.retry_after_ms().is_some() { 2 } else { 0 }
        + retry.map_or(0, |r| {
            usize::from(r.seconds.is_some()) + usize::from(r.ms.is_some())
        })
        + if ctx.cors_origin().is_some() { 3 } else { 0 }
        + if len.is_some() { 1 } else { 2 };
    let mut h = ResponseHeader::build_no_case(status, Some(headers))?;
    h.insert_header("content-type", content_type)?;
    h.insert_header("x-request-id", &ctx.request_id)?;
    if let Some(r) = &ctx.rate_headers {
        use super::limits::reset_text;
        h.insert_header("x-ratelimit-limit-requests", r.limit_requests.to_string())?;
        h.insert_header(
            "x-ratelimit-remaining-requests",
            r.remaining_requests.to_string(),
        )?;
        h.insert_header(
            "x-ratelimit-reset-requests",
            reset_text(r.reset_requests_ms),
        )?;
        h.insert_header("x-ratelimit-limit-tokens", r.limit_tokens.to_string())?;
        h.insert_header(
            "x-ratelimit-remaining-tokens",
            r.remaining_tokens.to_string(),
        )?;
        h.insert_header("x-ratelimit-reset-tokens", reset_text(r.reset_tokens_ms))?;
    }
    if let Some(ms) = ctx.retry_after_ms() {
        // Both: the OpenAI SDKs wait `retry-after-ms` exactly when it is there, other clients
        // read whole seconds (rounded up, so a client that waits them is admitted).
        h.insert_header("retry-after", ms.div_ceil(1000).max(1).to_string())?;
        h.insert_header("retry-after-ms", ms.to_string())?;
    }
    if let Some(r) = retry {
        if let Some(s) = &r.seconds {
            h.insert_header("retry-after", s.as_str())?;
        }
        if let Some(ms) = &r.ms {
            h.insert_header("retry-after-ms", ms.as_str())?;
        }
    }
    if let Some(origin) = ctx.cors_origin() {
        h.insert_header("access-control-allow-origin", origin.to_owned())?;
        h.insert_header("vary", "origin")?;
        h.insert_header("access-control-expose-headers", EXPOSED)?;
    }
    match len {
        Some(n) => h.insert_header("content-length", n.to_string())?,
        None => {
            // Chunked framing keeps the connection reusable; without it the body would end only
            // when the connection closes.
            h.insert_header("transfer-encoding", "chunked")?;
            // For a reverse proxy in front (nginx), which would otherwise buffer the stream.
            // (No `cache-control`: an answer to a POST is not cached without one.)
            h.insert_header("x-accel-buffering", "no")?;
        }
    }
    Ok(Box::new(h))
}

/// Writes an error response (before anything else was written), in the client's dialect.
pub async fn write_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    e: &ApiError,
) -> pingora::Result<()> {
    ctx.status = e.status();
    let body = ctx.dialect.error_body(e);
    if let ApiError::RateLimited { retry_after_ms, .. } = e {
        ctx.set_retry_after_ms(*retry_after_ms);
    }
    let h = response_header(e.status(), "application/json", ctx, Some(body.len()))?;
    session.write_response_header(h, false).await?;
    session.write_response_body(Some(body), true).await
}

/// Writes a whole JSON answer.
pub async fn write_json(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: Bytes,
) -> pingora::Result<()> {
    ctx.status = status;
    let h = response_header(status, "application/json", ctx, Some(body.len()))?;
    session.write_response_header(h, false).await?;
    session.write_response_body(Some(body), true).await
}

/// Writes part of a stream to the client. Boxed: Pingora's write is the largest state machine
/// in the relay (768 bytes), and awaited in place it would size the relay's state, which an open
/// stream keeps while it waits on the upstream, not just while it writes.
pub async fn write_body(session: &mut Session, data: Bytes, end: bool) -> pingora::Result<()> {
    let writing = Box::pin(session.write_response_body(Some(data), end));
    writing.await
}
