//! Step 5: pick an upstream and send the request, moving on to the next one in the tier's list
//! on a connect error, a timeout, a 429 or a 5xx, as long as nothing has reached the client.
//!
//! Connections come from Pingora's transport connector (pooled, kept alive); the request is
//! written whole in one write, the answer read with Pingora's HTTP/1 client. Addresses are resolved
//! off the request path (Pingora's peer constructor would resolve with a blocking call).

use super::dialect::Dialect;
use super::error::ApiError;
use super::health::{Health, retry_after};
use crate::conf::{Conf, Provider, Upstream};
use bytes::Bytes;
use pingora::connectors::TransportConnector;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::HttpSession as Http1Session;
use pingora::protocols::tls::CaType;
use pingora::upstreams::peer::{HttpPeer, Peer};
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
    /// The peer last built for `addr`, shared by the requests that go there: built once per
    /// address, not once per request, and an open stream holds a pointer to it, not a copy.
    peer: RwLock<Option<Arc<HttpPeer>>>,
    /// The provider's own trust roots (`ca_file`), shared by every peer built for it.
    pub ca: Option<Arc<CaType>>,
    /// Keeps each provider's pooled connections apart: two providers on one address may differ
    /// in trust roots (a connection verified with one's `ca_file` must never serve the other).
    pub pool_group: u64,
    /// The prepaid credit recorded for this provider is spent and its conf says to leave
    /// routing then (set by the worker from the store, see `duang-admin upstream-credit`).
    pub prepaid_spent: std::sync::atomic::AtomicBool,
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
            peer: RwLock::new(None),
            prepaid_spent: std::sync::atomic::AtomicBool::new(false),
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

/// The fallback order for one request, as indices into the tier's upstreams: a weighted pick
/// first, then the rest in conf order; upstreams cooling down go last (still tried when every
/// other one has failed). An upstream whose provider's prepaid credit is spent (and whose conf
/// says to leave routing then) is not tried at all.
pub fn order(
    upstreams: &[Upstream],
    endpoints: &[Arc<Endpoint>],
    counter: &AtomicU64,
    health: &[Health],
    now_ms: i64,
) -> Vec<usize> {
    let enabled: Vec<usize> = (0..upstreams.len())
        .filter(|i| {
            let u = &upstreams[*i];
            u.enabled
                && !endpoints
                    .get(u.provider)
                    .is_some_and(|e| e.prepaid_spent.load(Ordering::Relaxed))
        })
        .collect();
    let total: u64 = enabled
        .iter()
        .map(|i| u64::from(upstreams[*i].weight))
        .sum();
    let mut out = Vec::with_capacity(enabled.len());
    if total == 0 {
        out.extend(enabled.iter().copied());
    } else {
        let mut ticket = counter.fetch_add(1, Ordering::Relaxed) % total;
        let first = enabled
            .iter()
            .position(|i| {
                let w = u64::from(upstreams[*i].weight);
                if ticket < w {
                    true
                } else {
                    ticket -= w;
                    false
                }
            })
            .unwrap_or(0);
        out.push(enabled[first]);
        out.extend(
            enabled
                .iter()
                .enumerate()
                .filter(|(n, _)| *n != first)
                .map(|(_, i)| *i),
        );
    }
    // Stable: cooling upstreams keep their relative order, after the healthy ones.
    out.sort_by_key(|i| health.get(*i).is_some_and(|h| h.cooling(now_ms)));
    out
}

/// An upstream that answered with a status line: the open session and how we got it.
pub struct Answer {
    pub session: HttpSession,
    pub peer: Arc<HttpPeer>,
    /// Which of the tier's upstreams answered (an index into its `upstreams`).
    pub upstream: usize,
    pub status: u16,
    pub attempts: u32,
    pub first_byte: Instant,
    /// A JSON answer, read and checked before anything reached the client.
    pub body: Option<Bytes>,
    /// What checking it found (its usage, or the answer parsed for translating).
    pub checked: Option<crate::gateway::dialect::Checked>,
}

/// Why one attempt failed before any answer.
enum AttemptError {
    Connect(String),
    Timeout(String),
}

fn peer_for(ep: &Endpoint, p: &Provider) -> Option<Arc<HttpPeer>> {
    let addr = ep.addr()?;
    let same = |peer: &HttpPeer| peer.address().as_inet() == Some(&addr);
    if let Ok(cached) = ep.peer.read()
        && let Some(peer) = cached.as_ref().filter(|peer| same(peer))
    {
        return Some(peer.clone());
    }
    let mut peer = HttpPeer::new(addr, ep.tls, ep.host.clone());
    peer.options.connection_timeout = Some(p.connect_timeout);
    peer.options.total_connection_timeout = Some(p.connect_timeout.saturating_mul(2));
    peer.options.idle_timeout = Some(POOL_IDLE);
    peer.options.ca = ep.ca.clone();
    peer.group_key = ep.pool_group;
    let peer = Arc::new(peer);
    if let Ok(mut cached) = ep.peer.write() {
        *cached = Some(peer.clone());
    }
    Some(peer)
}

