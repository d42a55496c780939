//! The upstream exchange, driven by tollgate itself (the body was already read, so Pingora's
//! proxy loop cannot send it): pick a replica, connect (another replica on connect failure),
//! send, relay the response as it arrives, and cancel the replica when the client leaves.

mod observe;
mod relay;

use relay::Ending;
mod transcode;

use std::net::SocketAddr;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
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

/// Upstream connections, pooled and reused across requests.
pub struct Upstream {
    connector: Connector,
}

impl Upstream {
    pub fn new(keepalive_pool_size: usize) -> Self {
        let mut options = ConnectorOptions::new(keepalive_pool_size);
        options.keepalive_pool_size = keepalive_pool_size;
        Upstream {
            connector: Connector::new(Some(options)),
        }
    }

    pub async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        metrics: &Metrics,
        ex: Exchange<'_>,
    ) -> Result<Relayed, ForwardError> {
        let deadline = Instant::now() + ex.pool.timeouts.total;
        let mut tried: Vec<SocketAddr> = Vec::with_capacity(2);
        let (mut up, lease) = loop {
            let Some(lease) = ex.route.pick(&tried) else {
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
            ctx.replica = Some(addr);
            match self.send(&lease, &ex, &ctx.request_id, deadline).await {
                Ok(up) => {
                    metrics.observe_attempt(&lease.replica().label, true);
                    ctx.sent = true;
                    break (up, lease);
                }
                Err(detail) => {
                    metrics.observe_attempt(&lease.replica().label, false);
                    tracing::warn!(request_id = %ctx.request_id, replica = %addr, error = %detail, "replica attempt failed");
                    if ctx.attempts >= ex.pool.max_attempts.get() {
                        return Err(ForwardError::Unreachable {
                            attempts: ctx.attempts,
                        });
                    }
                }
            }
        };

        // Nothing is retried from here on: the replica may already be generating.
        let first_byte_deadline = deadline.min(Instant::now() + ex.pool.timeouts.first_byte);
        let header = tokio::select! {
            r = timeout_at(first_byte_deadline, up.read_response_header()) => r,
            _ = client_gone(session.as_downstream_mut()) => {
                up.shutdown().await;
                return Err(ForwardError::ClientGone);
            }
        };
        match header {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                up.shutdown().await;
                return Err(ForwardError::Broken {
                    detail: e.etype().as_str().to_string(),
                });
            }
            Err(_) => {
                up.shutdown().await;
                return Err(ForwardError::Timeout {
                    phase: "no response header before first_byte_ms",
                });
            }
        }
        ctx.first_byte = Some(ctx.started.elapsed());
        let ending = relay::relay(
            session,
            ctx,
            &mut up,
            &ex.plan,
            metrics.inter_token(ctx.model_label()),
            ex.pool.timeouts.idle,
            deadline,
        )
        .await?;
        let peer = lease.replica().peer();
        match ending {
            Ending::Written(relayed) => {
                up.shutdown().await;
                Ok(relayed)
            }
            Ending::Pending { header, tail } => {
                if up.response_done() {
                    self.connector
                        .release_http_session(up, peer, peer.options.idle_timeout)
                        .await;
                } else {
                    up.shutdown().await;
                }
                relay::deliver(session, header, tail).await
            }
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
    ) -> Result<HttpSession, String> {
        let replica = lease.replica();
        let header = request_header(ex, replica.addr, request_id).map_err(|e| e.to_string())?;
        for _ in 0..2 {
            let connect = timeout_at(deadline, self.connector.get_http_session(replica.peer()));
            let (mut up, reused) = match connect.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(format!("connect: {}", e.etype().as_str())),
                Err(_) => return Err("connect: total timeout".into()),
            };
            let sent = async {
                up.write_request_header(Box::new(header.clone())).await?;
                up.write_request_body(ex.body.clone(), true).await?;
                up.finish_request_body().await
            };
            match timeout_at(deadline, sent).await {
                Ok(Ok(())) => return Ok(up),
                Ok(Err(_)) if reused => continue,
                Ok(Err(e)) => return Err(format!("send: {}", e.etype().as_str())),
                Err(_) => return Err("send: total timeout".into()),
            }
        }
        Err("send: pooled connections were closed by the replica".into())
    }
}

fn request_header(
    ex: &Exchange<'_>,
    addr: SocketAddr,
    request_id: &str,
) -> pingora::Result<RequestHeader> {
    let mut h = RequestHeader::build("POST", ex.path.as_bytes(), Some(6))?;
    h.insert_header(http::header::HOST, addr.to_string())?;
    h.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    h.insert_header(http::header::CONTENT_LENGTH, ex.body.len())?;
    let accept = if ex.stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    h.insert_header(http::header::ACCEPT, accept)?;
    h.insert_header("x-request-id", request_id)?;
    if let Some(key) = &ex.pool.upstream_key {
        h.insert_header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", key.expose()),
        )?;
    }
    Ok(h)
}

/// Resolves when the client has closed its connection; pending otherwise.
pub(crate) async fn client_gone(downstream: &mut ServerSession) {
    if downstream.read_body_or_idle(true).await.is_err() {
        return;
    }
    // Unexpected bytes after a complete request: not a disconnect; keep waiting for nothing.
    std::future::pending::<()>().await
}
