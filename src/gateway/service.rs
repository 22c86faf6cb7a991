//! The `ProxyHttp` implementation: each phase is one call into the module named after it.

use super::error::ApiError;
use super::models::models_body;
use crate::conf::Conf;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use std::sync::Arc;

pub struct GatewayService {
    conf: Arc<Conf>,
    models: Bytes,
}

impl GatewayService {
    pub fn new(conf: Arc<Conf>) -> Self {
        let models = models_body(&conf);
        GatewayService { conf, models }
    }

    pub fn conf(&self) -> &Conf {
        &self.conf
    }
}

/// Per-request state (grows with auth, holds and usage in the full gateway).
#[derive(Debug, Default)]
pub struct RequestCtx {
    pub status: u16,
}

async fn respond_json(session: &mut Session, status: u16, body: Bytes) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(3))?;
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

    /// Every route is answered here; returning `true` tells Pingora the response is written.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        let (status, body) = match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => (200, Bytes::from_static(br#"{"status":"ok"}"#)),
            ("GET", "/v1/models") => (200, self.models.clone()),
            ("POST", "/v1/chat/completions") => {
                let e = ApiError::NotImplemented {
                    what: "POST /v1/chat/completions",
                };
                (e.status(), e.body())
            }
            (_, "/healthz" | "/v1/models" | "/v1/chat/completions") => {
                let e = ApiError::MethodNotAllowed {
                    method: method.to_string(),
                    path,
                };
                (e.status(), e.body())
            }
            _ => {
                let e = ApiError::NotFound { path };
                (e.status(), e.body())
            }
        };
        ctx.status = status;
        respond_json(session, status, body).await?;
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        // Unreachable while request_filter answers every request.
        Error::e_explain(
            ErrorType::InternalError,
            "no upstream is chosen in this build",
        )
    }
}
