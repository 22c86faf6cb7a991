//! The `ProxyHttp` implementation, as a table of contents: each route is one call into the module
//! named after it. Every request is answered in `request_filter` (returning `true`), so Pingora's
//! proxy loop, and its 64 KiB retry-buffer limit on bodies, never handles our traffic.

use super::error::ApiError;
use super::state::Gateway;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use std::sync::Arc;
use std::time::Instant;

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

/// Per-request state: written by the phase named in each comment, read when the request is logged.
#[derive(Debug)]
pub struct RequestCtx {
    /// Set at creation; returned to the client as `x-request-id` and kept in the usage record.
    pub request_id: String,
    pub started: Instant,
    pub started_ms: i64,
    /// The status sent to the client (request_filter).
    pub status: u16,
    /// The tier named by the request, as its index in the conf (chat, step 3).
    pub tier: Option<usize>,
    pub stream: bool,
    /// When the first byte of the answer went to the client (chat, step 6).
    pub first_byte: Option<Instant>,
    /// The `x-ratelimit-*` figures for this answer (chat, step 2).
    pub rate_headers: Option<super::limits::RateHeaders>,
    /// Seconds for `Retry-After` on a 429.
    pub retry_after_s: Option<u64>,
    /// The API shape the client speaks (set by the route).
    pub format: super::inbound::ClientFormat,
}

/// A request id: `req_` and 24 hex digits, the first 12 the time in milliseconds, the rest
/// random. Ids in time order make the store's unique indexes on them (the usage record's
/// request id, the ledger's reference) grow at their end: a batch then dirties a few index pages
/// instead of one page per row, which made usage writing several times cheaper on SQLite.
fn request_id(now_ms: i64) -> String {
    let mut id = [0u8; 12];
    id[..6].copy_from_slice(&now_ms.to_be_bytes()[2..]);
    id[6..].copy_from_slice(&rand::random::<[u8; 6]>());
    format!("req_{}", hex::encode(id))
}

impl Default for RequestCtx {
    fn default() -> Self {
        let now_ms = crate::time::now_ms();
        RequestCtx {
            request_id: request_id(now_ms),
            started: Instant::now(),
            started_ms: now_ms,
            status: 0,
            tier: None,
            stream: false,
            first_byte: None,
            rate_headers: None,
            retry_after_s: None,
            format: super::inbound::ClientFormat::OpenAi,
        }
    }
}

/// Request metrics, with the route label limited to the routes we serve. A chat request that
/// named a tier (only the chat routes do) uses its tier's handles looked up at start; anything
/// else goes by its labels.
fn observe(gw: &Gateway, path: &str, ctx: &RequestCtx) {
    let m = &*super::metrics::METRICS;
    let elapsed = ctx.started.elapsed().as_secs_f64();
    let status = ctx.status;
    let chat_route = super::metrics::CHAT_ROUTES.iter().position(|r| *r == path);
    if let (Some(t), Some(r)) = (ctx.tier, chat_route) {
        let tm = &gw.tier_metrics[t];
        tm.latency[r].observe(elapsed);
        if let Some(first) = ctx.first_byte {
            tm.ttft
                .observe(first.duration_since(ctx.started).as_secs_f64());
        }
        if status == 200 {
            tm.ok[r].inc();
        } else {
            m.requests
                .with_label_values(&[path, gw.conf.tiers[t].name.as_str(), &status.to_string()])
                .inc();
        }
        return;
    }
    let route = match path {
        "/v1/chat/completions" | "/v1/messages" | "/v1/models" | "/healthz" => path,
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    };
    m.requests
        .with_label_values(&[route, "", &status.to_string()])
        .inc();
    m.latency.with_label_values(&[route, ""]).observe(elapsed);
}

/// `GET /v1/models[/{id}]` for the key presented.
async fn models(gw: &Gateway, session: &Session) -> std::result::Result<Bytes, ApiError> {
    let presented = super::auth::presented_key(session.req_header());
    let caller = gw
        .keys
        .authenticate(
            presented,
            gw.store(),
            crate::time::now_ms(),
            &gw.conf.admin.support_email,
        )
        .await?;
    match session.req_header().uri.path().strip_prefix("/v1/models/") {
        None => Ok(super::models::list(&gw.models, &caller)),
        Some(id) => super::models::retrieve(&gw.models, &caller, id),
    }
}

async fn respond_json(session: &mut Session, status: u16, body: Bytes) -> Result<()> {
    // Room for Pingora's `date` and `connection` too.
    let mut header = ResponseHeader::build_no_case(status, Some(4))?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", body.len().to_string())?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

#[async_trait]
impl ProxyHttp for GatewayService {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx::default()
    }

    /// None: Pingora adds a response-compression module by default, off, which every request
    /// would still carry and call.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    // Every path but the chat route's is boxed where it writes: this future (boxed by
    // `async_trait`) is sized for its largest state and an open stream keeps it whole, so only
    // the chat route's small outer future is awaited in place.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        if !self.gateway.ready.is_set() && path != "/healthz" {
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
                let writing = Box::pin(super::chat::write_error(
                    session,
                    ctx,
                    &ApiError::StoreUnavailable,
                ));
                writing.await?;
                observe(&self.gateway, &path, ctx);
                return Ok(true);
            }
        }
        let routed: std::result::Result<(), ApiError> = match (method.as_str(), path.as_str()) {
            ("POST", "/v1/chat/completions" | "/v1/messages") => {
                if path == "/v1/messages" {
                    ctx.format = super::inbound::ClientFormat::Anthropic;
                }
                let r = super::chat::handle(&self.gateway, session, ctx).await;
                if r.is_ok() && ctx.status == 0 {
                    ctx.status = 200;
                }
                r
            }
            ("GET", "/healthz") => {
                let (status, body) = self.gateway.health();
                ctx.status = status;
                let responding =
                    Box::pin(respond_json(session, ctx.status, Bytes::from_static(body)));
                responding.await?;
                Ok(())
            }
            ("GET", p) if p == "/v1/models" || p.starts_with("/v1/models/") => {
                let models = Box::pin(models(&self.gateway, session));
                match models.await {
                    Ok(body) => {
                        ctx.status = 200;
                        let responding = Box::pin(respond_json(session, 200, body));
                        responding.await?;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            (_, p)
                if matches!(
                    p,
                    "/healthz" | "/v1/models" | "/v1/chat/completions" | "/v1/messages"
                ) || p.starts_with("/v1/models/") =>
            {
                Err(ApiError::MethodNotAllowed {
                    method: method.to_string(),
                    path: path.clone(),
                })
            }
            _ => Err(ApiError::NotFound { path: path.clone() }),
        };
        if let Err(e) = routed {
            let writing = Box::pin(super::chat::write_error(session, ctx, &e));
            writing.await?;
        }
        observe(&self.gateway, &path, ctx);
        Ok(true)
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

#[cfg(test)]
mod tests {
    use super::request_id;

    #[test]
    fn request_ids_sort_by_time_and_differ_within_a_millisecond() {
        let a = request_id(1_764_547_200_000);
        let b = request_id(1_764_547_200_000);
        let c = request_id(1_764_547_200_001);
        assert_eq!(a.len(), 28);
        assert!(a.starts_with("req_019ad"), "{a}");
        assert_ne!(a, b);
        assert!(a < c && b < c);
    }
}
