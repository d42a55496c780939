//! Reading the request body with a cap, before any upstream is contacted.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Larger than `server.max_body_bytes`, by Content-Length or by counting chunks.
    TooLarge {
        limit: u64,
    },
    BadLength,
    Read(String),
}

/// Reads the whole body, refusing it as soon as it is known to pass `limit` bytes: at once from
/// Content-Length, else when the running count of a chunked body passes the cap. Answers
/// `Expect: 100-continue` only once the declared length fits.
pub async fn read_capped(session: &mut Session, limit: u64) -> Result<Bytes, BodyError> {
    let declared = match session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
    {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(BodyError::BadLength)?,
        ),
    };
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge { limit });
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session
            .as_downstream_mut()
            .write_continue_response()
            .await
            .map_err(|e| BodyError::Read(e.etype().as_str().to_string()))?;
    }
    // Pre-size for Content-Length bodies; chunked bodies grow as they arrive.
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit) as usize);
    loop {
        let chunk = session
            .as_downstream_mut()
            .read_request_body()
            .await
            .map_err(|e| BodyError::Read(e.etype().as_str().to_string()))?;
        let Some(chunk) = chunk else { break };
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(BodyError::TooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}
