//! Writing answers to the client: the response header every answer carries (request id, rate
//! limits, retry advice, CORS), error answers in the client's dialect, and stream writes.

use super::ctx::RequestCtx;
use super::error::ApiError;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// The headers a browser app may read from an answer (`[gateway.cors]`).
const EXPOSED: &str = "x-request-id, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, retry-after, retry-after-ms";

/// Header names, parsed once (at compile time): names given to `ResponseHeader::insert_header`
/// are parsed again on every call.
mod name {
    use http::HeaderName;
    pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
    pub const REMAINING_REQUESTS: HeaderName =
        HeaderName::from_static("x-ratelimit-remaining-requests");
    pub const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
    pub const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
    pub const REMAINING_TOKENS: HeaderName =
        HeaderName::from_static("x-ratelimit-remaining-tokens");
    pub const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
    pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
    pub const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");
}

pub fn response_header(
    status: u16,
    content_type: &'static str,
    ctx: &RequestCtx,
    len: Option<usize>,
) -> pingora::Result<Box<ResponseHeader>> {
    use http::HeaderValue;
    use http::header::{
        ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, CONTENT_LENGTH, CONTENT_TYPE,
        RETRY_AFTER, TRANSFER_ENCODING, VARY,
    };
    let invalid =
        |_| pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "invalid value");
    // Room for exactly the headers below and the two Pingora adds (`date`, `connection`): the
    // header stays in memory as long as the answer (minutes for a stream), and a map that grows
    // keeps twice the room. Names go out in lower case, which HTTP allows; keeping their case
    // would take a second map of the same size. The map is filled directly (names parsed once,
    // numbers written without a string in between) and handed to Pingora without a case map.
    let retry = ctx.upstream_retry();
    let headers = 4
        + if ctx.rate_headers.is_some() { 6 } else { 0 }
        + if ctx.retry_after_ms().is_some() { 2 } else { 0 }
        + retry.map_or(0, |r| {
            usize::from(r.seconds.is_some()) + usize::from(r.ms.is_some())
        })
        + if ctx.cors_origin().is_some() { 3 } else { 0 }
        + if len.is_some() { 1 } else { 2 };
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::from_u16(status).map_err(|_| {
        pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "invalid status")
    })?;
    let h = &mut parts.headers;
    h.reserve(headers);
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        name::REQUEST_ID,
        HeaderValue::from_str(&ctx.request_id).map_err(invalid)?,
    );
    if let Some(r) = &ctx.rate_headers {
        // Limit, remaining and reset, for requests and for tokens.
        let windows = [
            (
                [
                    name::LIMIT_REQUESTS,
                    name::REMAINING_REQUESTS,
                    name::RESET_REQUESTS,
                ],
                [r.limit_requests, r.remaining_requests, r.reset_requests_ms],
            ),
            (
                [
                    name::LIMIT_TOKENS,
                    name::REMAINING_TOKENS,
                    name::RESET_TOKENS,
                ],
                [r.limit_tokens, r.remaining_tokens, r.reset_tokens_ms],
            ),
        ];
        for ([limit, remaining, reset], [l, left, reset_ms]) in windows {
            h.insert(limit, HeaderValue::from(l));
            h.insert(remaining, HeaderValue::from(left));
            let text = super::limits::reset_text(reset_ms);
            h.insert(reset, HeaderValue::try_from(text).map_err(invalid)?);
        }
    }
    if let Some(ms) = ctx.retry_after_ms() {
        // Both: the OpenAI SDKs wait `retry-after-ms` exactly when it is there, other clients
        // read whole seconds (rounded up, so a client that waits them is admitted).
        h.insert(RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000).max(1)));
        h.insert(name::RETRY_AFTER_MS, HeaderValue::from(ms));
    }
    if let Some(r) = retry {
        if let Some(s) = &r.seconds {
            h.insert(RETRY_AFTER, HeaderValue::from_str(s).map_err(invalid)?);
        }
        if let Some(ms) = &r.ms {
            h.insert(
                name::RETRY_AFTER_MS,
                HeaderValue::from_str(ms).map_err(invalid)?,
            );
        }
    }
    if let Some(origin) = ctx.cors_origin() {
        h.insert(
            ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_str(origin).map_err(invalid)?,
        );
        h.insert(VARY, HeaderValue::from_static("origin"));
        h.insert(
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED),
        );
    }
    match len {
        Some(n) => {
            h.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            // Chunked framing keeps the connection reusable; without it the body would end only
            // when the connection closes.
            h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            // For a reverse proxy in front (nginx), which would otherwise buffer the stream.
            // (No `cache-control`: an answer to a POST is not cached without one.)
            h.insert(name::X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
        }
    }
    Ok(Box::new(ResponseHeader::from(parts)))
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
