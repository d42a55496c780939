//! Load harness: what tollgate costs compared with calling the replicas directly, measured in
//! one run against the same in-process simulated replicas, and printed as ratios.
//!
//! `cargo bench --bench load -- --connections 32 --duration 10`; every flag is described in
//! `benches/README.md` and by `--help`.

#[path = "load/floor.rs"]
mod floor;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout_at, Instant};

use tollgate::sim::{SimOptions, SimReplica, SimStats};

/// The secret the harness presents to tollgate; its digest goes into the generated config.
const KEY: &str = "tg-load-harness-key";
const MODEL: &str = "bench";
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
    /// Which phases to run.
    #[arg(long, value_enum, default_value_t = Phase::Both)]
    phase: Phase,
    /// Tollgate setups to measure after the direct phase, in one run: `default`,
    /// `no-ledger` (accounting not written), `limits` (every limit and a budget configured,
    /// none reached), `anthropic` (the same load as Anthropic Messages requests), `nginx`
    /// (nginx from `PATH` as a plain reverse proxy, for calibration), `pingora` (Pingora's own
    /// proxy path with nothing of tollgate's: the floor of a gateway built on Pingora).
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
    /// Not tollgate: nginx (from `PATH`) as a plain reverse proxy in front of the same
    /// replicas, with upstream keep-alive and no access log, for calibration.
    Nginx,
    /// Not tollgate: Pingora's own proxy path with nothing of tollgate's
    /// (`floor`), the floor of any gateway built on Pingora.
    Pingora,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Default => "tollgate",
            Variant::NoLedger => "tg-no-ledger",
            Variant::Limits => "tg-limits",
            Variant::Anthropic => "tg-anthropic",
            Variant::Nginx => "nginx",
            Variant::Pingora => "pingora",
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
            ..SimOptions::default()
        };
        replicas.push(SimReplica::start(opts).await.map_err(|e| e.to_string())?);
    }
    let addrs: Vec<SocketAddr> = replicas.iter().map(SimReplica::addr).collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
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
                None,
            )
            .await,
        );
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
            gateway.child.id(),
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
    let payload = Payload::new(params, variant);
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

/// What one phase measured.
struct Report {
    name: &'static str,
    /// Every connection's tally merged, latencies sorted.
    tally: Tally,
    measured: Duration,
    /// Requests and new connections the replicas saw during the phase, warm-up included.
    upstream_requests: u64,
    upstream_connections: u64,
    /// CPU spent in the measured window; `None` where `/proc` cannot be read.
    cpu: Option<Cpu>,
}

/// What one connection saw.
#[derive(Default)]
struct Tally {
    /// Latencies of successful requests, in microseconds.
    latencies: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    reconnects: u64,
}

impl Tally {
    fn error(&mut self, counted: bool, what: String) {
        if counted {
            self.errors += 1;
            self.first_error.get_or_insert(what);
        }
    }

    fn absorb(&mut self, other: Tally) {
        self.latencies.extend_from_slice(&other.latencies);
        self.errors += other.errors;
        self.reconnects += other.reconnects;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// The schedule and request shared by every connection of one phase.
struct Job {
    measure_from: Instant,
    end: Instant,
    path: &'static str,
    headers: HeaderMap,
    body: Bytes,
    /// A complete stream ends with this.
    stream_end: Option<&'static [u8]>,
}

/// The request every connection of a phase sends, serialised once.
struct Payload {
    path: &'static str,
    body: Bytes,
    stream_end: Option<&'static [u8]>,
}

impl Payload {
    /// The request of `variant`: a chat completion, or an Anthropic message.
    fn new(params: &Params, variant: Variant) -> Payload {
        let mut body = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": params.tokens,
        });
        if params.stream {
            body["stream"] = true.into();
        }
        let (path, stream_end): (&'static str, &'static [u8]) = match variant {
            Variant::Anthropic => (
                "/v1/messages",
                b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            ),
            _ => ("/v1/chat/completions", b"data: [DONE]\n\n"),
        };
        Payload {
            path,
            body: Bytes::from(body.to_string()),
            stream_end: params.stream.then_some(stream_end),
        }
    }
}

