//! Client connections: the deadline for each request head, and the keep-alive loop that takes
//! each request on a connection through the proxy's hooks.
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
//! That idle time has its own bound, [`KEEPALIVE_IDLE`], kept by the same clock: Pingora's
//! own keep-alive timeout would wrap every read of a head in a timer built for it, where the
//! clock's one timer is moved.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::ServerApp;
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::ShutdownWatch;
use pingora::ErrorType;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::reclaim;
use crate::runtime::Runtime;

/// How long a kept-alive connection may wait for its next request: the 60 s Pingora gives a
/// connection's first request, for every later one too (Pingora waits for those without end).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// How much longer than [`KEEPALIVE_IDLE`] an idle connection may be kept.
const IDLE_SLACK: Duration = Duration::from_secs(1);

/// The public listener's application: the HTTP/1 keep-alive loop, and each request on it
/// taken through the proxy's hooks (`proxy`, tollgate's one `ProxyHttp`), with each
/// connection's stream under a [`HeadClock`]. The listener is plain TCP and HTTP/1 only: no
/// TLS, no h2c.
///
/// The loop is tollgate's, not Pingora's `HttpProxy`: every request is answered in
/// `request_filter` (`forward` drives the replica exchange itself), so of Pingora's request
/// path only the head read, the hooks and the end of the request are used. Pingora's path
/// also holds, for as long as a request lasts, one future sized for all it could do (the
/// cache, its upstream exchange, retries): 14.5 KiB per open stream (benches/README.md). This
/// one holds the hooks' state and little else.
pub struct Clients<P> {
    proxy: P,
    runtime: Arc<ArcSwap<Runtime>>,
    /// `tollgate_client_timeouts_total{phase="head"}`.
    head_timeouts: IntCounter,
    /// `tollgate_requests_in_flight`, which [`reclaim::watch`] follows.
    in_flight: IntGauge,
    /// Starts that watch with the first connection, on the runtime that serves clients.
    reclaim: Once,
}

impl<P> Clients<P> {
    pub fn new(
        proxy: P,
        runtime: Arc<ArcSwap<Runtime>>,
        head_timeouts: IntCounter,
        in_flight: IntGauge,
    ) -> Self {
        Clients {
            proxy,
            runtime,
            head_timeouts,
            in_flight,
            reclaim: Once::new(),
        }
    }

    /// `server.head_timeout_ms` as the current config has it: a reload applies to the next
    /// request head.
    fn head_timeout(&self) -> Duration {
        self.runtime.load().config.server.head_timeout
    }
}

/// What a connection carries from one request to the next: the bytes of the next request
/// already read (a pipelining client's), and whether pipelining was on.
#[derive(Default)]
struct Carried {
    prefix: Option<BytesMut>,
    pipelining: bool,
}

#[async_trait]
impl<P> ServerApp for Clients<P>
where
    P: ProxyHttp + Send + Sync + 'static,
    P::CTX: Send + Sync,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.reclaim.call_once(|| {
            tokio::spawn(reclaim::watch(self.in_flight.clone()));
        });
        let mut clock = Box::new(HeadClock::new(
            stream,
            self.head_timeout(),
            self.head_timeouts.clone(),
        ));
        let mut carried = Carried::default();
        loop {
            let (stream, next) = self.serve(clock, carried, shutdown).await?;
            // Always a `HeadClock`: every session of this loop is built on one.
            clock = stream.into_any().downcast::<HeadClock>().ok()?;
            clock.next_request(self.head_timeout());
            carried = next;
        }
    }
}

