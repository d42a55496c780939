//! Active health checks: one task per pool, `GET <path>` on every replica each interval,
//! all of a round at once. Any answer below 500 passes; a 5xx, a timeout or a failed
//! connection fails. The checks run on a runtime of their own (one thread), so a saturated
//! proxy cannot starve them, nor they it.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{clock, PoolRoute, Replica};
use crate::config::HealthCheck;

/// The checks' own runtime, started on first use; `None` if it could not be.
fn runtime() -> Option<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-health")
            .enable_all()
            .build()
            .map_err(|e| tracing::error!(error = %e, "health checks cannot start; replicas count as healthy"))
            .ok()
    })
    .as_ref()
}

/// Starts checking `pool` until `stop` changes or its sender is dropped. Without a runtime
/// for them, the pool counts as checked and its replicas stay as they are.
pub(super) fn spawn(
    pool: Arc<PoolRoute>,
    check: HealthCheck,
    key: Option<String>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(rt) = runtime() else {
        pool.mark_checked();
        return;
    };
    rt.spawn(async move {
        let request: Arc<[u8]> = Arc::from(head(&check.path, key.as_deref()));
        let seconds = pool.meters.check_seconds.with_label_values(&[&pool.name]);
        loop {
            let mut round = tokio::task::JoinSet::new();
            for r in pool.replicas.iter().cloned() {
                let request = request.clone();
                let timeout = check.timeout;
                round.spawn(async move {
                    let started = Instant::now();
                    let verdict = probe(&r, &request, timeout).await;
                    (r, verdict, started.elapsed())
                });
            }
            while let Some(Ok((r, verdict, took))) = round.join_next().await {
                seconds.observe(took.as_secs_f64());
                let now = clock::now_ms();
                match verdict {
                    Ok(()) => {
                        if r.check_passed(now, check.healthy_after.get(), pool.fleet.slow_start.is_some()) {
                            tracing::info!(pool = %pool.name, replica = %r.authority, "replica healthy; back in rotation");
                            pool.queue.wake_head();
                        }
                    }
                    Err(why) => {
                        pool.meters
                            .check_failures
                            .with_label_values(&[&pool.name, &r.authority])
                            .inc();
                        if r.check_failed(check.unhealthy_after.get()) {
                            tracing::warn!(pool = %pool.name, replica = %r.authority, reason = why, "replica unhealthy; out of rotation");
                        }
                    }
                }
            }
            pool.mark_checked();
            tokio::select! {
                _ = tokio::time::sleep(check.interval) => {}
                _ = stop.changed() => return,
            }
        }
    });
}

/// The check's request, the same every time.
fn head(path: &str, key: Option<&str>) -> Vec<u8> {
    let mut h = format!("GET {path} HTTP/1.1\r\nhost: tollgate\r\nconnection: close\r\n");
    if let Some(k) = key {
        h.push_str("authorization: Bearer ");
        h.push_str(k);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// One check of one replica: connect, send, read the status line.
async fn probe(r: &Replica, request: &[u8], timeout: Duration) -> Result<(), &'static str> {
    let exchange = async {
        let mut s = TcpStream::connect(r.addr)
            .await
            .map_err(|_| "connect failed")?;
        s.write_all(request).await.map_err(|_| "send failed")?;
        let mut buf = [0u8; 64];
        let mut got = 0;
        // "HTTP/1.1 200" is 12 bytes.
        while got < 12 {
            match s.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => return Err("closed without an answer"),
                Ok(n) => got += n,
            }
        }
        status(&buf[..got]).ok_or("not an HTTP answer")
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err("timed out"),
        Ok(Err(e)) => Err(e),
        Ok(Ok(code)) if code < 500 => Ok(()),
        Ok(Ok(_)) => Err("answered 5xx"),
    }
}

fn status(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    std::str::from_utf8(rest).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_status_is_read_from_the_status_line() {
        assert_eq!(super::status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(super::status(b"HTTP/1.0 503 x"), Some(503));
        assert_eq!(super::status(b"SSH-2.0-Open"), None);
    }
}
