//! Relaying the replica's response: the header, then each body chunk as soon as it arrives
//! (or, for answers translated whole, everything at the end), watching the client so that a
//! departure cancels the replica at once.

use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
    TRANSFER_ENCODING,
};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use tokio::time::Instant;

use super::h1::{Conn, H1Error, Head};
use super::transcode::Transcoder;
use super::{client_gone, Exchange, ForwardError, Outcome, Relayed};
use crate::translate::replica_error;
use crate::vocab::{self, Problem};

/// The replica's response fields a client sees. A replica's other fields are about the
/// replica, not the answer: its `Server`, its cookies, its own rate limits, tokens of the
/// infrastructure behind it, fields about its hop. A client reads only what tollgate means to
/// send: these, the body's framing, and tollgate's own fields (request id, rate limits).
const FROM_REPLICA: [HeaderName; 2] = [CONTENT_TYPE, RETRY_AFTER];

/// How long the answer may take: to its first chunk (streams), between two chunks, and in
/// all.
#[derive(Clone, Copy)]
pub(super) struct Limits {
    pub idle: Duration,
    /// When the first body chunk must have come (`first_byte_ms` after the request was sent),
    /// for streams, whose first event waits for prefill. `None`: `idle` applies from the start.
    pub first_output: Option<Instant>,
    pub deadline: Instant,
}

/// Returns how the response ended and whether the upstream connection may be pooled again.
/// However it ends, what was observed of the answer is left in `outcome` for accounting.
pub(super) async fn relay(
    session: &mut Session,
    ex: &Exchange<'_>,
    up: &mut Conn,
    upstream: &mut Head,
    limits: Limits,
    describe: fn(&ForwardError) -> Problem,
    outcome: &mut Outcome,
) -> Result<Ending, ForwardError> {
    let sse = upstream
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let inter_token = ex.inter_token.clone();
    let mut transcoder = Transcoder::new(&ex.plan, upstream.status.as_u16(), sse, inter_token);
    let status = replica_error::client_status(upstream.status.as_u16());
    upstream.status = http::StatusCode::from_u16(status).unwrap_or(upstream.status);
    let result = pump(
        session,
        ex,
        up,
        upstream,
        &mut transcoder,
        limits,
        describe,
        outcome,
    )
    .await;
    let seen = &transcoder.observed;
    outcome.usage = seen.usage;
    outcome.output_estimate = seen.output_estimate;
    outcome.first_token = seen
        .first_token
        .map(|t| t.into_std().saturating_duration_since(ex.started));
    result
}