impl Job {
    /// `payload` sent to `target`.
    fn new(
        payload: &Payload,
        target: SocketAddr,
        auth: Option<&HeaderValue>,
        measure_from: Instant,
        end: Instant,
    ) -> Job {
        let body = payload.body.clone();
        let mut headers = HeaderMap::new();
        headers.insert(
            HOST,
            HeaderValue::try_from(target.to_string()).expect("ip:port"),
        );
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        if let Some(auth) = auth {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        Job {
            measure_from,
            end,
            path: payload.path,
            headers,
            body,
            stream_end: payload.stream_end,
        }
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = Uri::from_static(self.path);
        *req.headers_mut() = self.headers.clone();
        req
    }
}

async fn measure(
    name: &'static str,
    params: &Params,
    variant: Variant,
    replicas: &[SimReplica],
    targets: &[SocketAddr],
    auth: Option<HeaderValue>,
    tollgate_pid: Option<u32>,
) -> Report {
    let upstream =
        |count: fn(&SimStats) -> u64| -> u64 { replicas.iter().map(|r| count(&r.stats())).sum() };
    let requests_before = upstream(SimStats::requests);
    let connections_before = upstream(SimStats::connections);

    let measure_from = Instant::now() + params.warmup;
    let end = measure_from + params.duration;
    let cpu = tokio::spawn(sample_cpu(measure_from, end, tollgate_pid));
    let mut tasks = JoinSet::new();
    let payload = Payload::new(params, variant);
    for i in 0..usize::from(params.connections) {
        let target = targets[i % targets.len()];
        let job = Job::new(&payload, target, auth.as_ref(), measure_from, end);
        tasks.spawn(drive(target, job));
    }
    let mut tally = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        tally.absorb(joined.expect("connection task does not panic"));
    }
    tally.latencies.sort_unstable();
    let cpu = cpu.await.ok().flatten();
    Report {
        name,
        tally,
        measured: params.duration,
        upstream_requests: upstream(SimStats::requests) - requests_before,
        upstream_connections: upstream(SimStats::connections) - connections_before,
        cpu,
    }
}

/// One keep-alive connection sending requests back to back until the end of the phase; a
/// broken connection is replaced and the failed request counted as an error.
async fn drive(target: SocketAddr, job: Job) -> Tally {
    let mut tally = Tally {
        latencies: Vec::with_capacity(4096),
        ..Tally::default()
    };
    let deadline = job.end + STRAGGLER_GRACE;
    let mut connects: u64 = 0;
    'connect: while Instant::now() < job.end {
        connects += 1;
        let mut sender = match timeout_at(deadline, connect(target)).await {
            Ok(Ok(sender)) => sender,
            Ok(Err(e)) => {
                tally.error(Instant::now() >= job.measure_from, e);
                // Do not spin on a refused port.
                sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(_) => break,
        };
        loop {
            if sender.ready().await.is_err() {
                continue 'connect;
            }
            let sent = Instant::now();
            if sent >= job.end {
                break 'connect;
            }
            let outcome = timeout_at(deadline, exchange(&mut sender, &job)).await;
            let done = Instant::now();
            let counted = sent >= job.measure_from;
            match outcome {
                Ok(Ok(())) => {
                    if counted && done <= job.end {
                        let micros = u32::try_from((done - sent).as_micros());
                        tally.latencies.push(micros.unwrap_or(u32::MAX));
                    }
                }
                Ok(Err(Failure::Status(status, text))) => {
                    tally.error(counted, format!("status {status}: {text}"))
                }
                Ok(Err(Failure::Body(what))) => tally.error(counted, what),
                Ok(Err(Failure::Transport(what))) => {
                    tally.error(counted, what);
                    continue 'connect;
                }
                Err(_) => {
                    tally.error(true, "no response within 10 s after the end".into());
                    break 'connect;
                }
            }
        }
    }
    tally.reconnects = connects.saturating_sub(1);
    tally
}

