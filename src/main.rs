//! The `tollgate` command line: parse arguments, call into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use tollgate::{account, async_queue, auth, config, demo, logs, reload, server, sim};

/// Every request allocates and frees many small buffers across threads; mimalloc's per-thread
/// free lists cost a fraction of glibc malloc's arenas there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Edge proxy for GPU inference replicas that speak the OpenAI API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve in the foreground with a config file (what systemd runs).
    Run(ConfigArg),
    /// Validate a config file and exit: 0 when valid, 1 with the reason otherwise.
    Check(ConfigArg),
    /// Manage API keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Start simulated replicas and the proxy on loopback with a fresh key, and print how to
    /// call them with curl and the SDKs. Needs no GPU and no config file.
    Demo {
        /// Public listener of the proxy.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listener (metrics, health).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// Number of simulated replicas.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
    },
    /// Show usage from the ledger: requests, tokens and cost per time bucket.
    Usage(UsageArgs),
    /// Run simulated OpenAI-compatible GPU replicas (for tests, benchmarks and trials).
    Sim(SimArgs),
    /// Read async predict's queue (`async.sqlite` under `state.dir`); safe while tollgate runs.
    Async {
        #[command(subcommand)]
        command: AsyncCommand,
    },
}

#[derive(Subcommand)]
enum AsyncCommand {
    /// One line per request: id, status, model, deployment, key, priority, age.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only requests in this status (QUEUED, IN_PROGRESS, SUCCEEDED, …).
        #[arg(long)]
        status: Option<String>,
    },
    /// Everything known of one request, as JSON.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// The request id.
        id: String,
    },
}

#[derive(Args)]
struct ConfigArg {
    /// Path of the TOML config file.
    #[arg(
        short = 'c',
        long = "config",
        default_value = "/etc/tollgate/tollgate.toml"
    )]
    config: PathBuf,
}

#[derive(Args)]
struct UsageArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Start: RFC 3339 time, date (midnight UTC) or Unix seconds. Default: 24 hours ago.
    #[arg(long)]
    from: Option<String>,
    /// End (exclusive), same forms. Default: now.
    #[arg(long)]
    to: Option<String>,
    /// Bucket size: minute, hour or day.
    #[arg(long, default_value = "hour")]
    bucket: String,
    /// Group by key and/or model, e.g. `--by key,model`.
    #[arg(long, value_delimiter = ',')]
    by: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Read these ledger files (or directories of them, such as the state directories of a
    /// cluster's nodes) and report them as one, instead of the config's ledger.
    #[arg(long, num_args = 1..)]
    ledger: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print a fresh random key once, and the [[keys]] lines (with its SHA-256) to paste.
    New {
        /// The key's id: shown in logs, metrics and usage, never the secret.
        #[arg(long)]
        id: Option<String>,
        /// Models the key may use: slugs, `org/*` prefixes, or `*` for all.
        #[arg(long, value_delimiter = ',', default_value = "*")]
        models: Vec<String>,
    },
}

