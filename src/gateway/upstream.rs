//! Step 5: pick an upstream and send the request, moving on to the next one in the tier's list
//! on a connect error, a timeout, a 429 or a 5xx, as long as nothing has reached the client.
//!
//! Connections come from Pingora's own HTTP connector (pooled, kept alive). Addresses are resolved
//! off the request path (Pingora's peer constructor would resolve with a blocking call).

use super::error::ApiError;
use crate::conf::{Conf, Provider, Upstream};
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::tls::CaType;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{WrappedX509, parse_x509};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// Where a provider lives: its resolved address and request path prefix.
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// Path of the base URL without a trailing slash, e.g. `/v1`.
    pub base_path: String,
    pub addr: RwLock<Option<SocketAddr>>,
    /// The provider's own trust roots (`ca_file`), shared by every peer built for it.
    pub ca: Option<Arc<CaType>>,
    /// Keeps each provider's pooled connections apart: two providers on one address may differ
    /// in trust roots (a connection verified with one's `ca_file` must never serve the other).
    pub pool_group: u64,
}

impl Endpoint {
    pub fn new(p: &Provider) -> Endpoint {
        let url = &p.base_url;
        let tls = url.scheme() == "https";
        Endpoint {
            host: url.host_str().unwrap_or_default().to_owned(),
            port: url
                .port_or_known_default()
                .unwrap_or(if tls { 443 } else { 80 }),
            tls,
            base_path: url.path().trim_end_matches('/').to_owned(),
            addr: RwLock::new(None),
            pool_group: {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                p.name.hash(&mut h);
                h.finish()
            },
            ca: (!p.ca_certs.is_empty()).then(|| {
                p.ca_certs
                    .iter()
                    .map(|der| WrappedX509::new(der.clone(), parse_x509))
                    .collect::<Vec<_>>()
                    .into()
            }),
        }
    }

    /// Resolves the host (blocking; call it off the request path). Returns whether it resolved.
    pub fn resolve(&self) -> bool {
        match (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map(|mut a| a.next())
        {
            Ok(Some(addr)) => {
                if let Ok(mut a) = self.addr.write() {
                    *a = Some(addr);
                }
                true
            }
            _ => false,
        }
    }

    fn addr(&self) -> Option<SocketAddr> {
        self.addr.read().ok().and_then(|a| *a)
    }
}

/// The fallback order for one request: a weighted pick first, then the rest in conf order.
pub fn order<'a>(upstreams: &'a [Upstream], counter: &AtomicU64) -> Vec<&'a Upstream> {
    let enabled: Vec<&Upstream> = upstreams.iter().filter(|u| u.enabled).collect();
    let total: u64 = enabled.iter().map(|u| u64::from(u.weight)).sum();
    if total == 0 {
        return enabled;
    }
    let mut ticket = counter.fetch_add(1, Ordering::Relaxed) % total;
    let first = enabled
        .iter()
        .position(|u| {
            let w = u64::from(u.weight);
            if ticket < w {
                true
            } else {
                ticket -= w;
                false
            }
        })
        .unwrap_or(0);
    let mut out = Vec::with_capacity(enabled.len());
    out.push(enabled[first]);
    out.extend(
        enabled
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != first)
            .map(|(_, u)| *u),
    );
    out
}

/// An upstream that answered with a status line: the open session and how we got it.
pub struct Answer {
    pub session: HttpSession,
    pub peer: HttpPeer,
    pub upstream: Upstream,
    pub status: u16,
    pub attempts: u32,
    pub first_byte: Instant,
}

/// Why one attempt failed before any answer.
enum AttemptError {
    Connect(String),
    Timeout(String),
}

fn peer_for(ep: &Endpoint, p: &Provider) -> Option<HttpPeer> {
    let addr = ep.addr()?;
    let mut peer = HttpPeer::new(addr, ep.tls, ep.host.clone());
    peer.options.connection_timeout = Some(p.connect_timeout);
    peer.options.total_connection_timeout = Some(p.connect_timeout.saturating_mul(2));
    peer.options.idle_timeout = Some(POOL_IDLE);
    peer.options.ca = ep.ca.clone();
    peer.group_key = ep.pool_group;
    Some(peer)
}

fn request_header(
    ep: &Endpoint,
    p: &Provider,
    body_len: usize,
    stream: bool,
) -> pingora::Result<RequestHeader> {
    let path = format!("{}/chat/completions", ep.base_path);
    let mut h = RequestHeader::build("POST", path.as_bytes(), Some(8))?;
    let host = if (ep.tls && ep.port == 443) || (!ep.tls && ep.port == 80) {
        ep.host.clone()
    } else {
        format!("{}:{}", ep.host, ep.port)
    };
    h.insert_header("host", host)?;
    h.insert_header("content-type", "application/json")?;
    h.insert_header("content-length", body_len.to_string())?;
    h.insert_header(
        "accept",
        if stream {
            "text/event-stream"
        } else {
            "application/json"
        },
    )?;
    // Compression must never touch an event stream.
    h.insert_header("accept-encoding", "identity")?;
    h.insert_header(
        "user-agent",
        concat!("duang-relay/", env!("CARGO_PKG_VERSION")),
    )?;
    if let Some(key) = &p.api_key {
        h.insert_header("authorization", format!("Bearer {}", key.expose()))?;
    }
    Ok(h)
}

