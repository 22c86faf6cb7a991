//! A model request, top to bottom, whatever its dialect (chat completions, Messages,
//! Responses): key (1), body and tier (3), limits (2), holds (4), upstream (5), relay (6),
//! settle (7). Each step is a call into the module named after it; this file is their table of
//! contents. The gateway writes the response itself and tells Pingora it is done, so bodies of
//! any size reach the upstream.

use super::ctx::RequestCtx;
use super::dialect::{Dialect, messages};
use super::error::ApiError;
use super::metrics::METRICS;
use super::relay::{MAX_JSON_ANSWER, Outcome, relay};
use super::request::{ChatRequest, parse_request, read_body};
use super::respond::write_body;
use super::routing::Routing;
use super::state::Gateway;
use super::upstream::{self, Answer};
use crate::money::{NanoUsd, Rounding};
use crate::store::{Settlement, UsageRecord};
use pingora::proxy::Session;
use std::time::Instant;

pub async fn handle(
    gw: &Gateway,
    live: &Routing,
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
        let starting = Box::pin(start(gw, live, session, ctx));
        starting.await
    }?;
    let result = match started {
        // Taken apart, so the answer moves into the relay whole rather than leaving its slot in
        // this future's state.
        Ok(Started { req, answer, cost }) => {
            let out = {
                let relaying = Box::pin(relay(gw, live, session, ctx, &req, answer));
                relaying.await
            };
            Ok(cost.settle(&live.conf, req.tier, out))
        }
        Err(e) => Err(e),
    };
    let (outcome, result) = match result {
        Ok(o) => (o, Ok(())),
        Err(e) => (Outcome::failed(&e), Err(e)),
    };
    let recording = Box::pin(record(gw, live, session, ctx, &caller, outcome));
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
        let t = &conf.tiers[tier];
        let cost = out
            .usage
            .cost(&t.prices, &t.cache, Rounding::FavourCustomer)
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
    live: &Routing,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(super::auth::Caller, Result<Started, ApiError>), ApiError> {
    let conf = &live.conf;
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
    let body = read_body(
        session,
        conf.gateway.max_request_body_bytes.get(),
        conf.gateway.body_read_timeout,
    )
    .await;
    let started = async {
        let mut req = parse_request(conf, ctx.dialect, body?)?;
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
        // Translated once for the tier's upstreams that speak Messages to a client that does
        // not; fields they could not honour are refused here, before anything is held.
        let for_messages = if req.client != Dialect::Messages
            && tier.upstreams.iter().any(|u| {
                u.enabled
                    && Dialect::of_upstream(&conf.providers[u.provider], req.client)
                        == Dialect::Messages
            }) {
            let cap = u64::from(tier.default_max_output_tokens.get());
            Some(messages::request_from_chat(&req.body, req.stream, cap)?)
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
        let health = live.health.tier(req.tier);
        let order = upstream::order(
            &tier.upstreams,
            &live.endpoints,
            &live.picks[req.tier],
            health,
            now,
        );
        if order.is_empty() {
            return Err(ApiError::NoUpstream {
                tier: tier.name.clone(),
            });
        }
        let sent_at = Instant::now();
        live.tier_metrics[req.tier]
            .overhead
            .observe(ctx.started.elapsed().as_secs_f64());
        let answer = upstream::send(
            conf,
            &gw.connector,
            &live.endpoints,
            &tier.upstreams,
            &order,
            health,
            |u| {
                let speaks = Dialect::of_upstream(&conf.providers[u.provider], req.client);
                match (&for_messages, speaks) {
                    (Some(v), Dialect::Messages) => messages::with_model(v, &u.model),
                    _ => req.upstream_body(speaks, &u.model),
                }
            },
            req.client,
            req.stream,
            MAX_JSON_ANSWER,
        )
        .await?;
        live.tier_metrics[req.tier].upstream_latency[answer.upstream]
            .observe(answer.first_byte.duration_since(sent_at).as_secs_f64());
        drop(for_messages);
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
    live: &Routing,
    session: &mut Session,
    ctx: &RequestCtx,
    caller: &super::auth::Caller,
    o: Outcome,
) {
    let finished = crate::time::now_ms();
    // All the request costs: what its lease pays and what is left for the balance.
    let charged = o.billed.checked_add(o.over_hold).unwrap_or(o.billed);
    if let Some(t) = ctx.tier {
        let m = &live.tier_metrics[t];
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
            .map(|t| live.conf.tiers[t].name.clone())
            .unwrap_or_default(),
        provider: o.provider,
        upstream_model: o.model,
        stream: ctx.stream,
        input_tokens: o.usage.input_tokens as i64,
        output_tokens: o.usage.output_tokens as i64,
        cached_input_tokens: o.usage.cached_input_tokens as i64,
        cache_write_tokens: o.usage.cache_write_tokens as i64,
        reasoning_tokens: o.usage.reasoning_tokens as i64,
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