async fn connect(target: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake {target}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

enum Failure {
    /// The status and the start of the body, which says why.
    Status(StatusCode, String),
    Body(String),
    Transport(String),
}

/// One request, timed by the caller from the write to the last body byte.
async fn exchange(sender: &mut SendRequest<Full<Bytes>>, job: &Job) -> Result<(), Failure> {
    let resp = sender
        .send_request(job.request())
        .await
        .map_err(|e| Failure::Transport(format!("request: {e}")))?;
    let status = resp.status();
    // Read the whole body even for an error status, so the connection can be reused.
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::Transport(format!("body: {e}")))?
        .to_bytes();
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(Failure::Status(status, text));
    }
    if let Some(end) = job.stream_end {
        if !body.ends_with(end) {
            return Err(Failure::Body("stream did not end as it should".into()));
        }
    }
    Ok(())
}

/// CPU seconds from `/proc` (Linux): this process (load generator and replicas), tollgate,
/// and every core of the machine, so that other work on a shared box shows up.
#[derive(Clone, Copy)]
struct Cpu {
    own: f64,
    tollgate: f64,
    machine: f64,
}

impl Cpu {
    fn now(tollgate: Option<u32>) -> Option<Cpu> {
        let tollgate = match tollgate {
            // With its children: nginx works in worker processes.
            Some(pid) => {
                let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .unwrap_or_default();
                process_ticks(&pid.to_string())?
                    + children
                        .split_whitespace()
                        .filter_map(process_ticks)
                        .sum::<u64>()
            }
            None => 0,
        };
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace();
        let ticks: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal; guest time is already in user.
        let busy = ticks.iter().take(8).sum::<u64>() - ticks.get(3)? - ticks.get(4)?;
        // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
        let secs = |t: u64| t as f64 / 100.0;
        Some(Cpu {
            own: secs(process_ticks("self")?),
            tollgate: secs(tollgate),
            machine: secs(busy),
        })
    }
}

/// CPU spent between `from` and `to`.
async fn sample_cpu(from: Instant, to: Instant, tollgate: Option<u32>) -> Option<Cpu> {
    sleep_until(from).await;
    let a = Cpu::now(tollgate)?;
    sleep_until(to).await;
    let b = Cpu::now(tollgate)?;
    let (own, tollgate, machine) = (
        b.own - a.own,
        b.tollgate - a.tollgate,
        b.machine - a.machine,
    );
    Some(Cpu {
        own,
        tollgate,
        machine,
    })
}

/// utime + stime of a process.
fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the numeric fields start after its closing paren.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The real `tollgate` binary on loopback, killed when the phase ends (or the harness exits).
struct Gateway {
    child: Child,
    public: SocketAddr,
    dir: tempfile::TempDir,
}

