//! The upstream exchange, driven by tollgate itself (the body was already read, so Pingora's
//! proxy loop cannot send it): pick a replica, connect (another replica on connect failure),
//! send, relay the response as it arrives, and cancel the replica when the client leaves.

pub mod h1;
mod observe;
pub(crate) mod pool;
mod relay;

use relay::Ending;
mod transcode;

use std::net::SocketAddr;

use bytes::Bytes;
use h1::{Conn, Head};
use pingora::connectors::TransportConnector;
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use tokio::time::{timeout_at, Instant};

use crate::config::Pool;
use crate::ctx::RequestCtx;
use crate::metrics::Metrics;
use crate::route::{Lease, PoolRoute};
use crate::translate::ResponsePlan;

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
}

/// What to send: the request is complete in memory, so it can be retried on another replica.
pub struct Exchange<'a> {
    pub pool: &'a Pool,
    pub route: &'a PoolRoute,
    pub path: &'static str,
    pub body: Bytes,
    pub stream: bool,
    pub plan: ResponsePlan,
}

/// How a relayed response ended once its header had gone to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    Complete,
    /// Cut short by the replica; the client connection must be dropped, not reused.
    Cut,
}

/// Opens upstream connections; idle ones wait in their replica's pool (`pool::IdleConns`).
pub struct Upstream {
    connector: TransportConnector,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            connector: TransportConnector::new(None),
        }
    }
}

impl Upstream {
    pub async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        metrics: &Metrics,
        ex: Exchange<'_>,
    ) -> Result<Relayed, ForwardError> {
        let deadline = Instant::now() + ex.pool.timeouts.total;
        let mut tried: Vec<SocketAddr> = Vec::with_capacity(2);
        let mut next = ex.route.pick(&tried);
        let (mut up, lease, mut head, first_output) = loop {
            let Some(lease) = next.take() else {
                return Err(if tried.is_empty() {
                    ForwardError::NoReplica {
                        pool: ex.pool.name.clone(),
                    }
                } else {
                    ForwardError::Unreachable {
                        attempts: ctx.attempts,
                    }
                });
            };
            let addr = lease.replica().addr;
            tried.push(addr);
            ctx.attempts += 1;
            ctx.replica = Some(lease.replica().authority.clone());
            let may_retry = ctx.attempts < ex.pool.max_attempts.get();
            let mut up = match self.send(&lease, &ex, &ctx.request_id, deadline).await {
                Ok(up) => up,
                Err(detail) => {
                    metrics.observe_attempt(&lease.replica().meters, false);
                    tracing::warn!(request_id = %ctx.request_id, replica = %addr, error = %detail, "replica attempt failed");
                    if !may_retry {
                        return Err(ForwardError::Unreachable {
                            attempts: ctx.attempts,
                        });
                    }
                    next = ex.route.pick(&tried);
                    continue;
                }
            };
            ctx.sent = true;
            let (head, first_output) = self.wait_head(session, &mut up, &ex, deadline).await?;
            // An overloaded or restarting replica (502, 503) has not started on the request:
            // it goes to another replica while one is left, within the attempts and the time.
            let refused = matches!(head.status.as_u16(), 502 | 503);
            metrics.observe_attempt(&lease.replica().meters, !refused);
            if refused && may_retry {
                if let Some(other) = ex.route.pick(&tried) {
                    tracing::warn!(request_id = %ctx.request_id, replica = %addr, status = head.status.as_u16(), "replica refused the request; trying another");
                    // It did no work on it: only the next attempt can make it billable.
                    ctx.sent = false;
                    next = Some(other);
                    continue;
                }
            }
            break (up, lease, head, first_output);
        };
        ctx.first_byte = Some(ctx.started.elapsed());
        ctx.upstream_status = head.status.as_u16();
        let ending = relay::relay(
            session,
            ctx,
            &mut up,
            &mut head,
            &ex.plan,
            ctx.runtime
                .as_ref()
                .and_then(|r| r.meters.model(ctx.model_label()))
                .map(|m| m.itl.clone()),
            relay::Limits {
                idle: ex.pool.timeouts.idle,
                first_output: ex.stream.then_some(first_output),
                deadline,
            },
        )
        .await?;
        match ending {
            Ending::Written(relayed) => Ok(relayed),
            Ending::Pending { header, tail } => {
                if up.reusable() {
                    lease.replica().keep(up.into_stream());
                }
                relay::deliver(session, header, tail).await
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

    /// Connects to the lease's replica and sends the whole request. A stale pooled connection
    /// is replaced by a fresh one; any other failure moves the request to another replica.
    async fn send(
        &self,
        lease: &Lease,
        ex: &Exchange<'_>,
        request_id: &str,
        deadline: Instant,
    ) -> Result<Conn, String> {
        let replica = lease.replica();
        let head = request_head(ex, &replica.authority, request_id);
        // Pooled connections the replica closed meanwhile fail the send; a few are tried,
        // then a fresh connection, so a pool of stale ones never fails the request.
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
            match timeout_at(deadline, up.send(&head, &ex.body)).await {
                Ok(Ok(())) => return Ok(up),
                Ok(Err(_)) if reused => stale += 1,
                Ok(Err(e)) => return Err(format!("send: {}", e.kind())),
                Err(_) => return Err("send: total timeout".into()),
            }
        }
    }
}

/// Stale pooled connections tried for one request before a fresh connection is opened.
const MAX_STALE: u32 = 4;

/// The request line and header fields, ending in the empty line. Every value is known safe:
/// the path is ours, the request id was checked or generated, the upstream key was checked
/// when the config was loaded.
fn request_head(ex: &Exchange<'_>, authority: &str, request_id: &str) -> Vec<u8> {
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
        request_id.as_bytes(),
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
