//! Load harness: what tollgate costs compared with calling the replicas directly, measured in
//! one run against the same in-process simulated replicas, and printed as ratios.
//!
//! `cargo bench --bench load -- --connections 32 --duration 10`; every flag is described in
//! `benches/README.md` and by `--help`.

#[path = "load/client.rs"]
mod client;
#[path = "load/cpu.rs"]
mod cpu;
use cpu::Watched;
#[path = "load/floor.rs"]
mod floor;
#[path = "load/gateway.rs"]
mod gateway;
#[path = "load/report.rs"]
mod report;
#[path = "load/streams.rs"]
mod streams;
#[path = "../tests/support/tiny_tokenizer.rs"]
mod tiny_tokenizer;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use http::header::HeaderValue;
use tokio::time::Instant;

use tollgate::sim::{SimOptions, SimReplica};

use client::{connect, exchange, measure, Failure, Job, Payload};
use gateway::Gateway;
use report::render;

/// The secret the harness presents to tollgate; its digest goes into the generated config.
const KEY: &str = "tg-load-harness-key";
const MODEL: &str = "bench";
/// The deployed model of the `predict` variant, addressed by path prefix.
const PREDICT_PATH: &str = "/model/bench1/production/predict";
/// How long a request may run past the end of the measurement before the harness gives up on
/// it, so that a stalled proxy cannot keep the run from finishing.
const STRAGGLER_GRACE: Duration = Duration::from_secs(10);

/// Measures tollgate against calling the simulated replicas directly, in one run.
#[derive(Parser)]
#[command(
    name = "load",
    override_usage = "cargo bench --bench load -- [OPTIONS]"
)]
struct Params {
    /// Concurrent keep-alive connections, each sending requests back to back.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    connections: u16,
    /// Measured seconds per phase.
    #[arg(long, default_value = "10", value_parser = seconds)]
    duration: Duration,
    /// Seconds of load before measuring, not recorded.
    #[arg(long, default_value = "2", value_parser = seconds)]
    warmup: Duration,
    /// Simulated replicas, started in this process.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    replicas: u16,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    tokens: u32,
    /// Streaming requests; the latency is then the whole stream.
    #[arg(long)]
    stream: bool,
    /// Words of prompt in every request (English with some code); 0 sends "Hello".
    #[arg(long, default_value_t = 0)]
    prompt_words: u32,
    /// Which phases to run.
    #[arg(long, value_enum, default_value_t = Phase::Both)]
    phase: Phase,
    /// Tollgate setups to measure after the direct phase, in one run: `default`,
    /// `no-ledger` (accounting not written), `limits` (every limit and a budget configured,
    /// none reached), `anthropic` (the same load as Anthropic Messages requests), `tokenizer`
    /// (the model names a `tokenizer.json`: prompts counted exactly), `nginx`
    /// (nginx from `PATH` as a plain reverse proxy, for calibration), `pingora` (Pingora's own
    /// proxy path with nothing of tollgate's: the floor of a gateway built on Pingora),
    /// `predict` (a deployed model's `/production/predict`, measured against calling the
    /// replica's predict route directly in a `direct-predict` phase).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "default")]
    variants: Vec<Variant>,
    /// Another tollgate binary (an earlier build) to measure before each variant, in the same
    /// run, so that a change is judged against its baseline under the same conditions.
    #[arg(long, value_name = "BIN")]
    baseline: Option<std::path::PathBuf>,
    /// `server.threads` of the measured tollgate.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    gateway_threads: u16,
    /// Worker threads of the harness runtime (load generator and replicas).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// Instead of load: user-space instructions per request, counted by valgrind's callgrind
    /// in tollgate (one worker thread) serving sequential requests: a run of 2×N minus a run
    /// of N, so start-up and shutdown cancel out. Deterministic where CPU time is not.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    instructions: Option<u32>,
    /// With `--instructions`: keep the callgrind profile of each 2×N run in this directory,
    /// as `<phase name>.callgrind.out`, for `callgrind_annotate`.
    #[arg(long, value_name = "DIR", requires = "instructions")]
    profiles: Option<std::path::PathBuf>,
    /// Instead of load: hold N slow streams open through tollgate at once and report its
    /// memory: idle, at the peak, and for `--settle` seconds after the streams ended.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "instructions")]
    open_streams: Option<u32>,
    /// Milliseconds between two tokens of the simulated replicas (0: as fast as they can).
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// With `--open-streams`: seconds to keep reading tollgate's memory after the streams end.
    #[arg(long, default_value = "60", value_parser = seconds)]
    settle: Duration,
    /// Added by `cargo bench` to every target; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// A name filter `cargo bench` may pass on; ignored.
    #[arg(hide = true)]
    filter: Option<String>,
    /// Not a measurement: serve as the `pingora` variant's proxy (see `floor`).
    #[arg(long, hide = true, num_args = 3.., value_name = "LISTEN THREADS REPLICA")]
    serve_floor: Option<Vec<String>>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Variant {
    Default,
    NoLedger,
    Limits,
    Anthropic,
    /// The model names a tokenizer (a byte-level BPE trained at start), so every prompt is
    /// tokenized when admitted.
    Tokenizer,
    /// Not tollgate: nginx (from `PATH`) as a plain reverse proxy in front of the same
    /// replicas, with upstream keep-alive and no access log, for calibration.
    Nginx,
    /// Not tollgate: Pingora's own proxy path with nothing of tollgate's
    /// (`floor`), the floor of any gateway built on Pingora.
    Pingora,
    /// A deployed model's `/production/predict`: the body passed through verbatim, the
    /// answer relayed as it comes (`--stream`: the replica's chunked generator).
    Predict,
    /// `limits` in cluster mode: every limit and the budget counted in a redis-server (from
    /// `PATH`) that the harness starts on loopback for the phase.
    Cluster,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Default => "tollgate",
            Variant::NoLedger => "tg-no-ledger",
            Variant::Limits => "tg-limits",
            Variant::Anthropic => "tg-anthropic",
            Variant::Tokenizer => "tg-tokenizer",
            Variant::Nginx => "nginx",
            Variant::Pingora => "pingora",
            Variant::Predict => "tg-predict",
            Variant::Cluster => "tg-cluster",
        }
    }

    /// Not tollgate: no baseline build of tollgate applies to it.
    fn foreign(self) -> bool {
        matches!(self, Variant::Nginx | Variant::Pingora)
    }
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Phase {
    Direct,
    Tollgate,
    Both,
}

