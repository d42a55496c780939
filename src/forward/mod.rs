//! The upstream exchange, driven by tollgate itself (the body was already read, so Pingora's
//! proxy loop cannot send it): pick a replica, connect (another replica on connect failure),
//! send, relay the response as it arrives, and cancel the replica when the client leaves.
//!
//! What the exchange learns (replicas tried, timings, the replica's status, usage, what was
//! relayed) goes into one [`Outcome`], and nothing else of the request is touched: proxy.rs
//! hands the outcome to accounting.

mod call;
pub mod h1;
mod observe;
mod pass;
mod relay;
mod transcode;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
pub use call::{Answer, Call};
use h1::{Conn, Head};
pub use pass::{forwarded_fields, Pass, PassError};
use pingora::connectors::TransportConnector;
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use prometheus::Histogram;
use relay::Ending;
use tokio::time::{timeout_at, Instant};

use crate::config::Pool;
use crate::limits::Ticket;
use crate::route::{Lease, NoRoom, Placement, PoolRoute, Replica};
use crate::translate::ResponsePlan;
use crate::vocab::{Problem, Usage};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardError {
    /// The pool has no replica to try.
    NoReplica { pool: String },
    /// Every attempt failed to connect or to send; nothing reached a model.
    Unreachable { attempts: u32 },
    /// The replica broke the exchange before a response header.
    Broken { detail: String },
    /// The replica did not answer in time.
    Timeout { phase: &'static str },
    /// The client went away; the replica was told by closing its connection.
    ClientGone,
    /// The pool's waiting line is full.
    QueueFull { pool: String, max_waiting: u32 },
    /// No replica had room within the line's timeout (or the request's deadline).
    NoCapacity { pool: String, waited_ms: u64 },
}

/// The replica's answer is read whole, and the client is yet to get its end: the connection
/// goes back to the replica's idle pool if it can carry another request, and the request's
/// slots (the replica's in-flight count, and the key's and model's `max_concurrent`) are
/// freed now, so the client's next request (the next turn of the same conversation, under
/// `affinity`) never finds this one still counted.
fn answered(up: Conn, lease: Lease, ticket: Option<&mut Ticket>) {
    if up.reusable() {
        lease.replica().keep(up.into_stream());
    }
    drop(lease);
    if let Some(ticket) = ticket {
        ticket.free_slot();
    }
}

/// What to send: the request is complete in memory, so it can be retried on another replica.
pub struct Exchange<'a> {
    pub pool: &'a Pool,
    pub route: &'a Arc<PoolRoute>,
    /// Where the affinity policy would place it.
    pub placement: Placement,
    pub path: &'static str,
    pub body: Bytes,
    pub stream: bool,
    pub plan: ResponsePlan,
    /// Sent upstream as `x-request-id`, and to the client.
    pub request_id: &'a str,
    /// When the request started: timings in the outcome count from here.
    pub started: std::time::Instant,
    /// tollgate's own response fields (rate-limit headers, notices), last on the client's
    /// response header.
    pub own_fields: &'a [(http::HeaderName, http::HeaderValue)],
    /// Observes the gaps between streamed tokens.
    pub inter_token: Option<Histogram>,
    /// The request's reservation: its concurrency slot is freed as soon as the replica's
    /// answer is complete.
    pub ticket: Option<&'a mut Ticket>,
}

/// Everything the exchange learned. `forward` writes it as it goes, so that a request cut in
/// the middle of a relay (its task dropped at shutdown) is still accounted from what was
/// relayed up to the cut.
#[derive(Default)]
pub struct Outcome {
    /// Every replica tried, in order.
    pub attempts: Vec<Attempt>,
    /// Time spent in the pool's waiting line before the first attempt.
    pub queued: Option<Duration>,
    /// Time from the request's start to the replica's response header.
    pub first_byte: Option<Duration>,
    /// Time from the request's start to the first generated token (streams).
    pub first_token: Option<Duration>,
    /// The status the replica answered with (0: no response header).
    pub upstream_status: u16,
    /// The request reached a replica that did not refuse it: it may have spent GPU time.
    pub sent: bool,
    /// Usage the replica reported, if any; kept current while the answer is relayed.
    pub usage: Option<Usage>,
    /// Output tokens as estimated from what was relayed, for when usage never comes.
    pub output_estimate: u64,
    /// The status the client was sent, once the response header is on its way (0: not yet).
    pub status: u16,
    /// The replica failed after the response header went out: the client got a stream that
    /// ends in an error event, or a body cut short.
    pub broke_off: Option<ForwardError>,
    /// Body bytes passed to the replica and back (deployed models' pass-through).
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// One replica tried.
pub struct Attempt {
    pub replica: Arc<Replica>,
    /// `Some(true)`: it answered, with anything but 502/503. `Some(false)`: the connection
    /// or the send failed, or it answered 502/503. `None`: the exchange ended while waiting
    /// for its response header (a timeout, a broken connection, the client leaving).
    pub ok: Option<bool>,
}

impl Outcome {
    /// The replica of the last attempt: the one that answered, if any did.
    pub fn replica(&self) -> Option<&Arc<str>> {
        self.attempts.last().map(|a| &a.replica.authority)
    }

