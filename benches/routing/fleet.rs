//! The fleet under test: simulated GPU replicas in this process, and the real `tollgate`
//! binary in front of them with one pool under the policy being measured.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use tollgate::sim::{SimOptions, SimReplica, SimStats};

use super::{Params, KEY, MODEL};

/// Starts `params.replicas` replicas with cold caches.
pub(super) async fn replicas(params: &Params) -> Result<Vec<SimReplica>, String> {
    let mut out = Vec::new();
    for _ in 0..params.replicas {
        let opts = SimOptions {
            ttft: Duration::from_millis(params.ttft_ms),
            token_delay: Duration::from_millis(params.token_delay_ms),
            batch_slots: Some(params.batch_slots),
            kv_cache_tokens: params.kv_cache_tokens,
            kv_block_tokens: params.kv_block_tokens,
            prefill_per_token: Duration::from_micros(params.prefill_us_per_token),
            ..SimOptions::default()
        };
        out.push(SimReplica::start(opts).await.map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// What the replicas' counters say at one moment.
#[derive(Clone, Debug, Default)]
pub(super) struct Counters {
    /// Per replica: requests in it integrated over time, in request-seconds.
    pub load: Vec<f64>,
    pub queue_seconds: f64,
    pub prompt_queried: u64,
    pub cached: u64,
}

impl Counters {
    pub(super) fn read(stats: &[std::sync::Arc<SimStats>]) -> Counters {
        Counters {
            load: stats.iter().map(|s| s.load_seconds()).collect(),
            queue_seconds: stats.iter().map(|s| s.queue_seconds()).sum(),
            prompt_queried: stats.iter().map(|s| s.prefix_queries()).sum(),
            cached: stats.iter().map(|s| s.cached_tokens()).sum(),
        }
    }
}

/// `tollgate run` over `replicas`, killed when dropped.
pub(super) struct Gateway {
    _child: Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Gateway {
    pub(super) async fn start(
        params: &Params,
        replicas: &[SocketAddr],
        policy: &str,
    ) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let list: Vec<String> = replicas.iter().map(|a| format!("\"{a}\"")).collect();
        let target = match params.target {
            0 => String::new(),
            n => format!("max_inflight_per_replica = {n}\n"),
        };
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nthreads = {threads}\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [state]\ndir = {state:?}\nledger = false\n\n\
             [[pools]]\nname = \"bench\"\nreplicas = [{list}]\npolicy = \"{policy}\"\n\
             load_factor = {load_factor}\n{target}\
             queue = {{ max_waiting = 100000, timeout_ms = 600000 }}\n\n\
             [[models]]\nslug = \"{MODEL}\"\npool = \"bench\"\n\
             price = {{ input_per_mtok = 0.5, cached_input_per_mtok = 0.25, output_per_mtok = 1.5 }}\n\n\
             [[keys]]\nid = \"bench\"\nsha256 = \"{digest}\"\nmodels = [\"*\"]\n",
            threads = params.gateway_threads,
            state = dir.path().join("state"),
            list = list.join(", "),
            load_factor = params.load_factor,
            digest = hex::encode(Sha256::digest(KEY.as_bytes())),
        );
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.path().join("stderr.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("run")
            .arg("-c")
            .arg(&path)
            .env("TOLLGATE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start tollgate: {e}"))?;
        let stdout = child.stdout.take().ok_or("tollgate has no stdout")?;
        let mut line = String::new();
        let ready = tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await;
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|a| a.parse::<SocketAddr>().ok())
        };
        match (ready, field("public="), field("admin=")) {
            (Ok(Ok(_)), Some(public), Some(admin)) => Ok(Gateway {
                _child: child,
                public,
                admin,
                _dir: dir,
            }),
            _ => {
                let log =
                    std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
                Err(format!("tollgate did not start ({line:?}); stderr:\n{log}"))
            }
        }
    }

    /// Waits until `/readyz` says the pool has a healthy replica (the first health checks
    /// are done), so no request of the run waits for them.
    pub(super) async fn ready(&self, client: &reqwest::Client) -> Result<(), String> {
        let url = format!("http://{}/readyz", self.admin);
        for _ in 0..300 {
            if let Ok(resp) = client.get(&url).send().await {
                if resp.status() == 200 {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err("tollgate's /readyz did not answer 200 within 6 s".to_owned())
    }
}

/// tollgate's queue-wait histogram from its admin listener: (seconds summed, requests).
pub(super) async fn queue_wait(client: &reqwest::Client, admin: SocketAddr) -> (f64, f64) {
    let url = format!("http://{admin}/metrics");
    let text = match client.get(&url).send().await {
        Ok(resp) => resp.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    (
        sum("tollgate_queue_wait_seconds_sum"),
        sum("tollgate_queue_wait_seconds_count"),
    )
}
