//! `POST /v1/chat/completions`, top to bottom: key (1), body and tier (3), hold (4), upstream (5),
//! relay (6), settle (7). Limits (2) arrive with issue #5. The gateway writes the response itself
//! and tells Pingora it is done, so bodies of any size reach the upstream.

use super::error::ApiError;
use super::inbound::ClientFormat;
use super::metrics::METRICS;
use super::relay::{SseRelay, Usage, count_tokens, counted_json_output_tokens, usage_of};
use super::request::{ChatRequest, parse_chat, read_body};
use super::service::RequestCtx;
use super::state::Gateway;
use super::upstream::{self, Answer};
use crate::conf::ProviderKind;
use crate::money::{NanoUsd, Rounding};
use crate::store::{Settlement, UsageRecord};
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use std::time::Instant;

/// Largest non-streaming answer we buffer from an upstream.
const MAX_JSON_ANSWER: usize = 64 * 1024 * 1024;

/// What became of a request after authentication, for its usage record.
struct Outcome {
    status: u16,
    error_code: Option<String>,
    usage: Usage,
    /// Paid from the lease (see `Hold::settle`).
    billed: NanoUsd,
    /// Cost above what the lease could back, for the balance (see `Settlement::over_hold`).
    over_hold: NanoUsd,
    provider_cost: NanoUsd,
    provider: Option<String>,
    model: Option<String>,
    attempts: u32,
    /// The answer's last bytes, written after the settlement is journaled.
    tail: Option<Bytes>,
}

pub async fn handle(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), ApiError> {
    // Three phases, each boxed: this future lives as long as the answer (minutes for a stream)
    // and is sized for its largest state. Awaited in place, key lookup, body reading, limits,
    // holds and sending (6.9 KB of state together) stayed in every open stream; boxed, they are
    // freed once the upstream answers, and an open stream keeps what settling needs and a
    // pointer to the relay.
    // (Each box lives in a block of its own, so it is freed once awaited: a box bound in this
    // scope would be kept, finished, until the request ends. It is made in a statement of its
    // own: the unboxed future, as a temporary of the awaiting statement, would stay in this
    // state.)
    // Until this request's settlement is queued for the writer: what a graceful shutdown waits for.
    let _in_flight = gw.request_started();
    let (caller, started) = {
        let starting = Box::pin(start(gw, session, ctx));
        starting.await
    }?;
    let result = match started {
        // Taken apart, so the answer moves into the relay whole rather than leaving its slot in
        // this future's state.
        Ok(Started { req, answer, cost }) => {
            let out = {
                let relaying = Box::pin(relay(gw, session, ctx, &req, answer));
                relaying.await
            };
            Ok(cost.settle(&gw.conf, req.tier, out))
        }
        Err(e) => Err(e),
    };
    let (outcome, result) = match result {
        Ok(o) => (o, Ok(())),
        Err(e) => (
            Outcome {
                status: e.status(),
                error_code: Some(e.code().to_owned()),
                usage: Usage::default(),
                billed: NanoUsd::ZERO,
                over_hold: NanoUsd::ZERO,
                provider_cost: NanoUsd::ZERO,
                provider: None,
                model: None,
                attempts: 0,
                tail: None,
            },
            Err(e),
        ),
    };
    let recording = Box::pin(record(gw, session, ctx, &caller, outcome));
    recording.await;
    result
}

/// A request on its way: sent, answered, with its holds taken.
struct Started {
    req: ChatRequest,
    answer: Answer,
    cost: Held,
}

/// What settling a request needs: its credit and spend-cap holds and its limiter admission.
struct Held {
    hold: super::hold::Hold,
    cap_hold: Option<super::spend::CapHold>,
    admission: super::limits::Admission,
}

impl Held {
    /// Settles the holds to what the relay used; a request that failed before any output
    /// costs nothing.
    fn settle(self, conf: &crate::conf::Conf, tier: usize, out: Outcome) -> Outcome {
        let Held {
            hold,
            cap_hold,
            admission,
        } = self;
        let cost = conf.tiers[tier]
            .prices
            .cost(
                out.usage.input_tokens,
                out.usage.output_tokens,
                Rounding::FavourCustomer,
            )
            .unwrap_or(hold.amount());
        let (billed, over_hold) = if out.status < 400 || out.usage.output_tokens > 0 {
            hold.settle(cost)
        } else {
            hold.settle(NanoUsd::ZERO)
        };
        if let Some(c) = cap_hold {
            c.settle(billed.checked_add(over_hold).unwrap_or(billed));
        }
        admission.finish(out.usage.input_tokens + out.usage.output_tokens);
        Outcome {
            billed,
            over_hold,
            ..out
        }
    }
}