/// The whole request as it goes on the wire, head and body in one buffer, so it leaves in one
/// write: Pingora's HTTP/1 client writes and flushes the head on its own and then the body,
/// which cost a second system call and a second wake-up of the upstream per request.
fn request_wire(
    ep: &Endpoint,
    p: &Provider,
    speaks: Dialect,
    body: &[u8],
    stream: bool,
) -> Vec<u8> {
    use std::io::Write;
    let mut w = Vec::with_capacity(384 + body.len());
    let _ = write!(
        w,
        "POST {}{} HTTP/1.1\r\nhost: ",
        ep.base_path,
        speaks.path()
    );
    if (ep.tls && ep.port == 443) || (!ep.tls && ep.port == 80) {
        w.extend_from_slice(ep.host.as_bytes());
    } else {
        let _ = write!(w, "{}:{}", ep.host, ep.port);
    }
    let _ = write!(
        w,
        "\r\ncontent-type: application/json\r\ncontent-length: {}\r\naccept: {}\r\n",
        body.len(),
        if stream {
            "text/event-stream"
        } else {
            "application/json"
        }
    );
    // Compression must never touch an event stream.
    w.extend_from_slice(b"accept-encoding: identity\r\n");
    w.extend_from_slice(
        concat!(
            "user-agent: duang-relay/",
            env!("CARGO_PKG_VERSION"),
            "\r\n"
        )
        .as_bytes(),
    );
    // The key has no control characters (checked when the conf is loaded).
    let key = p.api_key.as_ref().map(|k| k.expose().as_str());
    match (speaks == Dialect::Messages, key) {
        (true, key) => {
            let _ = write!(
                w,
                "anthropic-version: {}\r\n",
                super::dialect::messages::VERSION
            );
            if let Some(key) = key {
                let _ = write!(w, "x-api-key: {key}\r\n");
            }
        }
        (false, Some(key)) => {
            let _ = write!(w, "authorization: Bearer {key}\r\n");
        }
        (false, None) => {}
    }
    w.extend_from_slice(b"\r\n");
    w.extend_from_slice(body);
    w
}

