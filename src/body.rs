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

/// The body's declared length, refused (413) when it passes `limit`; once it fits, the
/// `100 Continue` a client that sent `Expect: 100-continue` waits for.
async fn admit_length(session: &mut Session, limit: u64) -> Result<Option<u64>, BodyError> {
    let headers = &session.req_header().headers;
    let declared = match headers.get(http::header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(content_length(v).ok_or(BodyError::BadLength)?),
    };
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge { limit });
    }
    let expects_continue = headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session
            .as_downstream_mut()
            .write_continue_response()
            .await
            .map_err(|_| BodyError::ClientGone)?;
    }
    Ok(declared)
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
    let declared = admit_length(session, limit).await?;
    // Most bodies arrive as one piece (with the head, or in the read after it): that piece is
    // the body, uncopied. Pieces after it are gathered in `buf`.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut received = 0;
    // From here the client is sending: after 100 Continue, if it asked for one.
    let start = Instant::now();
    // Stops as soon as the body is complete (its last Content-Length byte, or the last chunk
    // of a chunked body), not at a further read that would only say so.
    while !session.as_downstream_mut().is_body_done() {
        let due = start + allowance(pace, received);
        let chunk = timeout_at(due, session.as_downstream_mut().read_request_body())
            .await
            .map_err(|_| BodyError::TooSlow(*pace))?
            .map_err(|e| BodyError::of(&e))?;
        let Some(chunk) = chunk else { break };
        received += chunk.len();
        if received as u64 > limit {
            return Err(BodyError::TooLarge { limit });
        }
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            earlier => {
                if let Some(earlier) = earlier {
                    // Pre-sized for Content-Length bodies; chunked bodies grow as they come.
                    let size = declared.unwrap_or(0).min(limit) as usize;
                    buf.reserve(size.max(earlier.len() + chunk.len()));
                    buf.extend_from_slice(&earlier);
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// A body read piece by piece as it arrives, for passing on as it comes (deployed models'
/// uploads): the same cap and pace as [`read_capped`], with memory bounded by one piece.
pub struct Upload {
    limit: u64,
    pace: BodyPace,
    /// The Content-Length the client declared; `None`: chunked, or no body.
    pub declared: Option<u64>,
    /// Bytes received so far.
    pub received: u64,
    start: Option<Instant>,
    done: bool,
}

impl Upload {
    /// Checks the declared length against the cap (413 before any replica is touched) and
    /// answers `Expect: 100-continue` only once it fits.
    pub async fn start(
        session: &mut Session,
        limit: u64,
        pace: &BodyPace,
    ) -> Result<Upload, BodyError> {
        let chunked = session
            .req_header()
            .headers
            .contains_key(http::header::TRANSFER_ENCODING);
        let declared = admit_length(session, limit).await?;
        Ok(Upload {
            limit,
            pace: *pace,
            declared: if chunked { None } else { declared },
            received: 0,
            start: None,
            done: !chunked && declared.unwrap_or(0) == 0,
        })
    }

    /// Whether the body is empty (no Content-Length nor chunked coding, or a length of 0).
    pub fn is_empty(&self) -> bool {
        self.done && self.received == 0
    }

    /// The next piece of the body, `None` at its end; refused as soon as the running count
    /// passes the cap, or the body falls behind its pace.
    pub async fn next(&mut self, session: &mut Session) -> Result<Option<Bytes>, BodyError> {
        if self.done {
            return Ok(None);
        }
        let start = *self.start.get_or_insert_with(Instant::now);
        let due = start + allowance(&self.pace, self.received as usize);
        let chunk = timeout_at(due, session.as_downstream_mut().read_request_body())
            .await
            .map_err(|_| BodyError::TooSlow(self.pace))?
            .map_err(|e| BodyError::of(&e))?;
        let Some(chunk) = chunk else {
            self.done = true;
            return Ok(None);
        };
        self.received += chunk.len() as u64;
        if self.received > self.limit {
            return Err(BodyError::TooLarge { limit: self.limit });
        }
        Ok(Some(chunk))
    }
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