#[allow(clippy::too_many_arguments)]
async fn pump(
    session: &mut Session,
    ex: &Exchange<'_>,
    up: &mut Conn,
    upstream: &mut Head,
    transcoder: &mut Transcoder,
    limits: Limits,
    describe: fn(&ForwardError) -> Problem,
    outcome: &mut Outcome,
) -> Result<Ending, ForwardError> {
    let Limits {
        idle,
        mut first_output,
        deadline,
    } = limits;
    let status = upstream.status.as_u16();
    if transcoder.streams() {
        let framing = stream_framing(session);
        let header = response_header(upstream, transcoder, ex, framing).map_err(|e| broken(&e))?;
        outcome.status = status;
        if session
            .write_response_header(Box::new(header), false)
            .await
            .is_err()
        {
            return Err(ForwardError::ClientGone);
        }
    }

    // One timer for the whole answer, not one per read: it is set for when the answer would
    // be late as things stood when it was set, and when it fires it is moved to when the
    // answer is late now (later, if data came meanwhile). A stream of many events then
    // registers a timer a few times instead of once per event.
    let mut last_data = Instant::now();
    let due = |first_output: Option<Instant>, last_data: Instant| {
        deadline.min(first_output.unwrap_or(last_data + idle))
    };
    let timer = tokio::time::sleep_until(due(first_output, last_data));
    tokio::pin!(timer);
    loop {
        let read = tokio::select! {
            // Data that is there is taken before the timer is heard: it was in time.
            biased;
            r = up.read_body() => Ok(r),
            _ = client_gone(session.as_downstream_mut()) => return Err(ForwardError::ClientGone),
            () = &mut timer => {
                let read_deadline = due(first_output, last_data);
                if read_deadline > Instant::now() {
                    timer.as_mut().reset(read_deadline);
                    continue;
                }
                Err(read_deadline)
            }
        };
        let fed = match read {
            Ok(Ok(Some(chunk))) => {
                let fed = feed(transcoder, up, &chunk);
                // Before the first token only a role chunk or keep-alives come: prefill runs
                // until it, under `first_byte_ms`; then `idle_ms` applies.
                if transcoder.observed.first_token.is_some() {
                    first_output = None;
                }
                fed
            }
            Ok(Ok(None)) => break,
            Ok(Err(H1Error(detail))) => Err(ForwardError::Broken {
                detail: detail.to_string(),
            }),
            Err(read_deadline) => Err(ForwardError::Timeout {
                phase: if read_deadline >= deadline {
                    "no complete answer within total_ms"
                } else if first_output.is_some() {
                    "no first token within first_byte_ms"
                } else {
                    "no data within idle_ms"
                },
            }),
        };
        if fed.is_ok() && up.complete() {
            // The end of the body came in the same read: what it produced goes out with the
            // end of the response, after the connection is back in the pool, rather than
            // once now and the end after another turn of the loop.
            break;
        }
        // What the chunks produced goes out even when a later one failed: the client gets
        // every event the replica completed, then the error.
        if let Some(out) = transcoder.take_output() {
            // Kept current, so a request cut by a shutdown is accounted from what it sent.
            outcome.usage = transcoder.observed.usage;
            outcome.output_estimate = transcoder.observed.output_estimate;
            if session.write_response_body(Some(out), false).await.is_err() {
                return Err(ForwardError::ClientGone);
            }
        }
        let Err(failure) = fed else {
            // The idle clock restarts once what came is written: time spent writing to a
            // slow client is not the replica's silence.
            last_data = Instant::now();
            continue;
        };
        if !transcoder.streams() {
            // Nothing was sent yet: the client gets a proper error status instead.
            return Err(failure);
        }
        // The status is already on the wire: end an event stream with an error event the
        // client's SDK raises; any other body can only be cut, so the client sees it short.
        let problem = describe(&failure);
        tracing::warn!(request_id = %ex.request_id, error = problem.code, "replica failed mid-response");
        outcome.broke_off = Some(failure);
        let Some(event) = transcoder.on_fail(&problem) else {
            return Ok(Ending::Written(Relayed::Cut));
        };
        if session
            .write_response_body(Some(event), false)
            .await
            .is_err()
            || session.write_response_body(None, true).await.is_err()
        {
            return Err(ForwardError::ClientGone);
        }
        return Ok(Ending::Written(Relayed::Complete));
    }

    let tail = transcoder
        .on_end()
        .map_err(|detail| ForwardError::Broken { detail })?;
    let header = if transcoder.streams() {
        None
    } else {
        let header = response_header(upstream, transcoder, ex, Framing::Length(tail.len()))
            .map_err(|e| broken(&e))?;
        outcome.status = status;
        Some(Box::new(header))
    };
    Ok(Ending::Pending { header, tail })
}

/// Gives the transcoder `chunk` and every further piece of the body already read: events
/// that arrived together leave in one write to the client, not one write (and one system
/// call, and one chunk header) each. The end of the body and a failure to decode it are
/// left for the next `read_body`.
fn feed(transcoder: &mut Transcoder, up: &mut Conn, chunk: &[u8]) -> Result<(), ForwardError> {
    transcoder.observed.next_read();
    // The pieces already read are no more than the connection holds (their framing aside).
    transcoder.expect(chunk.len() + up.buffered_len());
    transcoder
        .on_chunk(chunk)
        .and_then(|()| up.each_buffered(|more| transcoder.on_chunk(more)))
        .map_err(|detail| ForwardError::Broken { detail })
}

