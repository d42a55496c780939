//! Client connections: the deadline for each request head, and the keep-alive loop that hands
//! each request on a connection to the proxy.
//!
//! Pingora bounds each read of a request head (60 s), not the head: a client that sends one
//! header line every few seconds keeps its connection, and a task, for as long as it likes.
//! Pingora reads the head inside its proxy loop, before any hook runs, so the deadline sits
//! under it, on the connection: [`HeadClock`] wraps the client's stream, and a read while a
//! head is due fails once `server.head_timeout_ms` has passed. The proxy stops the clock as
//! soon as the head is read ([`head_read`]); the body has a pace of its own (`body.rs`).
//!
//! When the clock starts: at accept for a connection's first request, since a connection
//! that sends nothing is a head not arriving; at the first byte of each later request, since
//! the time a kept-alive connection idles between two requests is not the client being slow.
//! That idle time has its own bound, [`KEEPALIVE_IDLE`].

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::runtime::Runtime;

/// How long a kept-alive connection may wait for its next request: the 60 s Pingora gives a
/// connection's first request, for every later one too (Pingora waits for those without end).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// The public listener's application: Pingora's HTTP/1 keep-alive loop around `app` (the
/// proxy), with each connection's stream under a [`HeadClock`]. The listener is plain TCP and
/// HTTP/1 only: no TLS, no h2c.
pub struct Clients<A> {
    app: Arc<A>,
    runtime: Arc<ArcSwap<Runtime>>,
    /// `tollgate_client_timeouts_total{phase="head"}`.
    head_timeouts: IntCounter,
}

impl<A> Clients<A> {
    pub fn new(app: A, runtime: Arc<ArcSwap<Runtime>>, head_timeouts: IntCounter) -> Self {
        Clients {
            app: Arc::new(app),
            runtime,
            head_timeouts,
        }
    }

    /// `server.head_timeout_ms` as the current config has it: a reload applies to the next
    /// request head.
    fn head_timeout(&self) -> Duration {
        self.runtime.load().config.server.head_timeout
    }
}

#[async_trait]
impl<A> ServerApp for Clients<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let clock = HeadClock::new(stream, self.head_timeout(), self.head_timeouts.clone());
        let mut session = ServerSession::new_http1(Box::new(clock));
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(KEEPALIVE_IDLE.as_secs()));
        }
        loop {
            let reused = self.app.process_new_http(session, shutdown).await?;
            let (stream, settings) = reused.consume();
            // Always a `HeadClock`: every session of this loop is built on one.
            let mut clock = stream.into_any().downcast::<HeadClock>().ok()?;
            clock.next_request(self.head_timeout());
            session = ServerSession::new_http1(clock);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            session.set_keepalive(Some(KEEPALIVE_IDLE.as_secs()));
        }
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

/// Stops the head clock of the session's connection: its head is read.
pub fn head_read(session: &ServerSession) {
    let clock = session
        .stream()
        .and_then(|s| s.as_ref().as_any().downcast_ref::<HeadClock>());
    if let Some(clock) = clock {
        clock.head_read.store(true, Ordering::Relaxed);
    }
}

/// A client's stream whose reads fail once the request head they are reading is overdue.
pub struct HeadClock {
    inner: Stream,
    limit: Duration,
    /// When the current head is due; `None` until the first byte of a kept-alive
    /// connection's next request.
    due: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    /// Set by the proxy once the head is read (`head_read`): later reads are the body's or
    /// the watch for the client leaving, and the clock no longer applies.
    head_read: AtomicBool,
    /// Bytes of the current head read so far, for the log line.
    received: usize,
    timeouts: IntCounter,
}

impl HeadClock {
    fn new(inner: Stream, limit: Duration, timeouts: IntCounter) -> Self {
        let due = Instant::now() + limit;
        HeadClock {
            inner,
            limit,
            due: Some(due),
            timer: Box::pin(tokio::time::sleep_until(due)),
            head_read: AtomicBool::new(false),
            received: 0,
            timeouts,
        }
    }

    /// A kept-alive connection waits for its next request; its head's clock starts with
    /// the first byte.
    fn next_request(&mut self, limit: Duration) {
        self.limit = limit;
        self.due = None;
        self.received = 0;
        *self.head_read.get_mut() = false;
    }

    fn overdue(&self) -> io::Error {
        self.timeouts.inc();
        let peer = self
            .inner
            .get_socket_digest()
            .and_then(|d| d.peer_addr().map(|a| a.to_string()))
            .unwrap_or_default();
        tracing::info!(
            client = %peer,
            received_bytes = self.received,
            head_timeout_ms = self.limit.as_millis() as u64,
            "request head not complete within server.head_timeout_ms; connection closed"
        );
        io::Error::new(
            io::ErrorKind::TimedOut,
            "request head not complete within server.head_timeout_ms",
        )
    }
}

impl AsyncRead for HeadClock {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if *this.head_read.get_mut() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // A due head fails its read once the timer has fired, whether or not bytes are
        // waiting: a trickle always has one more.
        if this.due.is_some() && this.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(this.overdue()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        this.received += got;
        if this.due.is_none() && got > 0 {
            let due = Instant::now() + this.limit;
            this.due = Some(due);
            this.timer.as_mut().reset(due);
            // Registers the timer's wake-up for the read that will wait next.
            if this.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(this.overdue()));
            }
        }
        read
    }
}

impl AsyncWrite for HeadClock {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// The rest of Pingora's stream interface is the wrapped stream's.

#[async_trait]
impl Shutdown for HeadClock {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadClock {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

/// The public listener is plain TCP: nothing to tell.
impl Ssl for HeadClock {}

impl GetTimingDigest for HeadClock {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadClock {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadClock {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeadClock {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for HeadClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadClock")
            .field("inner", &self.inner)
            .field("due", &self.due)
            .finish()
    }
}
