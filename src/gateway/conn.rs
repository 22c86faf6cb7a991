//! Client connections: the bounds Pingora's HTTP/1 server does not keep by itself.
//!
//! Pingora times each read of a request head on its own (a client that sends one byte every few
//! seconds is never cut off), takes heads up to 1 MiB and accepts every connection. [`Connections`]
//! wraps the proxy's application and keeps, per process:
//!
//! - `gateway.max_client_connections`: a connection past it is answered 503
//!   `too_many_connections` (with `Retry-After: 1`) and closed, before any of its request is read;
//! - `gateway.header_read_timeout_ms`: a request's line and headers must arrive whole within
//!   this, counted from the connection's start for its first request and from the first byte of
//!   each later one (the wait between kept-alive requests is `gateway.keepalive_idle_s`); past it
//!   the client gets 408 `request_timeout` and the connection is closed;
//! - `gateway.max_header_bytes`: a head that grows past it gets 431
//!   `request_header_too_large` and the connection is closed.
//!
//! Both head bounds live in [`Guarded`], a transport wrapper whose reads are bounded until the
//! service says the head is complete ([`head_done`], first thing in `request_filter`). Pipelined
//! requests are answered in order: each session is opened with pipelining on, so bytes read past
//! one request's body become the next request's head.

use super::ctx::RequestCtx;
use super::error::ApiError;
use super::service::GatewayService;
use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, ReusedHttpStream, ServerApp};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    UniqueID, UniqueIDType,
};
use pingora::proxy::Session;
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The bounds, from `[gateway]`.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_client_connections: usize,
    pub keepalive_idle_s: u64,
}

impl Bounds {
    pub fn of(g: &crate::conf::GatewayConf) -> Bounds {
        Bounds {
            header_read_timeout: g.header_read_timeout,
            max_header_bytes: g.max_header_bytes,
            max_client_connections: g.max_client_connections,
            keepalive_idle_s: g.keepalive_idle_s,
        }
    }
}

/// The gateway's client connections: the bounds, and the HTTP/1 loop that reads each request's
/// head and has the service answer it.
pub struct Connections {
    service: Arc<GatewayService>,
    bounds: Bounds,
    open: AtomicUsize,
}

impl Connections {
    pub fn new(service: GatewayService, bounds: Bounds) -> Self {
        Connections {
            service: Arc::new(service),
            bounds,
            open: AtomicUsize::new(0),
        }
    }
}

/// One open connection counted in [`Connections::open`]; given back when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    fn take(open: &'a AtomicUsize, max: usize) -> Option<Slot<'a>> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
        super::metrics::METRICS.client_connections.inc();
        Some(Slot(open))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        super::metrics::METRICS.client_connections.dec();
    }
}

/// After a refusal written before the request was read, what the client goes on sending is read
/// and dropped for this long (at most [`LINGER_BYTES`]), so it reads the answer instead of a reset.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

async fn refuse(mut stream: Stream, e: &ApiError) {
    use tokio::io::AsyncReadExt;
    let _ = stream.write_all(&e.raw_response()).await;
    let _ = stream.flush().await;
    Shutdown::shutdown(&mut *stream).await;
    let mut sink = [0u8; 4096];
    let mut seen = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while seen < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen += n,
            }
        }
    })
    .await;
}

/// A connection to serve its next request on, with what the last one left for it (keep-alive
/// timeout, pipelined bytes already read).
type Reused = (Stream, Option<HttpPersistentSettings>);

#[async_trait]
impl ServerApp for Connections {
    // Pingora's HTTP/1 keep-alive loop (`ServerApp for T: HttpServerApp`, then `HttpProxy`'s
    // `process_new_http`) without its proxy layer: the service answers every request in its
    // request phase, so what `HttpProxy` keeps per request for proxying, caching, modules and
    // subrequests (and its 14 KB request future, boxed and copied for each request) is not
    // needed. h2c is not offered, so every connection is HTTP/1.
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let m = &*super::metrics::METRICS;
        let Some(_slot) = Slot::take(&self.open, self.bounds.max_client_connections) else {
            m.client_connections_refused.inc();
            let e = ApiError::TooManyConnections {
                limit: self.bounds.max_client_connections,
            };
            Box::pin(refuse(stream, &e)).await;
            return None;
        };
        let stream: Stream = Box::new(Guarded::new(stream, self.bounds));
        let mut shutdown = shutdown.clone();
        let mut next: Option<Reused> = Some((stream, None));
        while let Some((stream, settings)) = next.take() {
            let mut session = Session::new_h1(stream);
            let downstream = &mut session.downstream_session;
            match settings {
                Some(settings) => {
                    if let Some(g) = downstream
                        .stream()
                        .and_then(|s| s.as_any().downcast_ref::<Guarded>())
                    {
                        g.next_head();
                    }
                    settings.apply_to_session(downstream);
                }
                None => {
                    downstream.set_keepalive(
                        (!*shutdown.borrow()).then_some(self.bounds.keepalive_idle_s),
                    );
                    downstream.set_pipelining_enabled(true);
                }
            }
            next = self.serve(session, &mut shutdown).await;
        }
        None
    }
}