impl Gateway {
    async fn start(
        binary: &std::path::Path,
        replicas: &[SocketAddr],
        variant: Variant,
        threads: u16,
        callgrind: bool,
    ) -> Result<Gateway, String> {
        match variant {
            Variant::Nginx => return Gateway::nginx(replicas, threads).await,
            Variant::Pingora => return Gateway::floor(binary, replicas, threads, callgrind).await,
            _ => {}
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let list: Vec<String> = replicas.iter().map(|a| format!("\"{a}\"")).collect();
        // Limits high enough never to refuse: the cost of checking them is what is measured.
        let limits = match variant {
            Variant::Limits => {
                "rpm = 1000000000\ntpm = 1000000000000\nmax_concurrent = 100000\n\
                 budget = { usd = 1000000000.0, period = \"monthly\" }\n"
            }
            _ => "",
        };
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nthreads = {threads}\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [state]\ndir = {:?}\nledger = {}\n\n\
             [[pools]]\nname = \"bench\"\nreplicas = [{}]\n\n\
             [[models]]\nslug = \"{MODEL}\"\npool = \"bench\"\n\
             price = {{ input_per_mtok = 0.5, output_per_mtok = 1.5 }}\n\n\
             [[keys]]\nid = \"bench\"\nsha256 = \"{}\"\nmodels = [\"*\"]\n{limits}",
            dir.path().join("state"),
            variant != Variant::NoLedger,
            list.join(", "),
            hex::encode(Sha256::digest(KEY.as_bytes())),
        );
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.path().join("stderr.log")).map_err(|e| e.to_string())?;
        let mut command = launch(binary, dir.path(), callgrind);
        let mut child = command
            .arg("run")
            .arg("-c")
            .arg(&path)
            // Warnings only: the access log would put a write on every request's path.
            .env("TOLLGATE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| match callgrind {
                true => format!("cannot start valgrind (is it installed?): {e}"),
                false => format!("cannot start tollgate: {e}"),
            })?;
        let stdout = child.stdout.take().ok_or("tollgate has no stdout")?;
        let (mut stdout, mut line) = (BufReader::new(stdout), String::new());
        // Under callgrind, start-up (loading the system's CA certificates) takes a while.
        let patience = Duration::from_secs(if callgrind { 300 } else { 30 });
        let ready = tokio::time::timeout(patience, stdout.read_line(&mut line)).await;
        let mut gateway = Gateway {
            child,
            public: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
        };
        let public = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("public="))
            .and_then(|a| a.parse().ok());
        match (ready, public) {
            (Ok(Ok(_)), Some(public)) => gateway.public = public,
            _ => {
                let why = format!("no ready line ({line:?}); stderr:\n{}", gateway.stderr());
                gateway.stop().await;
                return Err(why);
            }
        }
        Ok(gateway)
    }

    /// Stops tollgate run under callgrind (SIGINT: Pingora's fast shutdown, which exits the
    /// process so callgrind writes its profile) and reads the instructions it counted. The
    /// profile is copied to `keep`, if given.
    async fn instructions(mut self, keep: Option<&std::path::Path>) -> Result<u64, String> {
        let pid = self.child.id().ok_or("tollgate already exited")?;
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(pid.to_string())
            .status()
            .await;
        tokio::time::timeout(Duration::from_secs(300), self.child.wait())
            .await
            .map_err(|_| "tollgate did not exit under callgrind")?
            .map_err(|e| e.to_string())?;
        let mut total = 0;
        for entry in std::fs::read_dir(self.dir.path()).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let is_profile = path
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("callgrind.out"));
            if !is_profile {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            total += text
                .lines()
                .find_map(|l| l.strip_prefix("totals:").or(l.strip_prefix("summary:")))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| format!("no totals in {}", path.display()))?;
            if let Some(keep) = keep {
                if let Some(dir) = keep.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                }
                std::fs::copy(&path, keep).map_err(|e| format!("{}: {e}", keep.display()))?;
            }
        }
        Ok(total)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// nginx with `threads` workers; its port is found free first, as it cannot report one.
    async fn nginx(replicas: &[SocketAddr], threads: u16) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let public = free_port()?;
        let servers: String = replicas.iter().map(|a| format!("server {a}; ")).collect();
        let d = dir.path().display();
        let config = format!(
            "worker_processes {threads};\nerror_log {d}/stderr.log warn;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             upstream replicas {{ {servers}keepalive 64; }}\n\
             server {{ listen {public}; location / {{ proxy_pass http://replicas;\n\
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n"
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config).map_err(|e| e.to_string())?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start nginx (is it installed?): {e}"))?;
        Gateway { child, public, dir }
            .listening("nginx", Duration::from_secs(5))
            .await
    }

    /// The Pingora floor (`floor`, this harness's binary) with `threads` workers, on a port
    /// found free first.
    async fn floor(
        binary: &std::path::Path,
        replicas: &[SocketAddr],
        threads: u16,
        callgrind: bool,
    ) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let public = free_port()?;
        let log =
            std::fs::File::create(dir.path().join("stderr.log")).map_err(|e| e.to_string())?;
        let mut command = launch(binary, dir.path(), callgrind);
        let child = command
            .arg("--serve-floor")
            .arg(public.to_string())
            .arg(threads.to_string())
            .args(replicas.iter().map(|a| a.to_string()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let patience = Duration::from_secs(if callgrind { 300 } else { 5 });
        Gateway { child, public, dir }
            .listening("the Pingora floor", patience)
            .await
    }

    /// Waits until the proxy, which prints no ready line, accepts connections.
    async fn listening(self, what: &str, patience: Duration) -> Result<Gateway, String> {
        let give_up = Instant::now() + patience;
        while Instant::now() < give_up {
            if TcpStream::connect(self.public).await.is_ok() {
                return Ok(self);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let why = format!(
            "{what} did not listen on {}: {}",
            self.public,
            self.stderr()
        );
        self.stop().await;
        Err(why)
    }

    /// SIGKILL and reap: nothing of the proxy's shutdown is being measured. nginx is asked
    /// to stop instead, as killing its master would leave its workers behind.
    async fn stop(mut self) {
        if self.dir.path().join("nginx.conf").exists() {
            let _ = Command::new("nginx")
                .arg("-p")
                .arg(self.dir.path())
                .arg("-c")
                .arg(self.dir.path().join("nginx.conf"))
                .arg("-s")
                .arg("stop")
                .status()
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        }
        let _ = self.child.kill().await;
    }
}

/// A command running `binary`, under callgrind (profile in `dir`) if asked.
fn launch(binary: &std::path::Path, dir: &std::path::Path, callgrind: bool) -> Command {
    if !callgrind {
        return Command::new(binary);
    }
    let mut c = Command::new("valgrind");
    c.arg("--tool=callgrind")
        .arg(format!(
            "--callgrind-out-file={}",
            dir.join("callgrind.out").display()
        ))
        .arg(binary);
    c
}

/// A loopback port free a moment ago, for proxies that cannot report the one they bound.
fn free_port() -> Result<SocketAddr, String> {
    let free = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    free.local_addr().map_err(|e| e.to_string())
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1000.0
}

impl Report {
    fn rate(&self) -> f64 {
        self.tally.latencies.len() as f64 / self.measured.as_secs_f64()
    }

    fn ms(&self, p: f64) -> f64 {
        percentile(&self.tally.latencies, p)
    }
}

fn render(reports: &[Report]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<13} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "phase", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:<13} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7}",
            r.name,
            r.rate(),
            r.ms(50.0),
            r.ms(90.0),
            r.ms(99.0),
            r.ms(100.0),
            r.tally.errors,
        );
    }
    if let [direct, rest @ ..] = reports {
        for tollgate in rest.iter().filter(|_| direct.name == "direct") {
            let _ = writeln!(
                out,
                "{}/direct throughput {:.2}x; added latency p50 {:+.3} ms, p99 {:+.3} ms",
                tollgate.name,
                tollgate.rate() / direct.rate(),
                tollgate.ms(50.0) - direct.ms(50.0),
                tollgate.ms(99.0) - direct.ms(99.0),
            );
        }
    }
    // Each variant's cost against the default setup, from tollgate's own CPU per request.
    let per_request = |r: &Report| {
        r.cpu
            .map(|c| c.tollgate / r.tally.latencies.len().max(1) as f64)
    };
    if let Some(base) = reports
        .iter()
        .find(|r| r.name == "tollgate")
        .and_then(per_request)
    {
        for r in reports.iter().filter(|r| r.name.starts_with("tg-")) {
            if let Some(cost) = per_request(r) {
                let _ = writeln!(
                    out,
                    "{}: tollgate CPU per request {:.0} us, {:.2}x the default setup ({:.0} us)",
                    r.name,
                    cost * 1e6,
                    cost / base,
                    base * 1e6
                );
            }
        }
    }
    for r in reports {
        let mut line = format!(
            "{}: replicas saw {} requests on {} new connections (warm-up included); {} client reconnects",
            r.name, r.upstream_requests, r.upstream_connections, r.tally.reconnects
        );
        if let Some(cpu) = r.cpu {
            let secs = r.measured.as_secs_f64();
            let per_req = 1e6 / r.tally.latencies.len().max(1) as f64;
            let others = (cpu.machine - cpu.own - cpu.tollgate).max(0.0);
            let _ = write!(
                line,
                "\n{}: cores busy: harness+replicas {:.2}, tollgate {:.2}, other processes {:.2}; \
                 CPU per request: harness+replicas {:.0} us, tollgate {:.0} us",
                r.name,
                cpu.own / secs,
                cpu.tollgate / secs,
                others / secs,
                cpu.own * per_req,
                cpu.tollgate * per_req,
            );
        }
        let _ = writeln!(out, "{line}");
        if let Some(e) = &r.tally.first_error {
            let _ = writeln!(out, "{}: first error: {e}", r.name);
        }
    }
    out
}