/// Key (1), body and tier (3), limits (2), holds (4), upstream (5). An error before the key is
/// known is returned as is (nothing to record); one after it comes with the caller, to be
/// recorded.
async fn start(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(super::auth::Caller, Result<Started, ApiError>), ApiError> {
    let conf = &gw.conf;
    let now = crate::time::now_ms();
    let presented = super::auth::presented_key(session.req_header()).map(str::to_owned);
    let caller = gw
        .keys
        .authenticate(
            presented.as_deref(),
            gw.store(),
            now,
            &conf.admin.support_email,
        )
        .await?;
    let body = read_body(session, conf.gateway.max_request_body_bytes.get()).await;
    let started = async {
        let body = match ctx.format {
            ClientFormat::Anthropic => super::inbound::to_openai(&body?)?,
            ClientFormat::OpenAi => body?,
        };
        let mut req = parse_chat(conf, &body)?;
        ctx.stream = req.stream;
        let tier = &conf.tiers[req.tier];
        ctx.tier = Some(req.tier);
        if let Some(allowed) = &caller.allowed_models
            && !allowed.contains(&tier.name)
        {
            return Err(ApiError::ModelNotAllowed {
                model: tier.name.clone(),
            });
        }
        let worst = tier
            .prices
            .cost(
                req.input_upper_bound,
                req.max_output_tokens,
                Rounding::FavourCustomer,
            )
            .map_err(|_| {
                ApiError::invalid(
                    "max_tokens",
                    "The request's worst-case cost is out of range.",
                )
            })?;
        // Translated once for the tier's Anthropic upstreams; fields they could not honour are
        // refused here, before anything is held.
        let for_anthropic = if tier
            .upstreams
            .iter()
            .any(|u| u.enabled && conf.providers[u.provider].kind == ProviderKind::Anthropic)
        {
            let cap = u64::from(tier.default_max_output_tokens.get());
            Some(super::anthropic::translate(&req.body, req.stream, cap)?)
        } else {
            None
        };
        let limits = super::limits::Effective::of(&caller, conf, now);
        let admission = match gw
            .limits
            .admit(&caller, &limits, req.input_upper_bound, &ctx.request_id)
            .await
        {
            Ok(a) => a,
            Err(super::limits::Denied::Over(r)) => {
                ctx.rate_headers = Some(r.headers);
                METRICS
                    .rate_limited
                    .with_label_values(&[r.which.kind()])
                    .inc();
                return Err(ApiError::RateLimited {
                    which: r.which,
                    limit: r.limit,
                    retry_after_ms: r.retry_after_ms,
                });
            }
            Err(super::limits::Denied::Unavailable) => return Err(ApiError::LimiterUnavailable),
        };
        ctx.rate_headers = Some(admission.headers);
        let cap_hold = match caller.spend_cap {
            Some(cap) => Some(
                gw.spend
                    .hold(caller.key_id, cap, worst, gw.store(), &gw.instance_id)
                    .await?,
            ),
            None => None,
        };
        let hold = gw
            .credit
            .hold(caller.account_id, worst, gw.store(), &gw.instance_id, now)
            .await?;
        let health = gw.health.tier(req.tier);
        let order = upstream::order(&tier.upstreams, &gw.picks[req.tier], health, now);
        if order.is_empty() {
            return Err(ApiError::NoUpstream {
                tier: tier.name.clone(),
            });
        }
        let sent_at = Instant::now();
        gw.tier_metrics[req.tier]
            .overhead
            .observe(ctx.started.elapsed().as_secs_f64());
        let answer = upstream::send(
            conf,
            &gw.connector,
            &gw.endpoints,
            &tier.upstreams,
            &order,
            health,
            |u| match conf.providers[u.provider].kind {
                ProviderKind::Anthropic => for_anthropic
                    .as_ref()
                    .map(|v| super::anthropic::with_model(v, &u.model))
                    .unwrap_or_default(),
                _ => req.upstream_body(&u.model),
            },
            req.stream,
            MAX_JSON_ANSWER,
        )
        .await?;
        METRICS
            .upstream_latency
            .with_label_values(&[
                answer.upstream.provider_name.as_str(),
                answer.upstream.model.as_str(),
            ])
            .observe(answer.first_byte.duration_since(sent_at).as_secs_f64());
        drop(for_anthropic);
        req.sent();
        Ok(Started {
            req,
            answer,
            cost: Held {
                hold,
                cap_hold,
                admission,
            },
        })
    }
    .await;
    Ok((caller, started))
}

/// Records the request: its settlement is journaled before the answer's last bytes go out (so a
/// crash after the client has the whole answer cannot lose it), then queued for the writer.
async fn record(
    gw: &Gateway,
    session: &mut Session,
    ctx: &RequestCtx,
    caller: &super::auth::Caller,
    o: Outcome,
) {
    let finished = crate::time::now_ms();
    // All the request costs: what its lease pays and what is left for the balance.
    let charged = o.billed.checked_add(o.over_hold).unwrap_or(o.billed);
    if let Some(t) = ctx.tier {
        let m = &gw.tier_metrics[t];
        m.input_tokens.inc_by(o.usage.input_tokens);
        m.output_tokens.inc_by(o.usage.output_tokens);
        m.billed_nano.inc_by(charged.nanos().max(0) as u64);
        m.provider_cost_nano
            .inc_by(o.provider_cost.nanos().max(0) as u64);
    }
    let record = UsageRecord {
        request_id: ctx.request_id.clone(),
        account_id: caller.account_id,
        key_id: caller.key_id,
        tier: ctx
            .tier
            .map(|t| gw.conf.tiers[t].name.clone())
            .unwrap_or_default(),
        provider: o.provider,
        upstream_model: o.model,
        stream: ctx.stream,
        input_tokens: o.usage.input_tokens as i64,
        output_tokens: o.usage.output_tokens as i64,
        provider_cost: o.provider_cost,
        billed: charged,
        http_status: i64::from(o.status),
        error_code: o.error_code,
        attempts: i64::from(o.attempts),
        latency_ms: ctx.started.elapsed().as_millis() as i64,
        ttft_ms: ctx
            .first_byte
            .map(|t| t.duration_since(ctx.started).as_millis() as i64),
        started_at: ctx.started_ms,
        finished_at: finished,
    };
    let settlement = Settlement {
        billed: o.billed,
        over_hold: o.over_hold,
        capped: caller.spend_cap.is_some(),
        record,
    };
    let ticket = super::nodes::journal_settlement(gw.journal.get(), &settlement);
    if let Some(tail) = o.tail {
        let _ = write_body(session, tail, true).await;
    }
    if gw
        .settlements
        .send(super::state::Queued { settlement, ticket })
        .await
        .is_err()
    {
        tracing::error!(request_id = %ctx.request_id, "usage queue closed; record lost");
    }
}

fn response_header(
    status: u16,
    content_type: &str,
    ctx: &RequestCtx,
    len: Option<usize>,
) -> pingora::Result<Box<ResponseHeader>> {
    // Room for exactly the headers below and the two Pingora adds (`date`, `connection`): the
    // header stays in memory as long as the answer (minutes for a stream), and a map that grows
    // keeps twice the room. Names go out in lower case (`build_no_case`), which HTTP allows;
    // keeping their case would take a second map of the same size.
    let headers = 4
        + if ctx.rate_headers.is_some() { 6 } else { 0 }
        + usize::from(ctx.retry_after_s.is_some())
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
    if let Some(s) = ctx.retry_after_s {
        h.insert_header("retry-after", s.to_string())?;
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

/// Reads an upstream's whole body (bounded).
async fn read_all(answer: &mut Answer, timeout: std::time::Duration) -> Result<Bytes, String> {
    answer.session.set_read_timeout(Some(timeout));
    let mut buf = BytesMut::new();
    loop {
        match answer.session.read_response_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > MAX_JSON_ANSWER {
                    return Err("the answer is too large".into());
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => return Err(e.etype().as_str().to_owned()),
        }
    }
}

/// Turns an upstream's refusal into our error shape.
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

/// Relays the answer to the client and returns what was used.
///
/// An `async` block rather than an `async fn`: an `async fn` moves each by-value argument into a
/// second slot of its state, and this state lives as long as the answer, so every open stream
/// would carry a dead copy of the `Answer` (1.3 KB).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep a second copy of `answer` in its state"
)]
fn relay<'a>(
    gw: &'a Gateway,
    session: &'a mut Session,
    ctx: &'a mut RequestCtx,
    req: &'a ChatRequest,
    mut answer: Answer,
) -> impl std::future::Future<Output = Outcome> + Send + 'a {
    async move {
        let p = &gw.conf.providers[answer.upstream.provider];
        let mut out = Outcome {
            status: answer.status,
            error_code: None,
            usage: Usage::default(),
            billed: NanoUsd::ZERO,
            over_hold: NanoUsd::ZERO,
            provider_cost: NanoUsd::ZERO,
            provider: Some(answer.upstream.provider_name.clone()),
            model: Some(answer.upstream.model.clone()),
            attempts: answer.attempts,
            tail: None,
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
                out.status = e.status();
                out.error_code = Some(e.code().to_owned());
                upstream::release(&gw.connector, answer).await;
                let _ = write_error(session, ctx, &e).await;
            });
            refused.await;
            return out;
        }
        if req.stream {
            relay_stream(gw, session, ctx, req, &mut answer, &mut out).await;
        } else {
            let anthropic = p.kind == ProviderKind::Anthropic;
            let json = Box::pin(relay_json(
                session,
                ctx,
                req,
                &mut answer,
                &mut out,
                p.idle_timeout,
                anthropic,
            ));
            json.await;
        }
        out.provider_cost = answer
            .upstream
            .cost
            .cost(
                out.usage.input_tokens,
                out.usage.output_tokens,
                Rounding::Conservative,
            )
            .unwrap_or(NanoUsd::ZERO);
        let released = Box::pin(upstream::release(&gw.connector, answer));
        released.await;
        out
    }
}