async fn attempt(
    connector: &TransportConnector,
    ep: &Endpoint,
    p: &Provider,
    speaks: Dialect,
    body: Bytes,
    stream: bool,
) -> Result<(HttpSession, Arc<HttpPeer>), AttemptError> {
    use tokio::io::AsyncWriteExt;
    let peer = peer_for(ep, p)
        .ok_or_else(|| AttemptError::Connect(format!("{} does not resolve", ep.host)))?;
    let wire = request_wire(ep, p, speaks, &body, stream);
    drop(body);
    // A pooled connection the server closed meanwhile fails on first use: try once more, fresh.
    for try_no in 0..2 {
        let (mut conn, reused) = connector
            .get_stream(&*peer)
            .await
            .map_err(|e| classify(&e, &ep.host))?;
        let written = tokio::time::timeout(p.first_byte_timeout, async {
            conn.write_all(&wire).await?;
            conn.flush().await
        })
        .await;
        let failed = match written {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(AttemptError::Connect(format!(
                "{}: write error: {e}",
                ep.host
            ))),
            Err(_) => Some(AttemptError::Timeout(format!("{}: WriteTimedout", ep.host))),
        };
        if let Some(e) = failed {
            if reused && try_no == 0 && !matches!(e, AttemptError::Timeout(_)) {
                continue;
            }
            return Err(e);
        }
        let mut session = HttpSession::H1(Http1Session::new_with_options(conn, &*peer));
        session.set_read_timeout(Some(p.first_byte_timeout));
        match session.read_response_header().await {
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

/// Reads a JSON answer whole (bounded by `limit` bytes, `idle` between reads). The body is
/// whole at its end by `Content-Length` or chunked framing, or once it is a complete JSON value:
/// an upstream slow to close its connection after a whole answer does not hold the answer back
/// (its connection is then not reused). Returns the value when it was parsed on the way.
pub async fn read_body(
    session: &mut HttpSession,
    idle: Duration,
    limit: usize,
) -> Result<Bytes, String> {
    use futures_util::FutureExt;
    session.set_read_timeout(Some(idle));
    let mut buf = bytes::BytesMut::new();
    loop {
        match session.read_response_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err("the answer is too large".into());
                }
                buf.extend_from_slice(&chunk);
                if !session.response_done()
                    && buf.trim_ascii_end().ends_with(b"}")
                    && serde_json::from_slice::<serde::de::IgnoredAny>(&buf).is_ok()
                {
                    // Whole. Its framing's end may be here already: then the connection can
                    // be reused.
                    let _ = session.read_response_body().now_or_never();
                    return Ok(buf.freeze());
                }
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => return Err(format!("the answer broke off ({})", e.etype().as_str())),
        }
    }
}

/// Sends the request to the tier's upstreams in `order` until one gives a usable answer. A
/// connect error, a timeout, a 429, a 5xx, and (for JSON) an answer that is not a completion
/// move on to the next, as long as nothing has reached the client; the last upstream's 429 or
/// 5xx is returned for the caller to pass on. Each outcome feeds the upstream's cool-down.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site, each argument a different part of the request"
)]
pub async fn send(
    conf: &Conf,
    connector: &TransportConnector,
    endpoints: &[std::sync::Arc<Endpoint>],
    upstreams: &[Upstream],
    order: &[usize],
    health: &[Health],
    body_for: impl Fn(&Upstream) -> Bytes,
    client: Dialect,
    stream: bool,
    json_limit: usize,
) -> Result<Answer, ApiError> {
    let mut last_err: Option<AttemptError> = None;
    for (n, &i) in order.iter().enumerate() {
        let u = &upstreams[i];
        let h = &health[i];
        let last = n + 1 == order.len();
        let attempts = n as u32 + 1;
        let p = &conf.providers[u.provider];
        let ep = &endpoints[u.provider];
        let now = crate::time::now_ms();
        let speaks = Dialect::of_upstream(p, client);
        match attempt(connector, ep, p, speaks, body_for(u), stream).await {
            Ok((mut session, peer)) => {
                let header = session.response_header();
                let status = header.map_or(502, |h| h.status.as_u16());
                let is_sse = header
                    .and_then(|h| h.headers.get("content-type"))
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("text/event-stream"));
                if status == 429 || status >= 500 {
                    h.failed(
                        p,
                        u,
                        now,
                        header.filter(|_| status == 429).and_then(retry_after),
                    );
                    if !last {
                        tracing::warn!(provider = %u.provider_name, model = %u.model, status, "upstream failed before the first byte; trying the next");
                        last_err = Some(AttemptError::Connect(format!(
                            "{} answered {status}",
                            ep.host
                        )));
                        session.shutdown().await;
                        continue;
                    }
                }
                let mut body = None;
                let mut checked = None;
                if (200..300).contains(&status) && (!stream || !is_sse) {
                    // A JSON answer (or a stream that came back as JSON): read and check it now.
                    let problem = match read_body(&mut session, p.idle_timeout, json_limit).await {
                        Ok(b) => {
                            let problem = match speaks.check_answer(client, &b) {
                                Err(problem) => Some(problem),
                                Ok(_) if stream => {
                                    Some("answered JSON to a streaming request".into())
                                }
                                Ok(c) => {
                                    checked = Some(c);
                                    None
                                }
                            };
                            body = Some(b);
                            problem
                        }
                        Err(e) => Some(e),
                    };
                    if let Some(problem) = problem {
                        h.failed(p, u, now, None);
                        tracing::warn!(provider = %u.provider_name, model = %u.model, problem = %problem, "upstream answer not usable");
                        session.shutdown().await;
                        if last {
                            return Err(ApiError::UpstreamUnavailable {
                                detail: format!("{} {problem}", ep.host),
                            });
                        }
                        last_err = Some(AttemptError::Connect(format!("{} {problem}", ep.host)));
                        continue;
                    }
                }
                if (200..300).contains(&status) {
                    h.succeeded(u);
                }
                return Ok(Answer {
                    session,
                    peer,
                    upstream: i,
                    status,
                    attempts,
                    first_byte: Instant::now(),
                    body,
                    checked,
                });
            }
            Err(e) => {
                let (AttemptError::Connect(d) | AttemptError::Timeout(d)) = &e;
                tracing::warn!(provider = %u.provider_name, model = %u.model, detail = %d, "upstream attempt failed");
                h.failed(p, u, now, None);
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
pub async fn release(connector: &TransportConnector, answer: Answer) {
    let Answer {
        mut session, peer, ..
    } = answer;
    if session.response_done()
        && let HttpSession::H1(mut h1) = session
    {
        h1.respect_keepalive();
        if let Some(stream) = h1.reuse().await {
            connector.release_stream(stream, peer.reuse_hash(), Some(POOL_IDLE));
        }
    } else {
        session.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_built_once_per_address_and_again_when_the_address_changes() {
        let conf = super::super::test_conf("http://upstream.test:8000/v1");
        let p = &conf.providers[0];
        let ep = Endpoint::new(p);
        assert!(
            peer_for(&ep, p).is_none(),
            "no peer before the host resolves"
        );
        let first: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        *ep.addr.write().unwrap() = Some(first);
        let a = peer_for(&ep, p).expect("peer");
        let b = peer_for(&ep, p).expect("peer");
        assert!(
            Arc::ptr_eq(&a, &b),
            "one peer shared by requests to one address"
        );
        assert_eq!(a.address().as_inet(), Some(&first));
        assert_eq!(a.sni(), "upstream.test");
        let moved: SocketAddr = "127.0.0.2:8000".parse().unwrap();
        *ep.addr.write().unwrap() = Some(moved);
        let c = peer_for(&ep, p).expect("peer");
        assert_eq!(
            c.address().as_inet(),
            Some(&moved),
            "a new address, a new peer"
        );
        assert!(Arc::ptr_eq(&c, &peer_for(&ep, p).expect("peer")));
    }
}
