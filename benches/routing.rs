//! Routing-efficiency bench: how a pool's policy uses a fleet of simulated GPUs, judged by
//! the share of prompt tokens served from the replicas' KV prefix caches, the balance of
//! their load, time to first token and queue time. Every policy runs in one go against the
//! same workload, each on fresh replicas with cold caches.
//!
//! `cargo bench --bench routing`; every flag is described in `benches/README.md` and by
//! `--help`.

#[path = "routing/fleet.rs"]
mod fleet;
#[path = "routing/workload.rs"]
mod workload;

use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use fleet::{Counters, Gateway};
use workload::{Session, Shape, Workload};

const KEY: &str = "tg-routing-bench-key";
const MODEL: &str = "bench";

/// Compares routing policies on a multi-turn chat workload over simulated GPUs.
#[derive(Parser, Clone)]
#[command(
    name = "routing",
    override_usage = "cargo bench --bench routing -- [OPTIONS]"
)]
struct Params {
    /// Policies to measure, one after the other.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "round_robin,least_inflight,affinity"
    )]
    policies: Vec<String>,
    /// Simulated replicas.
    #[arg(long, default_value_t = 8)]
    replicas: usize,
    /// Concurrent chat sessions.
    #[arg(long, default_value_t = 64)]
    sessions: usize,
    /// Distinct system prompts, shared by the sessions.
    #[arg(long, default_value_t = 4)]
    system_prompts: usize,
    /// Tokens of each system prompt.
    #[arg(long, default_value_t = 256)]
    system_tokens: usize,
    /// Tokens of each user message.
    #[arg(long, default_value_t = 128)]
    user_tokens: usize,
    /// Turns of a session before it starts over as a new one.
    #[arg(long, default_value_t = 16)]
    turns: usize,
    /// `max_tokens` of every request: the answer's length.
    #[arg(long, default_value_t = 32)]
    output_tokens: u32,
    /// Arrival rate as a share of the fleet's capacity without cache hits.
    #[arg(long, default_value_t = 0.8)]
    load: f64,
    /// Seconds of arrivals measured, after the warm-up.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Seconds of arrivals before measuring: the caches fill and sessions grow.
    #[arg(long, default_value_t = 20.0)]
    warmup: f64,
    /// Batch slots per replica.
    #[arg(long, default_value_t = 8)]
    batch_slots: usize,
    /// KV prefix cache per replica, in tokens.
    #[arg(long, default_value_t = 24_576)]
    kv_cache_tokens: u64,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    kv_block_tokens: u32,
    /// Prefill time per uncached prompt token, in microseconds.
    #[arg(long, default_value_t = 200)]
    prefill_us_per_token: u64,
    /// Time to first token before the prefill, in milliseconds.
    #[arg(long, default_value_t = 20)]
    ttft_ms: u64,
    /// Time between tokens, in milliseconds.
    #[arg(long, default_value_t = 15)]
    token_delay_ms: u64,
    /// tollgate's `max_inflight_per_replica` (0: none, the replicas queue instead).
    #[arg(long, default_value_t = 0)]
    target: usize,
    /// The pool's `load_factor`.
    #[arg(long, default_value_t = 1.25)]
    load_factor: f64,
    /// Send no `x-session-affinity` header: `affinity` then places by the prompt's prefix.
    #[arg(long)]
    no_session_header: bool,
    /// `server.threads` of tollgate.
    #[arg(long, default_value_t = 2)]
    gateway_threads: u16,
    /// Seed of the workload (prompts, arrivals, session picks).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Added by `cargo bench` to every target; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// A name filter `cargo bench` may pass on; ignored.
    #[arg(hide = true)]
    filter: Option<String>,
}

impl Params {
    fn shape(&self) -> Shape {
        Shape {
            system_prompts: self.system_prompts.max(1),
            system_tokens: self.system_tokens,
            user_tokens: self.user_tokens,
            turns: self.turns.max(1),
            output_tokens: self.output_tokens,
        }
    }

