//! Waking deployed models: the configured action (a program run without a shell, or a URL
//! POSTed JSON) that scales a deployment up from zero, at most once per cooldown per
//! deployment, off the request path. Its result is logged and counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::{DeployedModel, Wake, WakeAction};
use crate::metrics::Metrics;

/// A deployment: (model id, deployment id).
type Target = (Arc<str>, Arc<str>);

/// When each deployment's action last ran, by (model id, deployment id). Kept across
/// reloads: a reload does not reset a cooldown.
pub struct Waker {
    last: Mutex<HashMap<Target, Instant>>,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
}

impl Waker {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Waker {
            last: Mutex::new(HashMap::new()),
            metrics,
            http: reqwest::Client::new(),
        }
    }

    /// Runs the model's wake action for `deployment` in the background, unless it ran within
    /// its cooldown. Says whether it started it. Only wake calls and requests that find no
    /// healthy replica come here, so the lock is off the hot path.
    pub fn wake(&self, model: &DeployedModel, deployment: &Arc<str>) -> bool {
        let Some(wake) = model.wake.clone() else {
            return false;
        };
        let now = Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let slot = last.entry((model.id.clone(), deployment.clone()));
            match slot {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    if now.duration_since(*e.get()) < wake.cooldown {
                        return false;
                    }
                    e.insert(now);
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(now);
                }
            }
        }
        let (metrics, http) = (self.metrics.clone(), self.http.clone());
        let (id, name, dep) = (model.id.clone(), model.name.clone(), deployment.clone());
        tokio::spawn(async move {
            let outcome = run(&http, &wake, &id, &dep).await;
            match &outcome {
                Ok(()) => tracing::info!(model = %id, deployment = %dep, "wake action ran"),
                Err((_, detail)) => {
                    tracing::warn!(model = %id, deployment = %dep, error = %detail, "wake action failed")
                }
            }
            metrics.observe_wake(&name, outcome.map_or_else(|(o, _)| o, |()| "ok"));
        });
        true
    }
}

/// Runs the action once, within its timeout.
async fn run(
    http: &reqwest::Client,
    wake: &Wake,
    model: &str,
    deployment: &str,
) -> Result<(), (&'static str, String)> {
    let work = async {
        match &wake.action {
            WakeAction::Command(argv) => {
                let status = tokio::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .args([model, deployment])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .status()
                    .await
                    .map_err(|e| ("failed", format!("cannot run {}: {e}", argv[0])))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(("failed", format!("{} exited with {status}", argv[0])))
                }
            }
            WakeAction::Url(url) => {
                let body = serde_json::json!({ "model": model, "deployment": deployment });
                let r = http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .map_err(|e| ("failed", format!("POST failed: {}", e.without_url())))?;
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(("failed", format!("answered {}", r.status())))
                }
            }
        }
    };
    match tokio::time::timeout(wake.timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(("timeout", format!("not done within {:?}", wake.timeout))),
    }
}