/// How the relay ended.
pub(super) enum Ending {
    /// Everything the client gets is written; the upstream connection is not reusable.
    Written(Relayed),
    /// The replica's answer is complete; this is what remains to send the client. It is sent
    /// after the upstream connection is back in the pool and the replica's slot is released,
    /// so the client's next request finds both instead of opening another connection or
    /// counting this request against the replica.
    Pending {
        /// For answers rendered whole: their header, not sent yet.
        header: Option<Box<ResponseHeader>>,
        tail: Bytes,
    },
}

/// Sends what a `Pending` ending left, and ends the response.
pub(super) async fn deliver(
    session: &mut Session,
    header: Option<Box<ResponseHeader>>,
    tail: Bytes,
) -> Result<Relayed, ForwardError> {
    let sent = match header {
        None => finish_stream(session, tail).await,
        Some(header) => match session.write_response_header(header, false).await {
            Ok(()) => session.write_response_body(Some(tail), true).await,
            Err(e) => Err(e),
        },
    };
    sent.map(|()| Relayed::Complete)
        .map_err(|_| ForwardError::ClientGone)
}

async fn finish_stream(session: &mut Session, tail: Bytes) -> pingora::Result<()> {
    if !tail.is_empty() {
        session.write_response_body(Some(tail), false).await?;
    }
    session.write_response_body(None, true).await
}

fn broken(e: &pingora::Error) -> ForwardError {
    ForwardError::Broken {
        detail: e.etype().as_str().to_string(),
    }
}

/// How the client's body ends.
#[derive(Clone, Copy)]
enum Framing {
    /// A body known whole: its length.
    Length(usize),
    /// A body relayed as it arrives, to an HTTP/1.1 client.
    Chunked,
    /// A body relayed as it arrives, to an HTTP/1.0 client: HTTP/1.0 has no chunked coding,
    /// so the body ends where the connection closes (RFC 9112 §6.3, RFC 1945 §7.2.2).
    UntilClose,
}

/// The framing of a body relayed as it arrives, for this client. A body that ends with the
/// connection leaves no connection to keep.
fn stream_framing(session: &mut Session) -> Framing {
    if session.req_header().version == http::Version::HTTP_11 {
        return Framing::Chunked;
    }
    session.set_keepalive(None);
    Framing::UntilClose
}

/// The client's response header. Of the replica's fields only those in `FROM_REPLICA` pass
/// (the content type unless the transcoder renames it); then the body's framing and
/// tollgate's own fields.
fn response_header(
    upstream: &mut Head,
    transcoder: &Transcoder,
    ex: &Exchange<'_>,
    framing: Framing,
) -> pingora::Result<ResponseHeader> {
    // The replica's fields, the framing, tollgate's own and the request id under two names:
    // sized for all of them, so the map never grows while it is filled.
    let capacity = FROM_REPLICA.len() + 1 + ex.own_fields.len() + vocab::ID_FIELDS;
    let mut out = HeaderMap::with_capacity(capacity);
    for name in FROM_REPLICA {
        // `remove` takes the field's first value: one content type, one retry-after.
        if let Some(value) = upstream.headers.remove(&name) {
            out.insert(name, value);
        }
    }
    if let Some(t) = transcoder.content_type() {
        out.insert(CONTENT_TYPE, HeaderValue::from_static(t));
    }
    match framing {
        Framing::Length(n) => {
            out.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
        Framing::Chunked => {
            out.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        Framing::UntilClose => {}
    }
    vocab::add_own_fields(&mut out, ex.request_id, ex.own_fields)?;
    Ok(vocab::client_header(upstream.status, out))
}
