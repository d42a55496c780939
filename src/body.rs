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
    /// The body stopped arriving for longer than the read timeout.
    TimedOut,
    /// The client closed the connection before the body was complete.
    ClientGone,
    /// The body is malformed (a bad chunk, say).
    Read(String),
}

impl BodyError {
    fn of(e: &pingora::Error) -> BodyError {
        use pingora::ErrorType::{ConnectionClosed, ReadError, ReadTimedout};
        match e.etype() {
            ReadTimedout => BodyError::TimedOut,
            ConnectionClosed | ReadError => BodyError::ClientGone,
            other if other.as_str() == "PrematureBodyEnd" => BodyError::ClientGone,
            other => BodyError::Read(other.as_str().to_string()),
        }
    }
}

/// A Content-Length value: one number, or a list of the same number repeated (RFC 9110
/// §8.6 allows a recipient to accept that; Pingora does).
fn content_length(v: &http::HeaderValue) -> Option<u64> {
    let mut values = v
        .to_str()
        .ok()?
        .split(',')
        .map(|n| n.trim().parse::<u64>().ok());
    let first = values.next()??;
    values.all(|n| n == Some(first)).then_some(first)
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
        Some(v) => Some(content_length(v).ok_or(BodyError::BadLength)?),
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
            .map_err(|_| BodyError::ClientGone)?;
    }
    // Pre-size for Content-Length bodies; chunked bodies grow as they arrive.
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit) as usize);
    loop {
        let chunk = session
            .as_downstream_mut()
            .read_request_body()
            .await
            .map_err(|e| BodyError::of(&e))?;
        let Some(chunk) = chunk else { break };
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(BodyError::TooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_one_number_or_the_same_number_repeated() {
        let cl = |s: &str| content_length(&http::HeaderValue::from_str(s).unwrap());
        assert_eq!(cl("77"), Some(77));
        assert_eq!(cl(" 77 "), Some(77));
        assert_eq!(cl("77, 77"), Some(77));
        assert_eq!(cl("77,78"), None);
        assert_eq!(cl("abc"), None);
        assert_eq!(cl("77,"), None);
        assert_eq!(cl(""), None);
    }
}