    /// Seconds a request holds a batch slot when nothing of its prompt is cached.
    fn service_seconds(&self) -> f64 {
        let prefill =
            workload::mean_prompt_tokens(&self.shape()) * self.prefill_us_per_token as f64;
        let decode = self.output_tokens.saturating_sub(1) as f64 * self.token_delay_ms as f64;
        self.ttft_ms as f64 / 1e3 + prefill / 1e6 + decode / 1e3
    }

    /// Requests a second the fleet serves with no cache hits.
    fn capacity(&self) -> f64 {
        (self.replicas * self.batch_slots) as f64 / self.service_seconds()
    }
}

/// One request as the client saw it.
struct Turn {
    ttft: Duration,
    prompt: u64,
    cached: u64,
    output: u64,
}

/// What one policy did.
struct Row {
    policy: String,
    cached_share: f64,
    /// The same share from the replicas' counters over the window, as a cross-check.
    replica_cached_share: f64,
    load_max_over_mean: f64,
    loads: Vec<f64>,
    ttft_p50: Duration,
    ttft_p99: Duration,
    requests_per_s: f64,
    tokens_per_s: f64,
    replica_wait_ms: f64,
    gateway_wait_ms: f64,
    errors: usize,
    requests: usize,
}

fn main() -> ExitCode {
    let params = Params::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("routing: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(params));
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("routing: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(params: Params) -> Result<(), String> {
    let shape = params.shape();
    let rate = params.load * params.capacity();
    println!(
        "routing bench: {} replicas × {} slots, {}-token prefix caches, prefill {} µs/token, \
         ttft {} ms + {} ms/token; {} sessions over {} system prompts of {} tokens, {} user \
         tokens a turn, {} turns, {} output tokens; mean prompt {:.0} tokens; capacity without \
         cache hits {:.1} req/s, arrivals {:.1} req/s ({:.0}%); {} s warm-up, {} s measured; \
         session header {}; tollgate target {}",
        params.replicas,
        params.batch_slots,
        params.kv_cache_tokens,
        params.prefill_us_per_token,
        params.ttft_ms,
        params.token_delay_ms,
        params.sessions,
        shape.system_prompts,
        shape.system_tokens,
        shape.user_tokens,
        shape.turns,
        shape.output_tokens,
        workload::mean_prompt_tokens(&shape),
        params.capacity(),
        rate,
        params.load * 100.0,
        params.warmup,
        params.duration,
        if params.no_session_header {
            "off"
        } else {
            "on"
        },
        match params.target {
            0 => "none".to_owned(),
            n => n.to_string(),
        },
    );
    let mut rows = Vec::new();
    for policy in &params.policies {
        let row = measure(&params, policy, rate).await?;
        print_row(&row);
        rows.push(row);
    }
    println!();
    print_table(&rows);
    Ok(())
}

async fn measure(params: &Params, policy: &str, rate: f64) -> Result<Row, String> {
    let shape = params.shape();
    let replicas = fleet::replicas(params).await?;
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr()).collect();
    let stats: Vec<_> = replicas.iter().map(|r| r.stats()).collect();
    let gateway = Gateway::start(params, &addrs, policy).await?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()
        .map_err(|e| e.to_string())?;
    gateway.ready(&client).await?;

    let total = params.warmup + params.duration;
    let work = Workload::new(&shape, params.sessions, rate, total, params.seed);
    let systems = Arc::new(work.systems);
    let sessions = Arc::new(Mutex::new(work.sessions));
    let idle = Arc::new(Notify::new());
    let url = format!("http://{}/v1/chat/completions", gateway.public);
    let start = Instant::now();
    let window_start = start + Duration::from_secs_f64(params.warmup);
    let window_end = start + Duration::from_secs_f64(total);

    // The replicas' and tollgate's counters at the window's start and end.
    let snapshots = {
        let (stats, client, admin) = (stats.clone(), client.clone(), gateway.admin);
        tokio::spawn(async move {
            let gw = GatewayMetrics { admin };
            tokio::time::sleep_until(window_start).await;
            let first = (Counters::read(&stats), gw.queue_wait(&client).await);
            tokio::time::sleep_until(window_end).await;
            let last = (Counters::read(&stats), gw.queue_wait(&client).await);
            (first, last)
        })
    };

    let mut tasks = JoinSet::new();
    for (at, pick) in work.arrivals.iter().zip(&work.picks) {
        tokio::time::sleep_until(start + Duration::from_secs_f64(*at)).await;
        let (index, id, body) = loop {
            let notified = idle.notified();
            {
                let mut all = sessions.lock().unwrap_or_else(PoisonError::into_inner);
                let free: Vec<usize> = (0..all.len()).filter(|&i| !all[i].busy).collect();
                if !free.is_empty() {
                    let index = free[((pick * free.len() as f64) as usize).min(free.len() - 1)];
                    let session = &mut all[index];
                    session.busy = true;
                    break (
                        index,
                        session.id.clone(),
                        session.next_request(&systems, &shape),
                    );
                }
            }
            notified.await;
        };
        let measured = *at >= params.warmup;
        let (client, url, sessions, idle) =
            (client.clone(), url.clone(), sessions.clone(), idle.clone());
        let header = !params.no_session_header;
        let seed = params.seed;
        tasks.spawn(async move {
            let result = turn(&client, &url, header.then_some(id.as_str()), &body).await;
            {
                let mut all = sessions.lock().unwrap_or_else(PoisonError::into_inner);
                let session: &mut Session = &mut all[index];
                match &result {
                    Ok((_, answer)) => session.answered(answer.clone(), &shape, seed),
                    Err(_) => session.failed(),
                }
                session.busy = false;
            }
            idle.notify_one();
            (measured, result.map(|(turn, _)| turn))
        });
    }
    let ((first, queue_first), (last, queue_last)) = snapshots.await.map_err(|e| e.to_string())?;
    let mut turns = Vec::new();
    let mut errors = 0;
    let drain = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((true, Ok(turn))) => turns.push(turn),
                Ok((true, Err(e))) => {
                    if errors == 0 {
                        eprintln!("{policy}: {e}");
                    }
                    errors += 1;
                }
                _ => {}
            }
        }
    })
    .await;
    if drain.is_err() {
        errors += tasks.len();
        tasks.abort_all();
    }
    drop(gateway);
    drop(replicas);

    let loads: Vec<f64> = last
        .load
        .iter()
        .zip(&first.load)
        .map(|(b, a)| (b - a) / params.duration)
        .collect();
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    let max = loads.iter().cloned().fold(0.0, f64::max);
    let prompt: u64 = turns.iter().map(|t| t.prompt).sum();
    let cached: u64 = turns.iter().map(|t| t.cached).sum();
    let mut ttfts: Vec<Duration> = turns.iter().map(|t| t.ttft).collect();
    ttfts.sort();
    let pct = |p: f64| {
        ttfts
            .get(((ttfts.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    let served = turns.len().max(1) as f64;
    let queried = last.prompt_queried - first.prompt_queried;
    Ok(Row {
        policy: policy.to_owned(),
        cached_share: cached as f64 / prompt.max(1) as f64,
        replica_cached_share: (last.cached - first.cached) as f64 / queried.max(1) as f64,
        load_max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
        loads,
        ttft_p50: pct(0.50),
        ttft_p99: pct(0.99),
        requests_per_s: turns.len() as f64 / params.duration,
        tokens_per_s: turns.iter().map(|t| t.output).sum::<u64>() as f64 / params.duration,
        replica_wait_ms: (last.queue_seconds - first.queue_seconds) * 1e3 / served,
        gateway_wait_ms: {
            let n = queue_last.1 - queue_first.1;
            if n > 0.0 {
                (queue_last.0 - queue_first.0) * 1e3 / n
            } else {
                0.0
            }
        },
        errors,
        requests: turns.len(),
    })
}

/// Reads tollgate's metrics without holding the gateway.
struct GatewayMetrics {
    admin: std::net::SocketAddr,
}

impl GatewayMetrics {
    async fn queue_wait(&self, client: &reqwest::Client) -> (f64, f64) {
        fleet::queue_wait(client, self.admin).await
    }
}

/// Sends one turn as a stream and reads it to the end: time to the first token, the usage of
/// the final chunk, and the answer's text.
async fn turn(
    client: &reqwest::Client,
    url: &str,
    session: Option<&str>,
    body: &Value,
) -> Result<(Turn, String), String> {
    let started = Instant::now();
    let mut request = client.post(url).bearer_auth(KEY).json(body);
    if let Some(id) = session {
        request = request.header("x-session-affinity", id);
    }
    let resp = request.send().await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        let status = resp.status();
        return Err(format!(
            "{status}: {}",
            resp.text().await.unwrap_or_default()
        ));
    }
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let mut ttft = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        text.push_str(&String::from_utf8_lossy(&chunk));
        if ttft.is_none() && has_token(&text) {
            ttft = Some(started.elapsed());
        }
    }
    let (mut answer, mut usage) = (String::new(), None);
    for data in text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(piece) = event
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            answer.push_str(piece);
        }
        if event.get("usage").is_some_and(|u| !u.is_null()) {
            usage = Some(event["usage"].clone());
        }
    }
    let usage = usage.ok_or("the stream carried no usage")?;
    let count = |p: &str| usage.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    Ok((
        Turn {
            ttft: ttft.ok_or("the stream carried no token")?,
            prompt: count("/prompt_tokens"),
            cached: count("/prompt_tokens_details/cached_tokens"),
            output: count("/completion_tokens"),
        },
        answer,
    ))
}