impl Connections {
    /// Reads one request's head and has the service answer it; the connection again when it
    /// can take another request.
    async fn serve(&self, mut session: Session, shutdown: &mut ShutdownWatch) -> Option<Reused> {
        let read = tokio::select! {
            // A request already read (pipelined) is answered before a shutdown is looked at.
            biased;
            r = session.downstream_session.read_request() => r,
            // Shutting down: a connection waiting for its next request is closed.
            _ = shutdown.wait_for(|down| *down) => return None,
        };
        match read {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                if matches!(e.etype, pingora::ErrorType::InvalidHTTPHeader) {
                    let _ = session.downstream_session.respond_error(400).await;
                }
                session.downstream_session.shutdown().await;
                return None;
            }
        }
        if session.req_header().method == http::Method::CONNECT {
            // Never proxied (as Pingora's proxy refuses it unless told otherwise).
            let _ = session.downstream_session.respond_error(405).await;
            session.downstream_session.shutdown().await;
            return None;
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        let mut ctx = RequestCtx::default();
        if let Err(e) = self.service.answer(&mut session, &mut ctx).await {
            // The client went away mid-answer (or nothing could be written): as Pingora's
            // proxy does, a 500 only when nothing was written and the client is still there.
            let gone = matches!(
                e.etype,
                pingora::ErrorType::WriteError
                    | pingora::ErrorType::ReadError
                    | pingora::ErrorType::ConnectionClosed
            );
            if !gone && session.response_written().is_none() {
                let _ = session.downstream_session.respond_error(500).await;
            }
            session.downstream_session.shutdown().await;
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session.downstream_session);
        let reusable = session.downstream_session.finish().await.ok().flatten()?;
        Some(ReusedHttpStream::from_reusable_stream(reusable, settings).consume())
    }
}

/// Ends the head bounds of the connection a request came on: its head is parsed.
pub fn head_done(session: &pingora::proxy::Session) {
    if let Some(g) = session
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<Guarded>())
    {
        g.phase.store(HEAD_READ, Ordering::Release);
    }
}

/// The phases of a connection's current request, as [`Guarded`] sees them.
const READING_HEAD: u8 = 0;
const HEAD_READ: u8 = 1;
/// A kept-alive connection's next request: its head's clock starts at its first byte.
const NEXT_HEAD: u8 = 2;

/// A client's transport, its reads bounded in time and size while a request head is read.
#[derive(Debug)]
pub struct Guarded {
    inner: Stream,
    bounds: Bounds,
    /// [`READING_HEAD`], [`HEAD_READ`] (told by [`head_done`]) or [`NEXT_HEAD`].
    phase: AtomicU8,
    /// Whether the current head's clock runs: from the start for the first request, from its
    /// first byte for later ones.
    clock: Option<Instant>,
    /// Bytes read for the current head (with whatever of its body arrived in the same reads).
    head_bytes: usize,
    /// A timer, made the first time a head's read has to wait, then reset for later heads.
    timer: Option<Pin<Box<Sleep>>>,
    /// The refusal was written: every read fails from then on.
    refused: bool,
}

impl Guarded {
    fn new(inner: Stream, bounds: Bounds) -> Guarded {
        Guarded {
            inner,
            bounds,
            phase: AtomicU8::new(READING_HEAD),
            clock: Some(Instant::now()),
            head_bytes: 0,
            timer: None,
            refused: false,
        }
    }

    /// A kept-alive connection waits for its next request: its clock starts at the first byte.
    fn next_head(&self) {
        self.phase.store(NEXT_HEAD, Ordering::Release);
    }

    /// Writes the refusal if the socket takes it now (a few hundred bytes into an empty send
    /// buffer), and fails the read: Pingora then closes the connection.
    fn refuse(&mut self, cx: &mut Context<'_>, e: ApiError) -> Poll<std::io::Result<()>> {
        if !self.refused {
            self.refused = true;
            let _ = Pin::new(&mut self.inner).poll_write(cx, &e.raw_response());
            let _ = Pin::new(&mut self.inner).poll_flush(cx);
        }
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            e.message(),
        )))
    }

    fn timeout(&self) -> ApiError {
        ApiError::RequestTimeout {
            part: "headers",
            limit_ms: self.bounds.header_read_timeout.as_millis() as u64,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.refused {
            return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        match me.phase.load(Ordering::Acquire) {
            HEAD_READ => return Pin::new(&mut me.inner).poll_read(cx, buf),
            NEXT_HEAD => {
                me.phase.store(READING_HEAD, Ordering::Release);
                me.clock = None;
                me.head_bytes = 0;
            }
            _ => {}
        }
        // Reading a head.
        let deadline = me.clock.map(|c| c + me.bounds.header_read_timeout);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let e = me.timeout();
            return me.refuse(cx, e);
        }
        let before = buf.filled().len();
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 && me.clock.is_none() {
                    me.clock = Some(Instant::now());
                }
                me.head_bytes += n;
                if me.head_bytes > me.bounds.max_header_bytes {
                    let e = ApiError::HeadTooLarge {
                        limit_bytes: me.bounds.max_header_bytes,
                    };
                    return me.refuse(cx, e);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let Some(deadline) = deadline else {
                    // Waiting for a kept-alive request's first byte: Pingora's keep-alive
                    // timeout bounds that.
                    return Poll::Pending;
                };
                let timer = me
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                ready!(timer.as_mut().poll(cx));
                let e = me.timeout();
                me.refuse(cx, e)
            }
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