impl<P> Clients<P>
where
    P: ProxyHttp + Send + Sync + 'static,
    P::CTX: Send + Sync,
{
    /// One request of the connection, in the order Pingora's proxy runs it: read the head
    /// (or stop waiting for it at shutdown), the early filter and the request filter, which
    /// answer it, `fail_to_proxy` if they failed, `logging`, then the end of the request.
    /// Returns the connection when it can carry another request.
    async fn serve(
        &self,
        clock: Box<HeadClock>,
        carried: Carried,
        shutdown: &ShutdownWatch,
    ) -> Option<(Stream, Carried)> {
        let mut session = Session::new_h1(clock);
        let downstream = &mut session.downstream_session;
        if let Some(prefix) = carried.prefix {
            downstream.set_pipelined_prefix(prefix);
        }
        downstream.set_pipelining_enabled(carried.pipelining);
        let stopping = *shutdown.borrow();
        // 0: kept alive without Pingora's timer; the clock bounds the idle wait instead.
        downstream.set_keepalive((!stopping).then_some(0));
        // Boxed, as is the end of the request below: their states are larger than what the
        // request holds while it streams, and are needed only before and after.
        if !Box::pin(read_head(downstream, shutdown)).await {
            return None;
        }

        let mut ctx = self.proxy.new_ctx();
        let served = match self
            .proxy
            .early_request_filter(&mut session, &mut ctx)
            .await
        {
            Ok(()) => self.proxy.request_filter(&mut session, &mut ctx).await,
            Err(e) => Err(e),
        };
        let reuse = match served {
            // `request_filter` answers every request (`Ok(false)` is never returned).
            Ok(_) => {
                self.proxy.logging(&mut session, None, &mut ctx).await;
                true
            }
            Err(e) => {
                let failed = self.proxy.fail_to_proxy(&mut session, &e, &mut ctx).await;
                tracing::warn!(
                    error = %e,
                    status = failed.error_code,
                    request = %self.proxy.request_summary(&session, &ctx),
                    "request failed"
                );
                self.proxy.logging(&mut session, Some(&e), &mut ctx).await;
                failed.can_reuse_downstream
            }
        };
        let pipelining = session.downstream_session.pipelining_enabled();
        let reusable = match reuse {
            true => Box::pin(session.downstream_session.finish())
                .await
                .ok()
                .flatten(),
            false => None,
        };
        drop(ctx);
        let (stream, prefix) = reusable?.into_parts();
        Some((stream, Carried { prefix, pipelining }))
    }
}

/// Reads a request head; false if there is none to serve: the connection closed or broke,
/// the head was refused (400, or 405 for CONNECT), or the server is shutting down.
async fn read_head(downstream: &mut ServerSession, shutdown: &ShutdownWatch) -> bool {
    let read = tokio::select! {
        // A request already read is served, shutdown or not.
        biased;
        read = downstream.read_request() => read,
        () = stopping_of(shutdown.clone()) => return false,
    };
    match read {
        Ok(true) => {}
        Ok(false) => return false,
        Err(e) => {
            if *e.etype() == ErrorType::InvalidHTTPHeader {
                let _ = downstream.respond_error(400).await;
            }
            downstream.shutdown().await;
            return false;
        }
    }
    // CONNECT changes how a message is framed; a proxy of model requests has no use for it.
    if downstream.req_header().method == http::Method::CONNECT {
        let _ = downstream.respond_error(405).await;
        downstream.shutdown().await;
        return false;
    }
    true
}

/// Resolves once the server is shutting down; never if it cannot tell.
async fn stopping_of(mut shutdown: ShutdownWatch) {
    if shutdown.wait_for(|stopping| *stopping).await.is_err() {
        std::future::pending::<()>().await;
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
    /// Between two requests: the timer is set to the end of the idle wait.
    idle_armed: bool,
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
            idle_armed: false,
            timeouts,
        }
    }

    /// A kept-alive connection waits for its next request; its head's clock starts with
    /// the first byte.
    fn next_request(&mut self, limit: Duration) {
        self.limit = limit;
        self.due = None;
        self.received = 0;
        self.idle_armed = false;
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
        // waiting: a trickle always has one more. The timer is set for the head only here,
        // when a read of it comes back: most heads arrive in one read and never need it.
        if let Some(due) = this.due {
            if this.timer.deadline() != due {
                this.timer.as_mut().reset(due);
            }
            if this.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(this.overdue()));
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        this.received += got;
        if this.due.is_none() && got > 0 {
            this.due = Some(Instant::now() + this.limit);
        } else if this.due.is_none() && read.is_pending() && !this.idle_armed {
            // Idle between two requests, once a read has to wait (the next request is often
            // there already). A timer set at most `IDLE_SLACK` earlier is kept: on a busy
            // connection it is moved about once a second rather than for every request.
            this.idle_armed = true;
            let now = Instant::now();
            let deadline = this.timer.deadline();
            if deadline < now + KEEPALIVE_IDLE || deadline > now + KEEPALIVE_IDLE + IDLE_SLACK {
                this.timer.as_mut().reset(now + KEEPALIVE_IDLE + IDLE_SLACK);
            }
        }
        if this.due.is_none() && this.idle_armed && this.timer.as_mut().poll(cx).is_ready() {
            // Nothing read: the end of the stream, which closes the connection quietly, as
            // Pingora's keep-alive timeout did.
            return Poll::Ready(Ok(()));
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