/// Whether an event stream so far holds a token: a `content` delta that is not empty.
fn has_token(text: &str) -> bool {
    const FIELD: &str = "\"content\":\"";
    text.match_indices(FIELD).any(|(at, _)| {
        text[at + FIELD.len()..]
            .chars()
            .next()
            .is_some_and(|c| c != '"')
    })
}

fn print_row(row: &Row) {
    let loads: Vec<String> = row.loads.iter().map(|l| format!("{l:.2}")).collect();
    println!(
        "{}: {} requests, {} errors; replica load {}; cached share by the replicas' counters {:.1}%",
        row.policy,
        row.requests,
        row.errors,
        loads.join(" / "),
        row.replica_cached_share * 100.0
    );
}

fn print_table(rows: &[Row]) {
    println!(
        "| policy | cached share | load max/mean | TTFT p50 | TTFT p99 | req/s | output tok/s | replica wait | tollgate queue | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.1}% | {:.2} | {:.0} ms | {:.0} ms | {:.2} | {:.0} | {:.1} ms | {:.1} ms | {} |",
            r.policy,
            r.cached_share * 100.0,
            r.load_max_over_mean,
            r.ttft_p50.as_secs_f64() * 1e3,
            r.ttft_p99.as_secs_f64() * 1e3,
            r.requests_per_s,
            r.tokens_per_s,
            r.replica_wait_ms,
            r.gateway_wait_ms,
            r.errors,
        );
    }
    let find = |name: &str| rows.iter().find(|r| r.policy == name);
    if let (Some(a), Some(l)) = (find("affinity"), find("least_inflight")) {
        println!(
            "\naffinity / least_inflight: cached share {:.2}×, TTFT p50 {:.2}×; affinity load max/mean {:.2}",
            a.cached_share / l.cached_share.max(f64::MIN_POSITIVE),
            a.ttft_p50.as_secs_f64() / l.ttft_p50.as_secs_f64().max(f64::MIN_POSITIVE),
            a.load_max_over_mean,
        );
    }
}