    fn tried(&self, addr: SocketAddr) -> bool {
        self.attempts.iter().any(|a| a.replica.addr == addr)
    }

    fn attempt(&mut self, lease: &Lease) {
        self.attempts.push(Attempt {
            replica: lease.replica().clone(),
            ok: None,
        });
    }

    fn judge(&mut self, ok: bool) {
        if let Some(a) = self.attempts.last_mut() {
            a.ok = Some(ok);
        }
    }
}

/// How a relayed response ended once its header had gone to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    Complete,
    /// Cut short by the replica; the client connection must be dropped, not reused.
    Cut,
}

/// Opens upstream connections; idle ones wait in their replica's pool.
pub struct Upstream {
    connector: TransportConnector,
    /// How a failure reads to the client, for the event that ends a stream it breaks.
    describe: fn(&ForwardError) -> Problem,
}

impl Upstream {
    pub fn new(describe: fn(&ForwardError) -> Problem) -> Self {
        Upstream {
            connector: TransportConnector::new(None),
            describe,
        }
    }

    pub async fn forward(
        &self,
        session: &mut Session,
        mut ex: Exchange<'_>,
        out: &mut Outcome,
    ) -> Result<Relayed, ForwardError> {
        let deadline = Instant::now() + ex.pool.timeouts.total;
        let mut next = Some(self.acquire(session, &ex, deadline, out).await?);
        let (mut up, lease, mut head, first_output) = loop {
            let Some(lease) = next.take() else {
                return Err(ForwardError::Unreachable {
                    attempts: out.attempts.len() as u32,
                });
            };
            out.attempt(&lease);
            let addr = lease.replica().addr;
            let may_retry = (out.attempts.len() as u32) < ex.pool.max_attempts.get();
            let (mut up, reused) = match self.send(&lease, &ex, deadline).await {
                Ok(sent) => sent,
                Err(detail) => {
                    out.judge(false);
                    failed(&ex, lease.replica());
                    tracing::warn!(request_id = %ex.request_id, replica = %addr, error = %detail, "replica attempt failed");
                    if !may_retry {
                        return Err(ForwardError::Unreachable {
                            attempts: out.attempts.len() as u32,
                        });
                    }
                    next = ex.route.pick(ex.placement, |a| out.tried(a));
                    continue;
                }
            };
            out.sent = true;
            let (head, first_output) = match self.wait_head(session, &mut up, &ex, deadline).await {
                Ok(h) => h,
                // Reset or closed before one byte of an answer: a crashing or restarting
                // server. Inference has no side effect to repeat, so another replica gets it.
                Err(ForwardError::Broken { detail }) if up.heard_nothing() => {
                    out.judge(false);
                    // An idle connection the replica closed as it was reused is the
                    // keep-alive race, not a sign of a failing replica.
                    if !reused {
                        failed(&ex, lease.replica());
                    }
                    tracing::warn!(request_id = %ex.request_id, replica = %addr, error = %detail, "replica closed the connection before answering");
                    let other = may_retry
                        .then(|| ex.route.pick(ex.placement, |a| out.tried(a)))
                        .flatten();
                    match other {
                        Some(other) => {
                            out.sent = false;
                            next = Some(other);
                            continue;
                        }
                        None => return Err(ForwardError::Broken { detail }),
                    }
                }
                Err(e) => return Err(e),
            };
            // An overloaded or restarting replica (502, 503) has not started on the request:
            // it goes to another replica while one is left, within the attempts and the time.
            let status = head.status.as_u16();
            let refused = matches!(status, 502 | 503);
            out.judge(!refused);
            if matches!(status, 502..=504) {
                failed(&ex, lease.replica());
            } else {
                lease.replica().succeeded();
            }
            if refused && may_retry {
                if let Some(other) = ex.route.pick(ex.placement, |a| out.tried(a)) {
                    tracing::warn!(request_id = %ex.request_id, replica = %addr, status, "replica refused the request; trying another");
                    // It did no work on it: only the next attempt can make it billable.
                    out.sent = false;
                    next = Some(other);
                    continue;
                }
            }
            break (up, lease, head, first_output);
        };
        out.first_byte = Some(ex.started.elapsed());
        out.upstream_status = head.status.as_u16();
        let limits = relay::Limits {
            idle: ex.pool.timeouts.idle,
            first_output: ex.stream.then_some(first_output),
            deadline,
        };
        let ending = relay::relay(session, &ex, &mut up, &mut head, limits, self.describe, out);
        match ending.await? {
            Ending::Written(relayed) => Ok(relayed),
            Ending::Pending { header, tail } => {
                answered(up, lease, ex.ticket.as_deref_mut());
                relay::deliver(session, header, tail).await
            }
        }
    }