#[derive(Args)]
struct SimArgs {
    /// Address of the first replica; further replicas take the next ports (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// How many replicas to run.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Served model name; repeat for several. None: any model is accepted.
    #[arg(long = "model")]
    models: Vec<String>,
    /// Delay before the first token, in milliseconds.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Delay between tokens, in milliseconds.
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// Completion length when the request sets no max_tokens.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Environment variable holding the API key the replicas require.
    #[arg(long)]
    api_key_env: Option<String>,
    /// Requests each replica generates at once (vLLM's --max-num-seqs); more wait inside it.
    /// Default: no limit.
    #[arg(long)]
    batch_slots: Option<usize>,
    /// Size of each replica's KV prefix cache, in tokens (0: no prefix cache).
    #[arg(long, default_value_t = 0)]
    kv_cache_tokens: u64,
    /// Tokens per KV cache block, the unit the prefix cache matches and evicts.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    kv_block_tokens: u32,
    /// Prefill time per prompt token not in the prefix cache, in microseconds, added to the
    /// time to first token.
    #[arg(long, default_value_t = 0)]
    prefill_us_per_token: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(c) => {
            let _guard = logs::init();
            if let Err(e) = reload::catch_hangup() {
                tracing::error!(error = %e, "a SIGHUP while starting would stop tollgate");
            }
            let (snapshot, file) = match reload::ConfigFile::load(&c.config) {
                Ok(loaded) => loaded,
                Err(e) => return fail(&e.to_string()),
            };
            let result = server::run(snapshot, Some(file), |bound| {
                println!(
                    "tollgate ready public={} admin={}",
                    bound.public, bound.admin
                );
                use std::io::Write;
                let _ = std::io::stdout().flush();
            });
            result.map_or_else(|e| fail(&e), |()| ExitCode::SUCCESS)
        }
        Command::Check(c) => match config::load(&c.config) {
            Ok(s) => {
                println!(
                    "tollgate: {} is valid: {} pool(s), {} model(s), {} key(s)",
                    c.config.display(),
                    s.pools.len(),
                    s.models.len(),
                    s.key_count()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        },
        Command::Key {
            command: KeyCommand::New { id, models },
        } => {
            let secret = auth::new_secret();
            let id =
                id.unwrap_or_else(|| format!("key-{}", &hex::encode(auth::digest(&secret))[..8]));
            if let Err(e) = config::key_id(&id) {
                return fail(&format!("--id: {e}"));
            }
            let models: Vec<String> = models.iter().map(|m| format!("{m:?}")).collect();
            println!("Secret (shown only now; hand it to the client):\n\n  {secret}\n");
            println!("Add to the config file:\n");
            println!(
                "[[keys]]\nid = {id:?}\nsha256 = \"{}\"\nmodels = [{}]",
                hex::encode(auth::digest(&secret)),
                models.join(", ")
            );
            ExitCode::SUCCESS
        }
        Command::Demo {
            listen,
            admin_listen,
            replicas,
        } => {
            let _guard = logs::init();
            demo::run(demo::DemoOptions {
                listen,
                admin_listen,
                replicas,
            })
            .map_or_else(|e| fail(&e), |()| ExitCode::SUCCESS)
        }
        Command::Usage(args) => usage(args),
        Command::Sim(args) => run_sim(args),
        Command::Async { command } => async_command(command),
    }
}

fn run_sim(args: SimArgs) -> ExitCode {
    let api_key = match &args.api_key_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Some(v),
            _ => return fail(&format!("environment variable {var} is not set")),
        },
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    rt.block_on(async {
        let mut running = Vec::with_capacity(args.replicas);
        for i in 0..args.replicas.max(1) {
            let mut addr = args.listen;
            if addr.port() != 0 {
                addr.set_port(addr.port() + i as u16);
            }
            let opts = sim::SimOptions {
                models: args.models.clone(),
                ttft: Duration::from_millis(args.ttft_ms),
                token_delay: Duration::from_millis(args.token_delay_ms),
                default_max_tokens: args.max_tokens,
                api_key: api_key.clone(),
                batch_slots: args.batch_slots,
                kv_cache_tokens: args.kv_cache_tokens,
                kv_block_tokens: args.kv_block_tokens,
                prefill_per_token: Duration::from_micros(args.prefill_us_per_token),
            };
            match sim::SimReplica::start_on(addr, opts).await {
                Ok(r) => {
                    println!("sim ready addr={}", r.addr());
                    running.push(r);
                }
                Err(e) => return fail(&format!("cannot listen on {addr}: {e}")),
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = tokio::signal::ctrl_c().await;
        ExitCode::SUCCESS
    })
}

fn usage(args: UsageArgs) -> ExitCode {
    match print_usage(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// The whole report, fetched and printed a page at a time: the same rows, order and bound
/// as `GET /admin/usage`, in memory for one page whatever the report's size. With `--json`,
/// the admin API's answer with every page's rows in `data`.
fn print_usage(args: &UsageArgs) -> Result<(), String> {
    use std::io::Write;
    let ledgers = match args.ledger.is_empty() {
        true => {
            let state = config::load_state(&args.config.config).map_err(|e| e.to_string())?;
            vec![state.dir.join(account::ledger::FILE_NAME)]
        }
        false => account::many::ledger_files(&args.ledger)?,
    };
    let mut query = String::new();
    for (name, value) in [("from", &args.from), ("to", &args.to)] {
        if let Some(v) = value {
            query.push_str(&format!(
                "{name}={}&",
                form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
            ));
        }
    }
    query.push_str(&format!("bucket={}&by={}", args.bucket, args.by.join(",")));
    let now = chrono::Utc::now().timestamp_millis();
    let mut q = tollgate::admin::usage_query(&query, now)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = |e: std::io::Error| format!("cannot write the report: {e}");
    let (mut first_page, mut first_row) = (true, true);
    loop {
        // A report refused as too large is refused before anything is printed.
        let page = match ledgers.as_slice() {
            [one] => account::query::run(one, &q)?,
            many => account::many::run(many, &q)?,
        };
        if first_page {
            first_page = false;
            if args.json {
                write!(
                    out,
                    "{{\"from\":{:?},\"to\":{:?},\"bucket\":{:?},\"data\":[",
                    account::query::rfc3339(q.from_ms),
                    account::query::rfc3339(q.to_ms),
                    q.bucket.name()
                )
                .map_err(written)?;
            } else {
                writeln!(
                    out,
                    "{:<20} {:<16} {:<28} {:>9} {:>12} {:>12} {:>12} {:>12} {:>14}",
                    "start",
                    "key",
                    "model",
                    "requests",
                    "input",
                    "cached",
                    "uncached",
                    "output",
                    "cost_usd"
                )
                .map_err(written)?;
            }
        }
        for r in &page.rows {
            if args.json {
                if !first_row {
                    out.write_all(b",").map_err(written)?;
                }
                serde_json::to_writer(&mut out, r).map_err(|e| e.to_string())?;
            } else {
                writeln!(
                    out,
                    "{:<20} {:<16} {:<28} {:>9} {:>12} {:>12} {:>12} {:>12} {:>14}",
                    r.start,
                    r.key_id.as_deref().unwrap_or("*"),
                    r.model.as_deref().unwrap_or("*"),
                    r.requests,
                    r.input_tokens,
                    r.cached_input_tokens,
                    r.uncached_input_tokens,
                    r.output_tokens,
                    r.cost_usd
                )
                .map_err(written)?;
            }
            first_row = false;
        }
        match page.next_cursor {
            Some(next) => q.cursor = Some(next),
            None => break,
        }
    }
    if args.json {
        out.write_all(b"]}\n").map_err(written)?;
    }
    out.flush().map_err(written)
}

fn fail(message: &str) -> ExitCode {
    eprintln!("tollgate: {message}");
    ExitCode::FAILURE
}

fn async_command(command: AsyncCommand) -> ExitCode {
    let (config_path, filter, id) = match &command {
        AsyncCommand::List { config, status } => (&config.config, status.clone(), None),
        AsyncCommand::Show { config, id } => (&config.config, None, Some(id.clone())),
    };
    let run = || -> Result<(), String> {
        let state = config::load_state(config_path).map_err(|e| e.to_string())?;
        let jobs = async_queue::read_all(&state.dir)?;
        if let Some(id) = id {
            let job = jobs
                .iter()
                .find(|j| j.id == id)
                .ok_or_else(|| format!("no async request {id:?} in {}", state.dir.display()))?;
            let mut v = job.status_json();
            v["key_id"] = job.key_id.clone().into();
            v["priority"] = job.priority.into();
            v["attempts"] = job.attempts.into();
            v["retry"] = job.retry.describe().into();
            v["expires_at"] = async_queue::rfc3339(job.expires_ms).into();
            v["started_at"] = job.started_ms.map(async_queue::rfc3339).into();
            v["output_kept"] = job.has_output.into();
            // The host only: a webhook URL's path or query may carry a token.
            v["webhook_host"] = job
                .webhook
                .as_deref()
                .and_then(|u| url::Url::parse(u).ok())
                .and_then(|u| u.host_str().map(str::to_string))
                .into();
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            return Ok(());
        }
        let now = chrono::Utc::now().timestamp_millis();
        println!(
            "{:<32}  {:<14}  {:<12}  {:<12}  {:<12}  {:>3}  {:>8}",
            "REQUEST", "STATUS", "MODEL", "DEPLOYMENT", "KEY", "PRI", "AGE_S"
        );
        for j in &jobs {
            if filter
                .as_deref()
                .is_some_and(|f| !f.eq_ignore_ascii_case(j.status.as_str()))
            {
                continue;
            }
            println!(
                "{:<32}  {:<14}  {:<12}  {:<12}  {:<12}  {:>3}  {:>8}",
                j.id,
                j.status.as_str(),
                j.model,
                j.deployment,
                j.key_id,
                j.priority,
                (now - j.created_ms) / 1000
            );
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}
