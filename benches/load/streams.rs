//! `--open-streams N`: tollgate's memory while it holds N slow streams open, and after.
//!
//! The replicas trickle tokens (`--token-delay-ms` apart, `--tokens` of them), so every stream
//! stays open for seconds. The client is as cheap as a client can be, so that it does not
//! crowd the machine: one task per stream, the request written once, the response read into a
//! small buffer and only its end kept, to check that the stream completed. tollgate's RSS is
//! read from `/proc` every 50 ms: idle (after a few requests, before the streams), at its peak
//! with every stream open, and at intervals for `--settle` seconds after the last one ended.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, Instant};

use super::gateway::Gateway;
use super::{Params, Variant, KEY, MODEL};

/// Streams connecting and sending at once: more would overflow the listener's accept queue
/// and leave SYNs to be retried a second later.
const CONNECTING: usize = 200;

/// The end of a complete chunked SSE response.
const DONE: &[u8] = b"data: [DONE]\n\n";

pub(super) async fn open_streams(
    params: &Params,
    n: u32,
    name: &str,
    binary: &std::path::Path,
    replicas: &[SocketAddr],
) -> Result<(), String> {
    let files = open_files_limit();
    // tollgate holds two sockets per stream; this process one per stream and, for the
    // replicas it runs, one more.
    let fits = files.map_or(u64::MAX, |f| f.saturating_sub(200) / 2);
    if u64::from(n) > fits {
        return Err(format!(
            "{n} streams need about {} open files in tollgate and in the harness, and the \
             limit is {}: raise it (`ulimit -n`, up to the hard limit) or ask for fewer",
            2 * u64::from(n) + 200,
            files.unwrap_or(0)
        ));
    }
    let gateway = Gateway::start(
        binary,
        replicas,
        Variant::Default,
        params.gateway_threads,
        false,
    )
    .await?;
    let pid = gateway.child.id().ok_or("tollgate exited")?;
    let request = Arc::new(request(gateway.public, params.tokens));
    // Idle: after a few streams, so that what is set up once (pools, metrics, the ledger
    // writer's first transaction) is not counted per stream.
    let mut warm = JoinSet::new();
    for _ in 0..8 {
        let request = request.clone();
        let public = gateway.public;
        warm.spawn(async move { one_stream(public, &request, None).await });
    }
    while let Some(done) = warm.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(pid)?;

    let opened = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicU64::new(idle));
    let stop = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while stop.load(Ordering::Relaxed) == 0 {
                if let Ok(now) = rss_kib(pid) {
                    peak.fetch_max(now, Ordering::Relaxed);
                }
                sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(CONNECTING));
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let (request, opened, gate) = (request.clone(), opened.clone(), gate.clone());
        let public = gateway.public;
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            one_stream(public, &request, Some((permit, &opened))).await
        });
    }
    // Every stream open at once: the RSS at that moment, as well as the peak over the run.
    let mut all_open = None;
    let mut failures = Vec::new();
    let mut completed = 0u32;
    while !tasks.is_empty() {
        if all_open.is_none() && opened.load(Ordering::Relaxed) == n as usize {
            all_open = Some((rss_kib(pid)?, started.elapsed()));
        }
        match timeout(Duration::from_millis(50), tasks.join_next()).await {
            Ok(Some(Ok(Ok(())))) => completed += 1,
            Ok(Some(Ok(Err(e)))) => failures.push(e),
            Ok(Some(Err(e))) => failures.push(e.to_string()),
            Ok(None) | Err(_) => {}
        }
    }
    let ended = Instant::now();
    stop.store(1, Ordering::Relaxed);
    let _ = sampler.await;
    let peak = peak.load(Ordering::Relaxed);

    let mb = |kib: u64| kib as f64 / 1024.0;
    let per_stream = |kib: u64| (kib.saturating_sub(idle)) as f64 * 1024.0 / f64::from(n) / 1000.0;
    println!(
        "{name}: {n} open streams of {} tokens {} ms apart, {} gateway threads, \
         open-file limit {}",
        params.tokens,
        params.token_delay_ms,
        params.gateway_threads,
        files.map_or("unknown".into(), |f| f.to_string()),
    );
    println!("idle            {:>8.1} MB", mb(idle));
    if let Some((rss, at)) = all_open {
        println!(
            "all open        {:>8.1} MB  {:>6.1} KB per stream beyond idle ({:.1} s after the first)",
            mb(rss),
            per_stream(rss),
            at.as_secs_f64()
        );
    }
    println!(
        "peak            {:>8.1} MB  {:>6.1} KB per stream beyond idle",
        mb(peak),
        per_stream(peak)
    );
    println!(
        "completed {completed} of {n} in {:.1} s; {} failed{}",
        (ended - started).as_secs_f64(),
        failures.len(),
        failures
            .first()
            .map_or(String::new(), |f| format!(", the first: {f}"))
    );
    let settle = params.settle.as_secs_f64();
    let mut marks: Vec<f64> = [1.0, 5.0, 10.0, 30.0, 60.0]
        .into_iter()
        .filter(|&s| s < settle)
        .collect();
    marks.push(settle);
    for mark in marks {
        let at = ended + Duration::from_secs_f64(mark);
        tokio::time::sleep_until(at).await;
        let rss = rss_kib(pid)?;
        println!(
            "after {:>4.0} s    {:>8.1} MB  {:.2}x idle",
            mark,
            mb(rss),
            rss as f64 / idle as f64
        );
    }
    gateway.stop().await;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} streams failed", failures.len()))
    }
}

/// The request of every stream, with `Connection: close` so that tollgate ends the response
/// by closing once it is complete.
fn request(public: SocketAddr, tokens: u32) -> Vec<u8> {
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Hello"}}],"max_tokens":{tokens},"stream":true}}"#
    );
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {public}\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One stream, read to its end. `opening`: a place among the streams connecting at once,
/// given back with the first bytes of the answer, and the count of streams open.
async fn one_stream(
    public: SocketAddr,
    request: &[u8],
    opening: Option<(tokio::sync::OwnedSemaphorePermit, &AtomicUsize)>,
) -> Result<(), String> {
    let mut stream = TcpStream::connect(public)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut opening = opening;
    let mut buf = [0u8; 2048];
    // The end of what arrived so far, long enough to hold `DONE` across two reads.
    let mut tail: Vec<u8> = Vec::with_capacity(64);
    let mut first = true;
    let mut done = false;
    loop {
        let read = timeout(Duration::from_secs(120), stream.read(&mut buf))
            .await
            .map_err(|_| "no data for 120 s".to_string())?
            .map_err(|e| format!("read: {e}"))?;
        if read == 0 {
            break;
        }
        if first {
            first = false;
            if !buf[..read].starts_with(b"HTTP/1.1 200") {
                let text = String::from_utf8_lossy(&buf[..read.min(300)]).into_owned();
                return Err(format!("answered {text}"));
            }
            if let Some((permit, opened)) = opening.take() {
                drop(permit);
                opened.fetch_add(1, Ordering::Relaxed);
            }
        }
        tail.extend_from_slice(&buf[..read]);
        done |= memchr::memmem::find(&tail, DONE).is_some();
        let keep = tail.len().saturating_sub(DONE.len());
        tail.drain(..keep);
    }
    match done {
        true => Ok(()),
        false => Err("the stream ended without data: [DONE]".into()),
    }
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading tollgate's memory: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS in /proc/PID/status".into())
}

/// This process's soft limit on open files (tollgate inherits it).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
