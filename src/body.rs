//! Reading the request body with a cap and a pace, before any upstream is contacted.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use tokio::time::{timeout_at, Instant};

use crate::config::BodyPace;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Larger than `server.max_body_bytes`, by Content-Length or by counting chunks.
    TooLarge {
        limit: u64,
    },
    BadLength,
    /// The body stopped arriving for longer than the read timeout.
    TimedOut,
    /// The body arrived slower than `server.body_min_bytes_per_sec` allows, past the
    /// `server.body_timeout_ms` every body has.
    TooSlow(BodyPace),
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
/// `Expect: 100-continue` only once the declared length fits. A body that falls behind `pace`
/// is refused when it does, however often its bytes come.
pub async fn read_capped(
    session: &mut Session,
    limit: u64,
    pace: &BodyPace,
) -> Result<Bytes, BodyError> {
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
    // From here the client is sending: after 100 Continue, if it asked for one.
    let start = Instant::now();
    loop {
        let due = start + allowance(pace, buf.len());
        let chunk = timeout_at(due, session.as_downstream_mut().read_request_body())
            .await
            .map_err(|_| BodyError::TooSlow(*pace))?
            .map_err(|e| BodyError::of(&e))?;
        let Some(chunk) = chunk else { break };
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(BodyError::TooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// How long a body that has delivered `received` bytes may take in all, from its first read.
fn allowance(pace: &BodyPace, received: usize) -> Duration {
    let extra_ms = (received as u64).saturating_mul(1000) / pace.min_rate.get();
    pace.grace.saturating_add(Duration::from_millis(extra_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_earns_a_second_per_min_rate_bytes_after_its_grace() {
        let pace = BodyPace {
            grace: Duration::from_secs(10),
            min_rate: std::num::NonZeroU64::new(8192).unwrap(),
        };
        assert_eq!(allowance(&pace, 0), Duration::from_secs(10));
        assert_eq!(allowance(&pace, 8192), Duration::from_secs(11));
        // 100 MiB at 8 KiB/s: 12,800 s on top of the grace.
        assert_eq!(
            allowance(&pace, 100 << 20),
            Duration::from_secs(10 + 12_800)
        );
        assert_eq!(
            allowance(&pace, usize::MAX),
            Duration::from_secs(10) + Duration::from_millis(u64::MAX / 8192)
        );
    }

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