    /// The first replica: one with room now, or after a wait in the pool's line, watching
    /// the client (one that leaves gives up its place at once).
    async fn acquire(
        &self,
        session: &mut Session,
        ex: &Exchange<'_>,
        deadline: Instant,
        out: &mut Outcome,
    ) -> Result<Lease, ForwardError> {
        let (route, pool) = (ex.route, &ex.pool.name);
        let patience = ex.pool.fleet.queue.timeout;
        self.acquire_for(
            session,
            route,
            pool,
            (ex.placement, patience),
            deadline,
            out,
        )
        .await
    }

    /// A replica of `route` with room now, or after a wait in its line.
    async fn acquire_for(
        &self,
        session: &mut Session,
        route: &Arc<PoolRoute>,
        pool: &str,
        (placement, patience): (Placement, Duration),
        deadline: Instant,
        out: &mut Outcome,
    ) -> Result<Lease, ForwardError> {
        let pool = || pool.to_string();
        // Biased: a replica with room is the common case, found without waiting and without
        // looking at the client's socket.
        let got = tokio::select! {
            biased;
            got = route.acquire_within(placement, deadline, patience) => got,
            _ = client_gone(session.as_downstream_mut()) => return Err(ForwardError::ClientGone),
        };
        match got {
            Ok((lease, waited)) => {
                if !waited.is_zero() {
                    out.queued = Some(waited);
                }
                Ok(lease)
            }
            Err(NoRoom::Empty) => Err(ForwardError::NoReplica { pool: pool() }),
            Err(NoRoom::QueueFull { max_waiting }) => Err(ForwardError::QueueFull {
                pool: pool(),
                max_waiting,
            }),
            Err(NoRoom::Timeout { waited }) => {
                out.queued = Some(waited);
                Err(ForwardError::NoCapacity {
                    pool: pool(),
                    waited_ms: waited.as_millis() as u64,
                })
            }
        }
    }

    /// Waits for the replica's response header, watching the client. Returns it with the
    /// moment the first generated output is due.
    ///
    /// `first_byte_ms` bounds the wait for the first generated output. A stream's header
    /// comes at once and its first event after prefill, so the relay applies the bound to
    /// that event; a whole answer's header comes only when all of it is generated, so the
    /// wait for it is bounded by `total_ms` alone. Dropping the connection on any failure
    /// closes it, which tells the replica to stop.
    async fn wait_head(
        &self,
        session: &mut Session,
        up: &mut Conn,
        ex: &Exchange<'_>,
        deadline: Instant,
    ) -> Result<(Head, Instant), ForwardError> {
        let first_output = deadline.min(Instant::now() + ex.pool.timeouts.first_byte);
        let head_deadline = if ex.stream { first_output } else { deadline };
        let head = tokio::select! {
            r = timeout_at(head_deadline, up.read_head()) => r,
            _ = client_gone(session.as_downstream_mut()) => return Err(ForwardError::ClientGone),
        };
        match head {
            Ok(Ok(head)) => Ok((head, first_output)),
            Ok(Err(e)) => Err(ForwardError::Broken {
                detail: e.0.to_string(),
            }),
            Err(_) => Err(ForwardError::Timeout {
                phase: if head_deadline < deadline {
                    "no response header within first_byte_ms"
                } else {
                    "no complete answer within total_ms"
                },
            }),
        }
    }

