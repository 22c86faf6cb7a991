//! The `ProxyHttp` implementation, as a table of contents: each route is one call into the module
//! named after it. Every request is answered in `request_filter` (returning `true`), so Pingora's
//! proxy loop, and its 64 KiB retry-buffer limit on bodies, never handles our traffic.

use super::ctx::RequestCtx;
use super::dialect::Dialect;
use super::error::ApiError;
use super::respond::{write_error, write_json};
use super::routing::Routing;
use super::state::Gateway;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use std::sync::Arc;

/// How long a request that arrives while the gateway starts waits for it to be ready.
const STARTUP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct GatewayService {
    gateway: Arc<Gateway>,
}

impl GatewayService {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        GatewayService { gateway }
    }
}

/// Request metrics, with the route label limited to the routes we serve. A chat request that
/// named a tier (only the chat routes do) uses its tier's handles looked up at start; anything
/// else goes by its labels.
fn observe(live: &Routing, path: &str, ctx: &RequestCtx) {
    let m = &*super::metrics::METRICS;
    let elapsed = ctx.started.elapsed().as_secs_f64();
    let status = ctx.status;
    let chat_route = super::metrics::CHAT_ROUTES.iter().position(|r| *r == path);
    if let (Some(t), Some(r)) = (ctx.tier, chat_route) {
        let tm = &live.tier_metrics[t];
        tm.latency[r].observe(elapsed);
        if let Some(first) = ctx.first_byte {
            tm.ttft
                .observe(first.duration_since(ctx.started).as_secs_f64());
        }
        if status == 200 {
            tm.ok[r].inc();
        } else {
            m.requests
                .with_label_values(&[path, live.conf.tiers[t].name.as_str(), &status.to_string()])
                .inc();
        }
        return;
    }
    let route = match path {
        "/v1/chat/completions"
        | "/v1/messages"
        | "/v1/responses"
        | "/v1/models"
        | "/v1/completions"
        | "/v1/messages/count_tokens"
        | "/healthz"
        | "/readyz" => path,
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    };
    m.requests
        .with_label_values(&[route, "", &status.to_string()])
        .inc();
    m.latency.with_label_values(&[route, ""]).observe(elapsed);
}

/// `GET /v1/models[/{id}]` for the key presented.
async fn models(
    gw: &Gateway,
    live: &Routing,
    session: &Session,
) -> std::result::Result<Bytes, ApiError> {
    let presented = super::auth::presented_key(session.req_header());
    let caller = gw
        .keys
        .authenticate(
            presented,
            gw.store(),
            crate::time::now_ms(),
            &live.conf.admin.support_email,
        )
        .await?;
    match session.req_header().uri.path().strip_prefix("/v1/models/") {
        None => Ok(super::models::list(&live.models, &caller)),
        Some(id) => super::models::retrieve(&live.models, &caller, id),
    }
}

/// What the request head alone refuses, before any of the body is read: an HTTP/1.1 request
/// without `Host` (RFC 9112, section 3.2: 400), and a declared `Content-Length` above
/// `gateway.max_request_body_bytes` (413).
fn refused_by_head(req: &pingora::http::RequestHeader, limit: u64) -> Option<ApiError> {
    if req.version == http::Version::HTTP_11 && !req.headers.contains_key(http::header::HOST) {
        return Some(ApiError::InvalidRequest {
            message: "An HTTP/1.1 request must carry a Host header (RFC 9112, section 3.2).".into(),
            param: None,
        });
    }
    let declared = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    declared
        .filter(|n| *n > limit)
        .map(|_| ApiError::BodyTooLarge { limit_bytes: limit })
}

/// A refused request is answered at once, before its body, with `Connection: close`. What the
/// client goes on sending is then read and dropped, up to [`LINGER_BYTES`] and for up to
/// [`LINGER`]: a client that writes its whole body before reading (most HTTP libraries) still
/// gets the answer instead of a reset connection; a client that trickles is cut off.
const LINGER_BYTES: u64 = 64 * 1024 * 1024;
const LINGER: std::time::Duration = std::time::Duration::from_secs(10);

async fn refuse_by_head(session: &mut Session, ctx: &mut RequestCtx, e: ApiError) -> Result<()> {
    session.set_keepalive(None);
    write_error(session, ctx, &e).await?;
    let mut seen = 0u64;
    let lingering = tokio::time::timeout(LINGER, async {
        while seen < LINGER_BYTES {
            match session.read_request_body().await {
                Ok(Some(chunk)) => seen += chunk.len() as u64,
                _ => break,
            }
        }
    });
    let _ = lingering.await;
    Ok(())
}

/// The routes served, by path: what a wrong method on one of them is told.
fn known_path(p: &str) -> bool {
    matches!(
        p,
        "/healthz"
            | "/readyz"
            | "/v1/models"
            | "/v1/chat/completions"
            | "/v1/messages"
            | "/v1/responses"
            | "/v1/embeddings"
    ) || p.starts_with("/v1/models/")
}

/// A CORS preflight for an allowed origin: 204 with what the SDKs send (`[gateway.cors]`).
async fn preflight(live: &Routing, session: &mut Session, origin: &str) -> Result<()> {
    let mut h = ResponseHeader::build_no_case(204, Some(8))?;
    h.insert_header("access-control-allow-origin", origin)?;
    h.insert_header("vary", "origin")?;
    h.insert_header("access-control-allow-methods", "GET, POST, OPTIONS")?;
    // The headers the browser says the request will carry (the SDKs add their own x-stainless-*
    // ones): a key is what authorizes a request, not its headers.
    let asked = session
        .req_header()
        .headers
        .get("access-control-request-headers")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 4096)
        .unwrap_or("authorization, content-type")
        .to_owned();
    h.insert_header("access-control-allow-headers", asked)?;
    h.insert_header(
        "access-control-max-age",
        live.conf.gateway.cors.max_age_s.to_string(),
    )?;
    h.insert_header("content-length", "0")?;
    session.write_response_header(Box::new(h), true).await
}