async fn relay_json(
    session: &mut Session,
    ctx: &mut RequestCtx,
    req: &ChatRequest,
    answer: &mut Answer,
    out: &mut Outcome,
    timeout: std::time::Duration,
    anthropic: bool,
) {
    let pre_read = answer.body.take();
    let body = match pre_read {
        Some(b) => Ok(b),
        None => read_all(answer, timeout).await,
    };
    let body = match body {
        Ok(b) => b,
        Err(detail) => {
            let e = ApiError::UpstreamUnavailable { detail };
            out.status = e.status();
            out.error_code = Some(e.code().to_owned());
            let _ = write_error(session, ctx, &e).await;
            return;
        }
    };
    let mut v: serde_json::Value = match answer.json.take() {
        Some(v) => v,
        None => serde_json::from_slice(&body).unwrap_or_default(),
    };
    let body = if anthropic {
        v = super::anthropic::response(&v);
        Bytes::from(v.to_string())
    } else {
        body
    };
    out.usage = usage_of(&v).unwrap_or_else(|| Usage {
        input_tokens: count_tokens(&req.prompt_text()),
        output_tokens: counted_json_output_tokens(&v),
    });
    let body = match ctx.format {
        ClientFormat::Anthropic => Bytes::from(super::inbound::message(&v).to_string()),
        ClientFormat::OpenAi => body,
    };
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

async fn relay_stream(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    req: &ChatRequest,
    answer: &mut Answer,
    out: &mut Outcome,
) {
    let p = &gw.conf.providers[answer.upstream.provider];
    let to_anthropic = ctx.format == ClientFormat::Anthropic;
    // An Anthropic client gets the usage in `message_delta`, so the usage chunk is always kept.
    let mut sse = SseRelay::new(req.client_wants_usage || to_anthropic);
    let mut events = to_anthropic.then(super::inbound::EventsFromChunks::default);
    let mut shape = move |b: Bytes| match events.as_mut() {
        Some(e) => e.feed(&b),
        None => b,
    };
    let mut translate =
        (p.kind == ProviderKind::Anthropic).then(super::anthropic::StreamTranslator::default);
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
    let mut delivered = sse.delivered();
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
        match read {
            Ok(Some(chunk)) => {
                let mut pass = relay_chunk(&mut sse, &mut translate, &mut shape, &chunk);
                // What the upstream has already sent goes out in the same write: one system
                // call and one TCP segment for events that arrived together, where writing each
                // chunk as read cost a system call per event. Nothing waits for more: only reads
                // that complete at once are gathered (Pingora's body reads resume safely).
                let mut joined: Option<BytesMut> = None;
                while joined.as_ref().map_or(pass.len(), BytesMut::len) < GATHER_MAX {
                    match answer.session.read_response_body().now_or_never() {
                        Some(Ok(Some(more))) => {
                            let more = relay_chunk(&mut sse, &mut translate, &mut shape, &more);
                            if !more.is_empty() {
                                joined
                                    .get_or_insert_with(|| BytesMut::from(&pass[..]))
                                    .extend_from_slice(&more);
                            }
                        }
                        Some(r) => {
                            ahead = Some(r);
                            break;
                        }
                        None => break,
                    }
                }
                if let Some(j) = joined {
                    pass = j.freeze();
                }
                if pass.is_empty() {
                    continue;
                }
                ctx.first_byte.get_or_insert_with(Instant::now);
                if write_body(session, pass, false).await.is_err() {
                    // The client left: stop the upstream (the session is not reused) and bill
                    // what reached the client, not the events of the write that failed.
                    sse.undeliver(delivered);
                    out.error_code = Some("client_disconnected".into());
                    answer.session.shutdown().await;
                    break;
                }
                delivered = sse.delivered();
            }
            Ok(None) => {
                // The end of the stream goes out once its settlement is journaled (`record`).
                out.tail = Some(shape(sse.finish()));
                break;
            }
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
                break;
            }
        }
    }
    if let Some(e) = failed {
        let mut tail = BytesMut::from(&sse.finish()[..]);
        tail.extend_from_slice(&e.sse_event());
        out.tail = Some(shape(tail.freeze()));
        out.error_code = Some(e.code().to_owned());
        if sse.events == 0 {
            // Nothing was generated: the request costs nothing.
            return;
        }
    }
    out.usage = sse.usage.unwrap_or_else(|| Usage {
        input_tokens: count_tokens(&req.prompt_text()),
        output_tokens: sse.counted_output_tokens(),
    });
}