    /// Connects to the lease's replica and sends the whole request; says whether the
    /// connection was an idle one reused. A stale pooled connection is replaced by a fresh
    /// one; any other failure moves the request to another replica.
    async fn send(
        &self,
        lease: &Lease,
        ex: &Exchange<'_>,
        deadline: Instant,
    ) -> Result<(Conn, bool), String> {
        let head = request_head(ex, &lease.replica().authority);
        self.open(lease, &head, &ex.body, deadline).await
    }

    /// Connects to the lease's replica, or reuses one of its idle connections, and sends
    /// `head` then `body`; says whether the connection was reused. Pooled connections the
    /// replica closed meanwhile fail the send; a few are tried, then a fresh connection, so a
    /// pool of stale ones never fails the request.
    pub(super) async fn open(
        &self,
        lease: &Lease,
        head: &[u8],
        body: &[u8],
        deadline: Instant,
    ) -> Result<(Conn, bool), String> {
        let replica = lease.replica();
        let mut stale = 0;
        loop {
            let pooled = if stale < MAX_STALE {
                replica.reuse()
            } else {
                None
            };
            let (stream, reused) = match pooled {
                Some(stream) => (stream, true),
                // Boxed: the connector's future is over 8 KiB (it can do TLS), and held inline
                // it would make every request's future that size, moved on each request, for
                // the few requests that connect.
                None => match timeout_at(
                    deadline,
                    Box::pin(self.connector.new_stream(replica.peer())),
                )
                .await
                {
                    Ok(Ok(stream)) => (stream, false),
                    Ok(Err(e)) => return Err(format!("connect: {}", e.etype().as_str())),
                    Err(_) => return Err("connect: total timeout".into()),
                },
            };
            let mut up = Conn::new(stream);
            match timeout_at(deadline, up.send(head, body)).await {
                Ok(Ok(())) => return Ok((up, reused)),
                Ok(Err(_)) if reused => stale += 1,
                Ok(Err(e)) => return Err(format!("send: {}", e.kind())),
                Err(_) => return Err("send: total timeout".into()),
            }
        }
    }
}

/// Counts a failed attempt towards the replica's ejection, and says so when it ejects it.
fn failed(ex: &Exchange<'_>, replica: &Replica) {
    failed_in(ex.route, &ex.pool.name, replica)
}

fn failed_in(route: &PoolRoute, pool: &str, replica: &Replica) {
    if let Some(out_for) = route.failed(replica) {
        tracing::warn!(pool = %pool, replica = %replica.authority, ejected_ms = out_for.as_millis() as u64, "replica ejected after failures in a row");
    }
}

/// Stale pooled connections tried for one request before a fresh connection is opened.
const MAX_STALE: u32 = 4;

/// The request line and header fields, ending in the empty line. Every value is known safe:
/// the path is ours, the request id was checked or generated, the upstream key was checked
/// when the config was loaded.
fn request_head(ex: &Exchange<'_>, authority: &str) -> Vec<u8> {
    let accept: &[u8] = if ex.stream {
        b"text/event-stream"
    } else {
        b"application/json"
    };
    let mut length = itoa::Buffer::new();
    let parts: [&[u8]; 11] = [
        b"POST ",
        ex.path.as_bytes(),
        b" HTTP/1.1\r\nhost: ",
        authority.as_bytes(),
        b"\r\ncontent-type: application/json\r\ncontent-length: ",
        length.format(ex.body.len()).as_bytes(),
        b"\r\naccept: ",
        accept,
        b"\r\nx-request-id: ",
        ex.request_id.as_bytes(),
        b"\r\n",
    ];
    let key = ex.pool.upstream_key.as_ref().map(|k| k.expose().as_bytes());
    let authorization: [&[u8]; 3] = [b"authorization: Bearer ", key.unwrap_or_default(), b"\r\n"];
    let authorization = if key.is_some() {
        &authorization[..]
    } else {
        &[]
    };
    let size = parts
        .iter()
        .chain(authorization)
        .map(|p| p.len())
        .sum::<usize>()
        + 2;
    let mut h = Vec::with_capacity(size);
    for part in parts.iter().chain(authorization) {
        h.extend_from_slice(part);
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// Resolves when the client has closed its connection; pending otherwise.
pub(crate) async fn client_gone(downstream: &mut ServerSession) {
    if downstream.read_body_or_idle(true).await.is_err() {
        return;
    }
    // Unexpected bytes after a complete request: not a disconnect; keep waiting for nothing.
    std::future::pending::<()>().await
}
