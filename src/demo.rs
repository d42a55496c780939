//! `tollgate demo`: simulated replicas and the proxy on loopback with a fresh key, so tollgate
//! can be tried with curl and the SDKs on a machine without a GPU.

use std::net::SocketAddr;
use std::time::Duration;

use crate::sim::{SimOptions, SimReplica};
use crate::{auth, config, server};

pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub replicas: usize,
}

pub const CHAT_MODEL: &str = "demo/llama-3.1-8b";
pub const REASONING_MODEL: &str = "demo/qwen3-32b";

pub fn run(opts: DemoOptions) -> Result<(), String> {
    // The simulated replicas get their own small runtime; Pingora runs its own.
    let sim_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tollgate-sim")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the simulated replicas: {e}"))?;
    let sims = sim_runtime.block_on(async {
        let mut sims = Vec::with_capacity(opts.replicas);
        for _ in 0..opts.replicas.max(1) {
            // Roughly an 8B model on one GPU: 16 sequences at once, a prefix cache of
            // 200k tokens, prefill at 10k tokens a second.
            let sim = SimReplica::start(SimOptions {
                ttft: Duration::from_millis(120),
                token_delay: Duration::from_millis(25),
                default_max_tokens: 24,
                batch_slots: Some(16),
                kv_cache_tokens: 200_000,
                prefill_per_token: Duration::from_micros(100),
                ..SimOptions::default()
            })
            .await
            .map_err(|e| format!("cannot start a simulated replica: {e}"))?;
            sims.push(sim);
        }
        Ok::<_, String>(sims)
    })?;
    let key = auth::new_secret();
    let text = config_text(&opts, &sims, &hex::encode(auth::digest(&key)));
    let snapshot = config::parse(&text).map_err(|e| format!("demo config: {e}"))?;
    let result = server::run(snapshot, None, |bound| {
        print_banner(bound, &key, sims.len())
    });
    drop(sims);
    drop(sim_runtime);
    result
}

/// The id of the demo's deployed model, in its predict URL.
const DEPLOYED_MODEL: &str = "demo1234";

fn config_text(opts: &DemoOptions, sims: &[SimReplica], digest: &str) -> String {
    let replicas: Vec<String> = sims.iter().map(|s| format!("\"{}\"", s.addr())).collect();
    format!(
        r#"
[server]
listen = "{listen}"
grace_period_secs = 1

[admin]
listen = "{admin}"

[state]
dir = {state:?}

[[pools]]
name = "demo"
replicas = [{replicas}]

[[models]]
slug = "{CHAT_MODEL}"
pool = "demo"
upstream_model = "llama-3.1-8b"
display_name = "Llama 3.1 8B (simulated)"
context_tokens = 131072
max_output_tokens = 8192
default_max_tokens = 32
price = {{ input_per_mtok = 0.10, cached_input_per_mtok = 0.05, output_per_mtok = 0.20 }}
features = ["tools", "json_mode"]

[[models]]
slug = "{REASONING_MODEL}"
pool = "demo"
upstream_model = "qwen3-32b"
display_name = "Qwen3 32B (simulated)"
context_tokens = 40960
max_output_tokens = 16384
default_max_tokens = 32
price = {{ input_per_mtok = 0.40, cached_input_per_mtok = 0.10, output_per_mtok = 1.20 }}
features = ["tools", "json_mode", "reasoning"]

[[deployed_models]]
id = "{DEPLOYED_MODEL}"
name = "echo (simulated)"
environments = {{ production = "dep-demo" }}
price = {{ per_request_usd = 0.001 }}

[[deployed_models.deployments]]
id = "dep-demo"
pool = "demo"

[[keys]]
id = "demo"
sha256 = "{digest}"
models = ["*"]
deployed_models = ["{DEPLOYED_MODEL}"]
"#,
        listen = opts.listen,
        admin = opts.admin_listen,
        state = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id())),
        replicas = replicas.join(", "),
    )
}

fn print_banner(bound: server::Bound, key: &str, replicas: usize) {
    let base = format!("http://{}/v1", bound.public);
    println!(
        r#"tollgate demo is ready: {replicas} simulated replica(s) serving {CHAT_MODEL} and {REASONING_MODEL}.

  OpenAI base URL   {base}
  API key           {key}
  Metrics           http://{admin}/metrics

curl:
  curl -s {base}/chat/completions \
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \
    -d '{{"model": "{CHAT_MODEL}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  curl -sN {base}/chat/completions \
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \
    -d '{{"model": "{CHAT_MODEL}", "stream": true, "messages": [{{"role": "user", "content": "Hello!"}}]}}'

Python (pip install openai):
from openai import OpenAI
client = OpenAI(base_url="{base}", api_key="{key}")
print(client.chat.completions.create(model="{CHAT_MODEL}",
      messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)

Python (pip install anthropic):
import anthropic
client = anthropic.Anthropic(base_url="http://{root}", api_key="{key}")
print(client.messages.create(model="{REASONING_MODEL}", max_tokens=64,
      messages=[{{"role": "user", "content": "Hello!"}}]).content[-1].text)

Deployed model {DEPLOYED_MODEL} (a Truss-style echo; any body, passed verbatim):
  curl -s http://{root}/model/{DEPLOYED_MODEL}/production/predict \
    -H "Authorization: Api-Key {key}" -d '{{"prompt": "Hello!"}}'

Usage so far:  curl -s 'http://{admin}/admin/usage?bucket=hour&by=model'

Stop with Ctrl-C."#,
        admin = bound.admin,
        root = bound.public,
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
}