impl GatewayService {
    /// Answers one request whose head has been read (every request is answered here: see
    /// `conn`, which calls this for each request on a client connection, and the `ProxyHttp`
    /// implementation below, whose `request_filter` is this).
    //
    // Every path but the chat route's is boxed where it writes: this future is sized for its
    // largest state and an open stream keeps it whole, so only the chat route's small outer
    // future is awaited in place.
    pub async fn answer(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        super::conn::head_done(session);
        // The conf this request runs under, to its end (a reload changes nothing for it).
        let live = self.gateway.routing();
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        // An idle kept-alive connection is closed after this long (unless the client asked for
        // `Connection: close`, which stays).
        session.set_keepalive(Some(live.conf.gateway.keepalive_idle_s));
        let limit = live.conf.gateway.max_request_body_bytes.get();
        if let Some(e) = refused_by_head(session.req_header(), limit) {
            let refusing = Box::pin(refuse_by_head(session, ctx, e));
            refusing.await?;
            observe(&live, &path, ctx);
            return Ok(());
        }
        if !self.gateway.ready.is_set() && path != "/healthz" && path != "/readyz" {
            // Starting: wait for the store and the caches rather than refuse (boxed, in a block:
            // the rare wait keeps its state out of this future).
            let ready = {
                let waiting = Box::pin(tokio::time::timeout(
                    STARTUP_WAIT,
                    self.gateway.ready.wait(),
                ));
                waiting.await.is_ok()
            };
            if !ready {
                let writing = Box::pin(write_error(session, ctx, &ApiError::StoreUnavailable));
                writing.await?;
                observe(&live, &path, ctx);
                return Ok(());
            }
        }
        if !live.conf.gateway.cors.allowed_origins.is_empty()
            && let Some(origin) = session
                .req_header()
                .headers
                .get("origin")
                .and_then(|v| v.to_str().ok())
                .filter(|o| live.conf.gateway.cors.allows(o))
        {
            ctx.set_cors_origin(origin);
        }
        let routed: std::result::Result<(), ApiError> = match (method.as_str(), path.as_str()) {
            (
                "POST",
                "/v1/chat/completions" | "/v1/messages" | "/v1/responses" | "/v1/embeddings",
            ) => {
                ctx.dialect = match path.as_str() {
                    "/v1/messages" => Dialect::Messages,
                    "/v1/responses" => Dialect::Responses,
                    "/v1/embeddings" => Dialect::Embeddings,
                    _ => Dialect::Chat,
                };
                let r = super::chat::handle(&self.gateway, &live, session, ctx).await;
                if r.is_ok() && ctx.status == 0 {
                    ctx.status = 200;
                }
                r
            }
            ("OPTIONS", p) if known_path(p) && ctx.cors_origin().is_some() => {
                let origin = ctx.cors_origin().unwrap_or_default().to_owned();
                ctx.status = 204;
                let answering = Box::pin(preflight(&live, session, &origin));
                answering.await?;
                Ok(())
            }
            ("GET", "/readyz") => {
                let (status, body) = self.gateway.readiness();
                let responding = Box::pin(write_json(session, ctx, status, Bytes::from(body)));
                responding.await?;
                Ok(())
            }
            ("GET", "/healthz") => {
                let (status, body) = self.gateway.health();
                let responding =
                    Box::pin(write_json(session, ctx, status, Bytes::from_static(body)));
                responding.await?;
                Ok(())
            }
            ("GET", p) if p == "/v1/models" || p.starts_with("/v1/models/") => {
                let models = Box::pin(models(&self.gateway, &live, session));
                match models.await {
                    Ok(body) => {
                        let responding = Box::pin(write_json(session, ctx, 200, body));
                        responding.await?;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            (_, "/v1/completions") => Err(ApiError::NotServed {
                path: "/v1/completions",
                instead: "legacy text completions are not offered; send the prompt as a user message to /v1/chat/completions or as `input` to /v1/responses",
            }),
            (_, "/v1/messages/count_tokens") => Err(ApiError::NotServed {
                path: "/v1/messages/count_tokens",
                instead: "token counting is not offered; every answer's `usage` has the exact counts the request was billed for",
            }),
            (_, p) if known_path(p) => Err(ApiError::MethodNotAllowed {
                method: method.to_string(),
                path: path.clone(),
            }),
            _ => Err(ApiError::NotFound { path: path.clone() }),
        };
        if let Err(e) = routed {
            let writing = Box::pin(write_error(session, ctx, &e));
            writing.await?;
        }
        observe(&live, &path, ctx);
        Ok(())
    }
}

/// The gateway as a Pingora proxy application: `request_filter` answers every request, so
/// Pingora's proxy loop never runs. The gateway's own listener does not go through this (its
/// connection loop in `conn` calls [`GatewayService::answer`] directly, without the proxy
/// layer's per-request state); it is here for any `HttpProxy` that mounts the service.
#[async_trait]
impl ProxyHttp for GatewayService {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx::default()
    }

    /// None: Pingora adds a response-compression module by default, off, which every request
    /// would still carry and call.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        self.answer(session, ctx).await.map(|()| true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        // Unreachable: request_filter answers every request.
        Error::e_explain(
            ErrorType::InternalError,
            "requests are answered in request_filter",
        )
    }
}