/// Whether the client has closed its connection (a FIN waiting on the socket), looked at once
/// without waiting: one read of the socket, before the answer's first byte is written.
fn client_left(session: &mut Session) -> bool {
    matches!(
        session.as_mut().read_body_or_idle(true).now_or_never(),
        Some(Err(_))
    )
}

/// Writes part of a stream to the client. Boxed: Pingora's write is the largest state machine
/// in the relay (768 bytes), and awaited in place it would size the relay's state, which an open
/// stream keeps while it waits on the upstream, not just while it writes.
async fn write_body(session: &mut Session, data: Bytes, end: bool) -> pingora::Result<()> {
    let writing = Box::pin(session.write_response_body(Some(data), end));
    writing.await
}

/// Bytes gathered into one write to a streaming client at most.
const GATHER_MAX: usize = 16 * 1024;

/// One chunk from the upstream, through the translators: what the client gets of it now.
fn relay_chunk(
    sse: &mut SseRelay,
    translate: &mut Option<super::anthropic::StreamTranslator>,
    shape: &mut impl FnMut(Bytes) -> Bytes,
    chunk: &[u8],
) -> Bytes {
    shape(match translate.as_mut() {
        Some(t) => sse.feed(&t.feed(chunk)),
        None => sse.feed(chunk),
    })
}

/// Writes an error response (before anything else was written).
pub async fn write_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    e: &ApiError,
) -> pingora::Result<()> {
    ctx.status = e.status();
    let body = match ctx.format {
        ClientFormat::Anthropic => super::inbound::error_body(e),
        ClientFormat::OpenAi => e.body(),
    };
    if let ApiError::RateLimited { retry_after_ms, .. } = e {
        ctx.retry_after_s = Some(retry_after_ms.div_ceil(1000).max(1));
    }
    let h = response_header(e.status(), "application/json", ctx, Some(body.len()))?;
    session.write_response_header(h, false).await?;
    session.write_response_body(Some(body), true).await
}
