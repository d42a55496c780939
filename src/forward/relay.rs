//! Relaying the replica's response: header first, then each body chunk as soon as it arrives,
//! watching the client so a departure cancels the replica at once.

use std::time::Duration;

use pingora::http::ResponseHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use tokio::time::{timeout_at, Instant};

use super::{client_gone, ForwardError, Relayed};
use crate::ctx::RequestCtx;
use crate::error::GatewayError;
use crate::respond::{self, Dialect};

/// Headers that describe one hop's connection, not the response.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// Returns how the response ended and whether the upstream connection may be pooled again.
pub(super) async fn relay(
    session: &mut Session,
    ctx: &mut RequestCtx,
    up: &mut HttpSession,
    idle: Duration,
    deadline: Instant,
) -> Result<(Relayed, bool), ForwardError> {
    let Some(upstream) = up.response_header() else {
        return Err(ForwardError::Broken {
            detail: "no response header".into(),
        });
    };
    let header =
        downstream_header(upstream, &ctx.request_id).map_err(|e| ForwardError::Broken {
            detail: e.etype().as_str().to_string(),
        })?;
    let sse = header
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    ctx.status = header.status.as_u16();
    if ctx.status >= 400 {
        ctx.error = Some("upstream_status");
    }
    if session
        .write_response_header(Box::new(header), false)
        .await
        .is_err()
    {
        return Err(ForwardError::ClientGone);
    }

    loop {
        let read_deadline = deadline.min(Instant::now() + idle);
        let read = tokio::select! {
            r = timeout_at(read_deadline, up.read_response_body()) => r,
            _ = client_gone(session.as_downstream_mut()) => return Err(ForwardError::ClientGone),
        };
        let failure = match read {
            Ok(Ok(Some(chunk))) => {
                if session
                    .write_response_body(Some(chunk), false)
                    .await
                    .is_err()
                {
                    return Err(ForwardError::ClientGone);
                }
                continue;
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => ForwardError::Broken {
                detail: e.etype().as_str().to_string(),
            },
            Err(_) => ForwardError::Timeout {
                phase: "no data within idle_ms",
            },
        };
        // The status is already on the wire: end a stream with an error event the client's
        // SDK raises; any other body can only be cut, so the client sees it incomplete.
        let err = GatewayError::Forward(failure);
        ctx.error = Some(err.code());
        tracing::warn!(request_id = %ctx.request_id, error = err.code(), "replica failed mid-response");
        if !sse {
            return Ok((Relayed::Cut, false));
        }
        let event = respond::stream_error_event(Dialect::OpenAi, &err);
        if session
            .write_response_body(Some(event), false)
            .await
            .is_err()
            || session.write_response_body(None, true).await.is_err()
        {
            return Err(ForwardError::ClientGone);
        }
        return Ok((Relayed::Complete, false));
    }
    if session.write_response_body(None, true).await.is_err() {
        return Err(ForwardError::ClientGone);
    }
    Ok((Relayed::Complete, up.response_done()))
}

fn downstream_header(
    upstream: &ResponseHeader,
    request_id: &str,
) -> pingora::Result<ResponseHeader> {
    let mut h = ResponseHeader::build(upstream.status, Some(upstream.headers.len() + 2))?;
    for (name, value) in upstream.headers.iter() {
        if !HOP_BY_HOP.contains(&name.as_str()) && name != "x-request-id" {
            h.append_header(name.clone(), value.clone())?;
        }
    }
    if !h.headers.contains_key(http::header::CONTENT_LENGTH) {
        h.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
    }
    h.insert_header("x-request-id", request_id)?;
    Ok(h)
}