async fn attempt(
    connector: &Connector,
    ep: &Endpoint,
    p: &Provider,
    body: Bytes,
    stream: bool,
) -> Result<(HttpSession, HttpPeer), AttemptError> {
    let peer = peer_for(ep, p)
        .ok_or_else(|| AttemptError::Connect(format!("{} does not resolve", ep.host)))?;
    // A pooled connection the server closed meanwhile fails on first use: try once more, fresh.
    for try_no in 0..2 {
        let (mut session, reused) = connector
            .get_http_session(&peer)
            .await
            .map_err(|e| classify(&e, &ep.host))?;
        let header = request_header(ep, p, body.len(), stream)
            .map_err(|e| AttemptError::Connect(e.to_string()))?;
        session.set_write_timeout(Some(p.first_byte_timeout));
        session.set_read_timeout(Some(p.first_byte_timeout));
        let sent = async {
            session.write_request_header(Box::new(header)).await?;
            session.write_request_body(body.clone(), true).await?;
            session.finish_request_body().await?;
            session.read_response_header().await
        }
        .await;
        match sent {
            Ok(()) => return Ok((session, peer)),
            Err(e)
                if reused
                    && try_no == 0
                    && !matches!(e.etype(), pingora::ErrorType::ReadTimedout) =>
            {
                continue;
            }
            Err(e) => return Err(classify(&e, &ep.host)),
        }
    }
    Err(AttemptError::Connect(format!(
        "{}: connection closed",
        ep.host
    )))
}

fn classify(e: &pingora::Error, host: &str) -> AttemptError {
    use pingora::ErrorType::*;
    match e.etype() {
        ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout => {
            AttemptError::Timeout(format!("{host}: {}", e.etype().as_str()))
        }
        TLSHandshakeFailure | InvalidCert | HandshakeError | TLSWantX509Lookup => {
            AttemptError::Connect(format!(
                "{host}: TLS handshake failed ({}; is its certificate trusted? see the provider's ca_file)",
                e.etype().as_str()
            ))
        }
        _ => AttemptError::Connect(format!("{host}: {}", e.etype().as_str())),
    }
}

/// Sends the request to the tier's upstreams in order until one answers with something other
/// than 429 or 5xx (or the last one answers at all). Nothing has been written to the client yet.
pub async fn send(
    conf: &Conf,
    connector: &Connector,
    endpoints: &[Endpoint],
    order: &[&Upstream],
    body_for: impl Fn(&Upstream) -> Bytes,
    stream: bool,
) -> Result<Answer, ApiError> {
    let mut last_err: Option<AttemptError> = None;
    for (i, u) in order.iter().enumerate() {
        let attempts = i as u32 + 1;
        let p = &conf.providers[u.provider];
        let ep = &endpoints[u.provider];
        match attempt(connector, ep, p, body_for(u), stream).await {
            Ok((session, peer)) => {
                let status = session.response_header().map_or(502, |h| h.status.as_u16());
                let retryable = status == 429 || status >= 500;
                if retryable && i + 1 < order.len() {
                    tracing::warn!(provider = %u.provider_name, model = %u.model, status, "upstream failed before the first byte; trying the next");
                    last_err = Some(AttemptError::Connect(format!(
                        "{} answered {status}",
                        ep.host
                    )));
                    continue;
                }
                return Ok(Answer {
                    session,
                    peer,
                    upstream: (*u).clone(),
                    status,
                    attempts,
                    first_byte: Instant::now(),
                });
            }
            Err(e) => {
                let (AttemptError::Connect(d) | AttemptError::Timeout(d)) = &e;
                tracing::warn!(provider = %u.provider_name, model = %u.model, detail = %d, "upstream attempt failed");
                last_err = Some(e);
            }
        }
    }
    Err(match last_err {
        Some(AttemptError::Timeout(detail)) => ApiError::UpstreamTimeout { detail },
        Some(AttemptError::Connect(detail)) => ApiError::UpstreamUnavailable { detail },
        None => ApiError::Internal,
    })
}

/// Returns a finished session to the pool (only when its response was read to the end).
pub async fn release(connector: &Connector, mut answer: Answer) {
    if answer.session.response_done() {
        connector
            .release_http_session(answer.session, &answer.peer, Some(POOL_IDLE))
            .await;
    } else {
        answer.session.shutdown().await;
    }
}
