//! Async predict's queue: submit throughput (durable inserts acknowledged by the store's
//! writer, as a submit waits for before its 202) and the queue's own cost per dispatched
//! request (take from the board, mark started and read the input, write the end), with
//! 10,000 requests queued. The replica's exchange is not included: it is the same client as
//! sync predict's (see `cargo bench --bench exchange`).
//!
//!     cargo bench --bench async_queue

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::async_queue::{AsyncQueue, Job, Line, Retry, Status, WebhookStatus};

const QUEUED: usize = 10_000;

fn job(i: usize) -> Job {
    Job {
        id: format!("{i:032x}"),
        seq: i as u64,
        model: "abcd1234".into(),
        deployment: "dep-a".into(),
        key_id: "team-a".into(),
        priority: (i % 3) as u8,
        created_ms: 1_795_000_000_000,
        status: Status::Queued,
        status_ms: 1_795_000_000_000,
        expires_ms: 1_795_000_600_000,
        webhook: Some("https://hooks.example.com/x".into()),
        webhook_status: WebhookStatus::Pending,
        retry: Retry::default(),
        errors: Vec::new(),
        started_ms: None,
        attempts: 0,
        has_output: false,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// `QUEUED` submits, `concurrency` at a time; returns the wall time and each ack's latency.
async fn submits(queue: Arc<AsyncQueue>, concurrency: usize) -> (Duration, Vec<Duration>) {
    let input = format!("{{\"prompt\": \"{}\"}}", "x".repeat(1000));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (queue, input) = (queue.clone(), input.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in (t..QUEUED).step_by(concurrency) {
                let at = Instant::now();
                let line = Line {
                    model: "abcd1234".into(),
                    deployment: "dep-a".into(),
                };
                let seq = queue.board.admit(&line, u64::MAX).expect("no cap");
                let mut j = job(i);
                j.seq = seq;
                queue.store.insert(&j, input.clone()).await.expect("insert");
                queue.board.settle(&line, Some(j));
                lat.push(at.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort();
    (start.elapsed(), all)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for concurrency in [1, 64] {
            let dir = tempfile::tempdir().expect("tempdir");
            let queue = Arc::new(AsyncQueue::open(dir.path(), 0).expect("open"));
            let (wall, lat) = submits(queue.clone(), concurrency).await;
            println!(
                "submit, {concurrency:>2} at a time: {:>7.0} submits/s, ack p50 {:>6.2} ms, p99 {:>6.2} ms ({QUEUED} requests, 1 KiB input, synchronous=FULL)",
                QUEUED as f64 / wall.as_secs_f64(),
                percentile(&lat, 0.5).as_secs_f64() * 1e3,
                percentile(&lat, 0.99).as_secs_f64() * 1e3,
            );
            if concurrency == 64 {
                // Dispatch: the queue's work per request, the first 1,000 of 10,000 queued.
                let line = Line {
                    model: "abcd1234".into(),
                    deployment: "dep-a".into(),
                };
                let n = 1000;
                let mut take = Duration::ZERO;
                let start = Instant::now();
                for _ in 0..n {
                    let t = Instant::now();
                    let mut j = queue.board.take(&line, 1).expect("queued");
                    take += t.elapsed();
                    let input = queue.store.start(&j).await.expect("start");
                    assert!(input.is_some());
                    j.status = Status::Succeeded;
                    queue.store.save(&j, Some(b"{\"ok\": true}".to_vec())).await.expect("save");
                    queue.board.update(&j);
                }
                let per = start.elapsed() / n;
                println!(
                    "dispatch, {QUEUED} queued: {:>6.1} us per request (take {:.2} us; start + end: two committed writes, one request at a time)",
                    per.as_secs_f64() * 1e6,
                    take.as_secs_f64() * 1e6 / n as f64
                );
            }
        }
    });
}
