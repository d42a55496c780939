//! Idle upstream connections of one replica, kept for the next request to it (the forward
//! stage opens and returns them; the replica owns them, so they live and die with it).
//!
//! A plain stack under the replica's own mutex: taking and returning a connection is a push or
//! a pop, with no task per idle connection, no timer and no lock shared between replicas. The
//! most recently used connection is reused first. Liveness is checked when a connection is
//! taken (a replica that closed it has made it readable), and connections idle longer than the
//! pool's `pool_idle_ms` are closed instead of reused; the oldest one is also retired whenever
//! a connection comes back, so a replica under steady load does not keep expired ones around.

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pingora::protocols::Stream;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Instant;

#[derive(Default)]
pub struct IdleConns {
    parked: Mutex<Vec<Parked>>,
}

struct Parked {
    stream: Stream,
    since: Instant,
}

impl IdleConns {
    /// A live connection idle for at most `max_idle`, if there is one.
    pub fn take(&self, max_idle: Duration) -> Option<Stream> {
        loop {
            let mut parked = self.lock().pop()?;
            // A dropped connection is closed here, outside the lock.
            if parked.since.elapsed() <= max_idle && still_open(&mut parked.stream) {
                return Some(parked.stream);
            }
        }
    }

    /// Keeps `stream` for reuse unless `limit` connections are already idle.
    pub fn put(&self, stream: Stream, limit: usize, max_idle: Duration) {
        let now = Instant::now();
        let (expired, refused) = {
            let mut parked = self.lock();
            let expired = match parked.first() {
                Some(oldest) if now.duration_since(oldest.since) > max_idle => {
                    Some(parked.remove(0))
                }
                _ => None,
            };
            if parked.len() < limit {
                parked.push(Parked { stream, since: now });
                (expired, None)
            } else {
                (expired, Some(stream))
            }
        };
        drop((expired, refused));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Parked>> {
        // The critical sections cannot panic half-way; a poisoned stack is still consistent.
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An idle HTTP/1 connection has nothing to read: if it is readable, the replica closed it
/// (or sent bytes no request asked for) and it must not carry a request.
fn still_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    const LONG: Duration = Duration::from_secs(60);

    /// A connected pair: our side as a Pingora stream, and the replica's side.
    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (theirs, _) = listener.accept().await.unwrap();
        (ours, theirs)
    }

    fn boxed(s: TcpStream) -> Stream {
        Box::new(pingora::protocols::l4::stream::Stream::from(s))
    }

    #[tokio::test]
    async fn the_last_returned_connection_is_reused_first_up_to_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idle = IdleConns::default();
        let (a, _ra) = pair(&listener).await;
        let (b, _rb) = pair(&listener).await;
        let (c, _rc) = pair(&listener).await;
        let b_fd = std::os::fd::AsRawFd::as_raw_fd(&b);
        idle.put(boxed(a), 2, LONG);
        idle.put(boxed(b), 2, LONG);
        idle.put(boxed(c), 2, LONG);
        assert_eq!(idle.len(), 2, "the third is closed, not kept");
        let first = idle.take(LONG).unwrap();
        assert_eq!(pingora::protocols::UniqueID::id(&*first), b_fd);
        assert!(idle.take(LONG).is_some());
        assert!(idle.take(LONG).is_none());
    }

    #[tokio::test]
    async fn a_connection_the_replica_closed_or_wrote_on_is_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idle = IdleConns::default();
        for stray in [None, Some(b"HTTP/1.1 408 Request Timeout\r\n\r\n")] {
            let (ours, mut theirs) = pair(&listener).await;
            if let Some(bytes) = stray {
                theirs.write_all(bytes).await.unwrap();
            }
            drop(theirs);
            // Wait until the close is visible on our side, as it is long before reuse.
            ours.readable().await.unwrap();
            idle.put(boxed(ours), 8, LONG);
        }
        let (live, _theirs) = pair(&listener).await;
        idle.put(boxed(live), 8, LONG);
        assert!(idle.take(LONG).is_some(), "the live one");
        assert!(idle.take(LONG).is_none(), "the closed ones are dropped");
        assert!(idle.is_empty());
    }
}
