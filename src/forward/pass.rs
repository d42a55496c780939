//! The pass-through exchange of deployed models: the client's request goes to a replica as it
//! arrives, body streamed, nothing parsed; the replica's answer comes back as it arrives,
//! status, fields (hop-by-hop ones aside) and body unchanged.
//!
//! Retries differ from the Model API's: a request whose body the replica has seen is never
//! sent again (a predict may have side effects, and the body is not kept). A refused connect,
//! or a 502/503 answer before any byte of the body went out, moves it to another replica.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use pingora::proxy::Session;
use tokio::time::{timeout_at, Instant};

use super::h1::{Conn, Head};
use super::{client_gone, failed_in, ForwardError, Outcome, Relayed, Upstream};
use crate::body::{BodyError, Upload};
use crate::config::{BodyPace, Pool};
use crate::limits::Ticket;
use crate::route::{Lease, Placement, PoolRoute};
use crate::vocab;

/// What to pass on.
pub struct Pass<'a> {
    pub pool: &'a Pool,
    pub route: &'a Arc<PoolRoute>,
    pub placement: Placement,
    pub method: &'a str,
    /// The path and query on the replica.
    pub target: &'a str,
    /// The client's fields to pass on, rendered as `name: value\r\n` lines (see
    /// [`forwarded_fields`]).
    pub fields: &'a [u8],
    pub request_id: &'a str,
    pub started: std::time::Instant,
    /// When the whole exchange must be over.
    pub deadline: Instant,
    /// How long it may wait in the pool's line for a replica.
    pub patience: std::time::Duration,
    /// The body's cap and pace (`server.max_body_bytes`, `server.body_*`).
    pub max_body: u64,
    pub pace: BodyPace,
    /// tollgate's own response fields (rate-limit headers), last on the client's header.
    pub own_fields: &'a [(HeaderName, HeaderValue)],
    /// The call's reservation: its concurrency slot is freed with the replica's.
    pub ticket: Option<&'a mut Ticket>,
}

/// Why a pass-through failed before its answer was complete.
#[derive(Debug)]
pub enum PassError {
    Forward(ForwardError),
    /// The client's body: too large, too slow, malformed, or the client gone.
    Body(BodyError),
}

impl From<ForwardError> for PassError {
    fn from(e: ForwardError) -> Self {
        PassError::Forward(e)
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1), never passed on in either direction.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

fn hop_by_hop(name: &HeaderName, connection: &[String]) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || connection.iter().any(|c| c == name.as_str())
}