fn seconds(v: &str) -> Result<Duration, String> {
    let secs: f64 = v
        .parse()
        .map_err(|_| format!("{v:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let params = Params::parse();
    if let Some(args) = &params.serve_floor {
        if let Err(message) = floor::serve(args) {
            eprintln!("load --serve-floor: {message}");
        }
        return ExitCode::FAILURE;
    }
    if params.duration.is_zero() {
        eprintln!("load: --duration must be more than 0");
        return ExitCode::FAILURE;
    }
    // The harness, the replicas and tollgate share the machine's cores; a small runtime keeps
    // the load generator from crowding out the process it measures.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(params.threads.into())
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    let result = rt.block_on(run(&params));
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("load: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(params: &Params) -> Result<(), String> {
    let mut replicas = Vec::new();
    for _ in 0..params.replicas {
        let opts = SimOptions {
            default_max_tokens: params.tokens,
            token_delay: Duration::from_millis(params.token_delay_ms),
            ..SimOptions::default()
        };
        replicas.push(SimReplica::start(opts).await.map_err(|e| e.to_string())?);
    }
    let addrs: Vec<SocketAddr> = replicas.iter().map(SimReplica::addr).collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    if let Some(n) = params.open_streams {
        // The baseline build first, if given, then this one, one after the other.
        let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_tollgate"));
        for (name, binary) in params
            .baseline
            .iter()
            .map(|b| ("base", b))
            .chain([("tollgate", &built)])
        {
            streams::open_streams(params, n, name, binary, &addrs).await?;
        }
        return Ok(());
    }
    if let Some(n) = params.instructions {
        println!(
            "tollgate instructions (valgrind callgrind): {} replicas, one worker thread, {n} and \
             {} sequential {} requests on one connection, max_tokens {}",
            params.replicas,
            2 * n,
            if params.stream { "streaming" } else { "JSON" },
            params.tokens,
        );
    } else {
        println!(
        "tollgate load harness: {} replicas, {} connections, {} s measured after {} s warm-up, {} \
         requests, max_tokens {}, {} harness threads, {cores} cores",
        params.replicas,
        params.connections,
        params.duration.as_secs_f64(),
        params.warmup.as_secs_f64(),
        if params.stream { "streaming" } else { "JSON" },
        params.tokens,
            params.threads,
        );
    }

    let mut reports = Vec::new();
    if params.phase != Phase::Tollgate && params.instructions.is_none() {
        reports.push(
            measure(
                "direct",
                params,
                Variant::Default,
                &replicas,
                &addrs,
                None,
                Watched::default(),
            )
            .await,
        );
        // The deployed-model surface is compared with the replica's own predict route.
        if params.variants.contains(&Variant::Predict) {
            reports.push(
                measure(
                    "direct-predict",
                    params,
                    Variant::Predict,
                    &replicas,
                    &addrs,
                    None,
                    Watched::default(),
                )
                .await,
            );
        }
    }
    let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_tollgate"));
    let mut runs = Vec::new();
    for &variant in params
        .variants
        .iter()
        .filter(|_| params.phase != Phase::Direct)
    {
        if let Some(base) = params.baseline.as_ref().filter(|_| !variant.foreign()) {
            runs.push((format!("base:{}", variant.name()), base.clone(), variant));
        }
        let binary = match variant {
            // This harness's own binary, run with `--serve-floor`.
            Variant::Pingora => std::env::current_exe().map_err(|e| e.to_string())?,
            _ => built.clone(),
        };
        runs.push((variant.name().to_string(), binary, variant));
    }
    for (name, binary, variant) in runs {
        let name: &'static str = Box::leak(name.into_boxed_str());
        if let Some(n) = params.instructions {
            if variant == Variant::Nginx {
                continue;
            }
            let keep = params
                .profiles
                .as_ref()
                .map(|dir| dir.join(format!("{}.callgrind.out", name.replace(':', "-"))));
            let per_request =
                instructions(params, n, &binary, variant, &addrs, keep.as_deref()).await?;
            println!("{name:<14} {per_request:>9} instructions per request");
            continue;
        }
        let gateway =
            Gateway::start(&binary, &addrs, variant, params.gateway_threads, false).await?;
        let auth = HeaderValue::try_from(format!("Bearer {KEY}")).map_err(|e| e.to_string())?;
        let report = measure(
            name,
            params,
            variant,
            &replicas,
            &[gateway.public],
            Some(auth),
            Watched {
                tollgate: gateway.child.id(),
                redis: gateway.redis.as_ref().and_then(|r| r.id()),
            },
        )
        .await;
        let log = gateway.stderr();
        gateway.stop().await;
        reports.push(report);
        if let Some(first) = log.lines().next() {
            let count = log.lines().count();
            println!("{name} logged {count} lines at warn level; the first:\n  {first}");
        }
    }
    if !reports.is_empty() {
        print!("{}", render(&reports));
    }
    Ok(())
}

/// `--instructions N`: tollgate's user-space instructions per request under callgrind, from
/// one run serving N sequential requests on one connection and one serving 2×N. The profile
/// of the 2×N run is copied to `keep`, if given.
async fn instructions(
    params: &Params,
    n: u32,
    binary: &std::path::Path,
    variant: Variant,
    replicas: &[SocketAddr],
    keep: Option<&std::path::Path>,
) -> Result<u64, String> {
    let auth = HeaderValue::try_from(format!("Bearer {KEY}")).map_err(|e| e.to_string())?;
    let payload = Payload::new(params, variant, true);
    let mut totals = [0u64; 2];
    for (total, count) in totals.iter_mut().zip([n, 2 * n]) {
        let gateway = Gateway::start(binary, replicas, variant, 1, true).await?;
        let now = Instant::now();
        let job = Job::new(&payload, gateway.public, Some(&auth), now, now);
        let mut sender = connect(gateway.public).await?;
        for _ in 0..count {
            sender.ready().await.map_err(|e| e.to_string())?;
            exchange(&mut sender, &job).await.map_err(|f| match f {
                Failure::Status(status, text) => format!("status {status}: {text}"),
                Failure::Body(what) | Failure::Transport(what) => what,
            })?;
        }
        drop(sender);
        *total = gateway
            .instructions(keep.filter(|_| count == 2 * n))
            .await?;
    }
    Ok(totals[1].saturating_sub(totals[0]) / u64::from(n))
}
