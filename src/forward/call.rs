//! One whole exchange with a replica already leased, for work that has no client connection
//! (async predict): a JSON body in memory, the answer read whole under a cap. Same client
//! (`h1`), same idle connections and the same ejection accounting as the relayed exchanges.

use bytes::{Bytes, BytesMut};
use tokio::time::{timeout_at, Instant};

use super::{failed_in, ForwardError, Upstream};
use crate::config::Pool;
use crate::route::{Lease, PoolRoute};

/// A replica's complete answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// What to send.
pub struct Call<'a> {
    pub pool: &'a Pool,
    pub route: &'a PoolRoute,
    pub path: &'a str,
    pub body: &'a [u8],
    pub request_id: &'a str,
    pub deadline: Instant,
    /// An answer body larger than this fails the call.
    pub max_answer: usize,
}

impl Upstream {
    /// POSTs `c.body` to the lease's replica and reads its whole answer.
    pub async fn call(&self, lease: &Lease, c: Call<'_>) -> Result<Answer, ForwardError> {
        let replica = lease.replica().clone();
        let head = call_head(&c, &replica.authority);
        let mut up = match self.open(lease, &head, c.body, c.deadline).await {
            Ok((up, _)) => up,
            Err(detail) => {
                failed_in(c.route, &c.pool.name, &replica);
                return Err(ForwardError::Broken { detail });
            }
        };
        let timeout = ForwardError::Timeout {
            phase: "async run timeout",
        };
        let head = match timeout_at(c.deadline, up.read_head()).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                failed_in(c.route, &c.pool.name, &replica);
                return Err(ForwardError::Broken {
                    detail: e.0.to_string(),
                });
            }
            Err(_) => return Err(timeout),
        };
        let status = head.status.as_u16();
        if matches!(status, 502..=504) {
            failed_in(c.route, &c.pool.name, &replica);
        } else {
            replica.succeeded();
        }
        let mut body = BytesMut::new();
        loop {
            match timeout_at(c.deadline, up.read_body()).await {
                Ok(Ok(Some(chunk))) => {
                    if body.len() + chunk.len() > c.max_answer {
                        return Err(ForwardError::Broken {
                            detail: format!("answer larger than {} bytes", c.max_answer),
                        });
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    return Err(ForwardError::Broken {
                        detail: e.0.to_string(),
                    })
                }
                Err(_) => return Err(timeout),
            }
        }
        if up.reusable() {
            replica.keep(up.into_stream());
        }
        Ok(Answer {
            status,
            body: body.freeze(),
        })
    }
}

fn call_head(c: &Call<'_>, authority: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(256);
    h.extend_from_slice(b"POST ");
    h.extend_from_slice(c.path.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    h.extend_from_slice(authority.as_bytes());
    h.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    h.extend_from_slice(itoa::Buffer::new().format(c.body.len()).as_bytes());
    h.extend_from_slice(b"\r\nx-request-id: ");
    h.extend_from_slice(c.request_id.as_bytes());
    h.extend_from_slice(b"\r\n");
    if let Some(key) = &c.pool.upstream_key {
        h.extend_from_slice(b"authorization: Bearer ");
        h.extend_from_slice(key.expose().as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(b"\r\n");
    h
}