/// The names a `Connection` field lists: hop-by-hop too.
fn connection_names(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The client's fields a replica gets: all but hop-by-hop ones, its credentials, and those
/// tollgate sets itself (host, framing, forwarding, request id); then `x-forwarded-for`
/// (the client's address appended to any it sent) and `x-forwarded-proto`.
pub fn forwarded_fields(headers: &HeaderMap, client: Option<std::net::IpAddr>) -> Vec<u8> {
    const OWN: [&str; 10] = [
        "host",
        "content-length",
        "expect",
        "authorization",
        "x-api-key",
        "proxy-authorization",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        "request-id",
    ];
    let connection = connection_names(headers);
    let mut out = Vec::with_capacity(512);
    for (name, value) in headers {
        if OWN.contains(&name.as_str()) || hop_by_hop(name, &connection) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let earlier = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    let client = client.map(|ip| ip.to_string());
    let chain: Vec<&str> = [earlier.as_str(), client.as_deref().unwrap_or("")]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if !chain.is_empty() {
        out.extend_from_slice(b"x-forwarded-for: ");
        out.extend_from_slice(chain.join(", ").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    out
}

impl Upstream {
    /// Passes the request to a replica of `p.route` and relays its answer.
    pub async fn pass(
        &self,
        session: &mut Session,
        mut p: Pass<'_>,
        out: &mut Outcome,
    ) -> Result<Relayed, PassError> {
        let mut upload = Upload::start(session, p.max_body, &p.pace)
            .await
            .map_err(PassError::Body)?;
        let mut next = Some(
            self.acquire_for(
                session,
                p.route,
                &p.pool.name,
                (p.placement, p.patience),
                p.deadline,
                out,
            )
            .await?,
        );
        let (up, lease, head) = loop {
            let Some(lease) = next.take() else {
                return Err(ForwardError::Unreachable {
                    attempts: out.attempts.len() as u32,
                }
                .into());
            };
            out.attempt(&lease);
            let may_retry = (out.attempts.len() as u32) < p.pool.max_attempts.get();
            let replica = lease.replica().clone();
            let head = request_head(&p, &replica.authority, &upload);
            let mut up = match self.open(&lease, &head, &[], p.deadline).await {
                Ok((up, _)) => up,
                Err(detail) => {
                    out.judge(false);
                    failed_in(p.route, &p.pool.name, &replica);
                    tracing::warn!(request_id = %p.request_id, replica = %replica.addr, error = %detail, "replica attempt failed");
                    if may_retry {
                        next = p.route.pick(p.placement, |a| out.tried(a));
                    }
                    continue;
                }
            };
            out.sent = true;
            send_body(session, &mut up, &mut upload, p.deadline, out).await?;
            let head = wait_head(session, &mut up, p.deadline).await?;
            let status = head.status.as_u16();
            let refused = matches!(status, 502 | 503);
            out.judge(!refused);
            if matches!(status, 502..=504) {
                failed_in(p.route, &p.pool.name, &replica);
            } else {
                replica.succeeded();
            }
            // The replica saw no byte of a body: another may take it whole.
            if refused && may_retry && upload.received == 0 {
                if let Some(other) = p.route.pick(p.placement, |a| out.tried(a)) {
                    tracing::warn!(request_id = %p.request_id, replica = %replica.addr, status, "replica refused the request; trying another");
                    out.sent = false;
                    next = Some(other);
                    continue;
                }
            }
            break (up, lease, head);
        };
        out.first_byte = Some(p.started.elapsed());
        out.upstream_status = head.status.as_u16();
        let ticket = p.ticket.take();
        let answering = Answering {
            conn: up,
            lease,
            ticket,
        };
        relay(session, &p, answering, head, out).await
    }
}

/// The request line, tollgate's own fields and the client's, ending in the empty line.
fn request_head(p: &Pass<'_>, authority: &str, upload: &Upload) -> Vec<u8> {
    let mut h = Vec::with_capacity(256 + p.fields.len());
    h.extend_from_slice(p.method.as_bytes());
    h.push(b' ');
    h.extend_from_slice(p.target.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    h.extend_from_slice(authority.as_bytes());
    h.extend_from_slice(b"\r\n");
    h.extend_from_slice(p.fields);
    h.extend_from_slice(b"x-request-id: ");
    h.extend_from_slice(p.request_id.as_bytes());
    h.extend_from_slice(b"\r\n");
    match upload.declared {
        Some(n) => {
            h.extend_from_slice(b"content-length: ");
            h.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            h.extend_from_slice(b"\r\n");
        }
        None if !upload.is_empty() => h.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        None => {}
    }
    if let Some(key) = &p.pool.upstream_key {
        h.extend_from_slice(b"authorization: Bearer ");
        h.extend_from_slice(key.expose().as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// Passes the client's body on as it arrives: as it came for a Content-Length body, in
/// chunks otherwise. A body past the cap stops here; the replica's connection is dropped.
async fn send_body(
    session: &mut Session,
    up: &mut Conn,
    upload: &mut Upload,
    deadline: Instant,
    out: &mut Outcome,
) -> Result<(), PassError> {
    let chunked = upload.declared.is_none() && !upload.is_empty();
    loop {
        let piece = upload.next(session).await.map_err(PassError::Body)?;
        let sent = match &piece {
            Some(data) if chunked => {
                let size = format!("{:x}\r\n", data.len());
                let framed = [size.as_bytes(), data, b"\r\n"].concat();
                timeout_at(deadline, up.send(&framed, &[])).await
            }
            Some(data) => timeout_at(deadline, up.send(data, &[])).await,
            None if chunked => timeout_at(deadline, up.send(b"0\r\n\r\n", &[])).await,
            None => return Ok(()),
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(ForwardError::Broken {
                    detail: format!("send body: {}", e.kind()),
                }
                .into())
            }
            Err(_) => return Err(ForwardError::Timeout { phase: "predict" }.into()),
        }
        match piece {
            Some(data) => out.bytes_in += data.len() as u64,
            None => return Ok(()),
        }
    }
}

async fn wait_head(
    session: &mut Session,
    up: &mut Conn,
    deadline: Instant,
) -> Result<Head, PassError> {
    let head = tokio::select! {
        r = timeout_at(deadline, up.read_head()) => r,
        _ = client_gone(session.as_downstream_mut()) => return Err(ForwardError::ClientGone.into()),
    };
    match head {
        Ok(Ok(head)) => Ok(head),
        Ok(Err(e)) => Err(ForwardError::Broken {
            detail: e.0.to_string(),
        }
        .into()),
        Err(_) => Err(ForwardError::Timeout { phase: "predict" }.into()),
    }
}

/// The replica's connection, its slot and the call's reservation, held until the answer is
/// read to the end.
struct Answering<'t> {
    conn: Conn,
    lease: Lease,
    ticket: Option<&'t mut Ticket>,
}

impl Answering<'_> {
    /// The answer is read whole, before its last bytes are written (see `answered`).
    fn release(self) {
        super::answered(self.conn, self.lease, self.ticket);
    }
}

/// `chunk` and every further piece of the body already read, in one buffer: pieces that
/// arrived together leave in one write to the client rather than one write (and one system
/// call, and one chunk header) each. A piece alone is passed on as it is, without a copy.
fn with_buffered(chunk: Bytes, up: &mut Conn) -> Bytes {
    let Some(more) = up.buffered_body() else {
        return chunk;
    };
    let mut all = BytesMut::with_capacity(chunk.len() + more.len());
    all.extend_from_slice(&chunk);
    all.extend_from_slice(&more);
    while let Some(more) = up.buffered_body() {
        all.extend_from_slice(&more);
    }
    all.freeze()
}

/// The replica's answer as it arrives: its status and fields (hop-by-hop ones aside, and
/// tollgate's request id added), then each piece of its body.
async fn relay(
    session: &mut Session,
    p: &Pass<'_>,
    upstream: Answering<'_>,
    head: Head,
    out: &mut Outcome,
) -> Result<Relayed, PassError> {
    let mut upstream = Some(upstream);
    let connection = connection_names(&head.headers);
    let mut fields =
        HeaderMap::with_capacity(head.headers.len() + 1 + p.own_fields.len() + vocab::ID_FIELDS);
    for (name, value) in &head.headers {
        if !hop_by_hop(name, &connection) {
            fields.append(name.clone(), value.clone());
        }
    }
    let bodiless = p.method == "HEAD" || matches!(head.status.as_u16(), 204 | 304);
    if !bodiless && !fields.contains_key(CONTENT_LENGTH) {
        if session.req_header().version == http::Version::HTTP_11 {
            fields.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        } else {
            session.set_keepalive(None);
        }
    }
    let broken = |_| ForwardError::Broken {
        detail: "invalid response header".into(),
    };
    vocab::add_own_fields(&mut fields, p.request_id, p.own_fields).map_err(broken)?;
    let header = vocab::client_header(head.status, fields);
    out.status = head.status.as_u16();
    if session
        .write_response_header(Box::new(header), bodiless)
        .await
        .is_err()
    {
        return Err(ForwardError::ClientGone.into());
    }
    if bodiless {
        if let Some(u) = upstream.take() {
            u.release();
        }
        return Ok(Relayed::Complete);
    }
    // One timer for the answer's deadline, not one made and dropped for every read.
    let timer = tokio::time::sleep_until(p.deadline);
    tokio::pin!(timer);
    while let Some(up) = upstream.as_mut().map(|u| &mut u.conn) {
        // Biased: the end of an answer the client already has whole (its last bytes were
        // the Content-Length's) is not a departure, however soon the client then leaves;
        // and data that is there is taken before the deadline is heard.
        let read = tokio::select! {
            biased;
            r = up.read_body() => Ok(r),
            () = &mut timer => Err(()),
            _ = client_gone(session.as_downstream_mut()) => return Err(ForwardError::ClientGone.into()),
        };
        let chunk: Option<Bytes> = match read {
            Ok(Ok(chunk)) => chunk.map(|c| with_buffered(c, up)),
            Ok(Err(e)) => {
                tracing::warn!(request_id = %p.request_id, error = e.0, "replica failed mid-response");
                out.broke_off = Some(ForwardError::Broken {
                    detail: e.0.to_string(),
                });
                return Ok(Relayed::Cut);
            }
            Err(_) => {
                out.broke_off = Some(ForwardError::Timeout { phase: "predict" });
                return Ok(Relayed::Cut);
            }
        };
        let end = chunk.is_none() || up.complete();
        if let Some(c) = &chunk {
            out.bytes_out += c.len() as u64;
        }
        if end {
            if let Some(u) = upstream.take() {
                u.release();
            }
        }
        if let Some(c) = chunk {
            if session.write_response_body(Some(c), false).await.is_err() {
                return Err(ForwardError::ClientGone.into());
            }
        }
        if end && session.write_response_body(None, true).await.is_err() {
            return Err(ForwardError::ClientGone.into());
        }
    }
    Ok(Relayed::Complete)
}
