//! The proxy under test, started per phase: tollgate, nginx or Pingora's own proxy path.

use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::process::Command;
use tokio::time::Instant;

use super::Variant;
use super::KEY;
use super::MODEL;

/// The real `tollgate` binary on loopback, killed when the phase ends (or the harness exits).
pub(super) struct Gateway {
    pub(super) child: Child,
    pub(super) public: SocketAddr,
    pub(super) dir: tempfile::TempDir,
    /// The `cluster` variant's redis-server, killed with the phase.
    pub(super) redis: Option<Child>,
}

impl Gateway {
    pub(super) async fn start(
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
        let (redis, cluster) = match variant {
            // A generous timeout: what is measured is the Redis path, not a fallback that
            // a loaded machine's scheduling delays would trigger.
            Variant::Cluster => {
                let (child, port) = redis(dir.path()).await?;
                (
                    Some(child),
                    format!(
                        "[cluster]\nredis_url = \"redis://127.0.0.1:{port}/0\"\n\
                         node_id = \"bench\"\non_redis_down = \"reject\"\n\
                         timeout_ms = 1000\n\n"
                    ),
                )
            }
            _ => (None, String::new()),
        };
        let limits = match variant {
            Variant::Limits | Variant::Cluster => {
                "rpm = 1000000000\ntpm = 1000000000000\nmax_concurrent = 100000\n\
                 budget = { usd = 1000000000.0, period = \"monthly\" }\n"
            }
            _ => "",
        };
        let tokenizer = match variant {
            Variant::Tokenizer => format!(
                "tokenizer = {:?}\n",
                super::tiny_tokenizer::write(dir.path())
            ),
            _ => String::new(),
        };
        let config = format!(
            "{cluster}[server]\nlisten = \"127.0.0.1:0\"\nthreads = {threads}\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [state]\ndir = {:?}\nledger = {}\n\n\
             [[pools]]\nname = \"bench\"\nreplicas = [{}]\n\n\
             [[models]]\nslug = \"{MODEL}\"\npool = \"bench\"\n\
             price = {{ input_per_mtok = 0.5, output_per_mtok = 1.5 }}\n{tokenizer}\n\
             [[deployed_models]]\nid = \"bench1\"\nname = \"bench predict\"\n\
             environments = {{ production = \"dep-bench\" }}\n\n\
             [[deployed_models.deployments]]\nid = \"dep-bench\"\npool = \"bench\"\n\n\
             [[keys]]\nid = \"bench\"\nsha256 = \"{}\"\nmodels = [\"*\"]\n\
             deployed_models = [\"bench1\"]\n{limits}",
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
            redis,
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
    pub(super) async fn instructions(
        mut self,
        keep: Option<&std::path::Path>,
    ) -> Result<u64, String> {
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

    pub(super) fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// nginx with `threads` workers; its port is found free first, as it cannot report one.
    pub(super) async fn nginx(replicas: &[SocketAddr], threads: u16) -> Result<Gateway, String> {
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
        Gateway {
            child,
            public,
            dir,
            redis: None,
        }
        .listening("nginx", Duration::from_secs(5))
        .await
    }

    /// The Pingora floor (`floor`, this harness's binary) with `threads` workers, on a port
    /// found free first.
    pub(super) async fn floor(
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
        Gateway {
            child,
            public,
            dir,
            redis: None,
        }
        .listening("the Pingora floor", patience)
        .await
    }

    /// Waits until the proxy, which prints no ready line, accepts connections.
    pub(super) async fn listening(self, what: &str, patience: Duration) -> Result<Gateway, String> {
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
    pub(super) async fn stop(mut self) {
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
        if let Some(mut redis) = self.redis.take() {
            let _ = redis.kill().await;
        }
    }
}

/// A redis-server on a free loopback port, persistence off, answering PING.
async fn redis(dir: &std::path::Path) -> Result<(Child, u16), String> {
    let port = free_port()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start redis-server (is it installed?): {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").await.is_ok()
                && s.read_exact(&mut buf).await.is_ok()
                && &buf == b"+PONG\r\n"
            {
                return Ok((child, port));
            }
        }
        if Instant::now() > deadline {
            return Err(format!("redis-server did not answer on port {port}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A command running `binary`, under callgrind (profile in `dir`) if asked.
pub(super) fn launch(binary: &std::path::Path, dir: &std::path::Path, callgrind: bool) -> Command {
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
pub(super) fn free_port() -> Result<SocketAddr, String> {
    let free = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    free.local_addr().map_err(|e| e.to_string())
}
