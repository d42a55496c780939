//! Deployed models: models that run on replicas of their own, called by model id and target
//! (an environment, the development deployment or one deployment) rather than through the
//! Model API. The serde mirror and the validated form side by side, as in `fleet.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::validate::Source;
use super::ConfigError;

pub const DEFAULT_PREDICT_PATH: &str = "/v1/models/model:predict";
/// Sync predict and wake both wait up to 20 minutes by default, as the API we mirror does.
const DEFAULT_TIMEOUT_MS: u64 = 1_200_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployedModel {
    pub id: Spanned<String>,
    pub name: Option<Spanned<String>>,
    pub predict_path: Option<Spanned<String>>,
    #[serde(default)]
    pub environments: BTreeMap<String, Spanned<String>>,
    pub development: Option<Spanned<String>>,
    #[serde(default)]
    pub timeouts: RawDeployedTimeouts,
    pub price: Option<RawRequestPrice>,
    pub wake: Option<Spanned<RawWake>>,
    #[serde(default)]
    pub deployments: Vec<RawDeployment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployment {
    pub id: Spanned<String>,
    pub pool: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDeployedTimeouts {
    pub predict_ms: Spanned<u64>,
    pub wake_ms: Spanned<u64>,
}

impl Default for RawDeployedTimeouts {
    fn default() -> Self {
        Self {
            predict_ms: Spanned::new(0..0, DEFAULT_TIMEOUT_MS),
            wake_ms: Spanned::new(0..0, DEFAULT_TIMEOUT_MS),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequestPrice {
    pub per_request_usd: Spanned<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWake {
    pub command: Option<Vec<String>>,
    pub url: Option<String>,
    pub timeout_ms: Option<u64>,
    pub cooldown_ms: Option<u64>,
}

/// A model deployed on its own replicas.
#[derive(Debug)]
pub struct DeployedModel {
    /// The id in URLs (`model-{id}.…`, `/model/{id}/…`).
    pub id: Arc<str>,
    /// Shown in logs and metrics.
    pub name: Arc<str>,
    /// Where its replicas serve predict.
    pub predict_path: String,
    /// Environment name → index into `deployments`. Always holds `production`.
    pub environments: BTreeMap<String, usize>,
    pub development: Option<usize>,
    pub deployments: Vec<Deployment>,
    pub predict_timeout: Duration,
    pub wake_timeout: Duration,
    /// Nano-dollars per call: known before the call, so budgets reserve it exactly.
    pub price_nanos: u64,
    pub wake: Option<Wake>,
}

impl DeployedModel {
    pub fn deployment(&self, id: &str) -> Option<&Deployment> {
        self.deployments.iter().find(|d| &*d.id == id)
    }
}

#[derive(Debug)]
pub struct Deployment {
    pub id: Arc<str>,
    /// Index into `Snapshot::pools`.
    pub pool: usize,
}

/// What scales a deployment up from zero.
#[derive(Debug, Clone)]
pub struct Wake {
    pub action: WakeAction,
    /// How long the action may run.
    pub timeout: Duration,
    /// It runs at most once per cooldown, per deployment.
    pub cooldown: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WakeAction {
    /// A program and its arguments, run without a shell.
    Command(Vec<String>),
    /// POSTed `{"model": …, "deployment": …}`.
    Url(String),
}

type DeployedList = Vec<Arc<DeployedModel>>;

/// Validates every `[[deployed_models]]` table against the pools.
pub(super) fn deployed_models(
    src: &Source,
    raw: &[RawDeployedModel],
    pools: &HashMap<String, usize>,
) -> Result<(DeployedList, HashMap<String, usize>), ConfigError> {
    let mut models = Vec::with_capacity(raw.len());
    let mut index = HashMap::new();
    for (i, m) in raw.iter().enumerate() {
        let path = format!("deployed_models[{i}]");
        let model = deployed_model(src, m, &path, pools)?;
        if index.insert(model.id.to_string(), i).is_some() {
            return src.err(
                m.id.span(),
                format!("{path}.id"),
                format!(
                    "deployed model {:?} is defined twice; ids must be unique",
                    model.id
                ),
            );
        }
        models.push(Arc::new(model));
    }
    Ok((models, index))
}

/// A model id as URLs carry it: it is also a DNS label (`model-{id}.…`).
pub fn is_model_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 57
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Environment and deployment names as path segments carry them.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn deployed_model(
    src: &Source,
    m: &RawDeployedModel,
    path: &str,
    pools: &HashMap<String, usize>,
) -> Result<DeployedModel, ConfigError> {
    let id = m.id.get_ref();
    if !is_model_id(id) {
        return src.err(
            m.id.span(),
            format!("{path}.id"),
            format!("{id:?} is not a usable model id: 1 to 57 lowercase letters and digits (it is also a host name label, model-{{id}})"),
        );
    }
    let mut deployments: Vec<Deployment> = Vec::with_capacity(m.deployments.len());
    for (j, d) in m.deployments.iter().enumerate() {
        let dpath = format!("{path}.deployments[{j}]");
        let did = d.id.get_ref();
        if !is_name(did) {
            return src.err(
                d.id.span(),
                format!("{dpath}.id"),
                format!("{did:?} is not a usable deployment id: letters, digits, '-', '_' and '.'"),
            );
        }
        if deployments.iter().any(|x| &*x.id == did) {
            return src.err(
                d.id.span(),
                format!("{dpath}.id"),
                format!("deployment {did:?} is defined twice in this model; ids must be unique"),
            );
        }
        let Some(&pool) = pools.get(d.pool.get_ref()) else {
            return src.err(
                d.pool.span(),
                format!("{dpath}.pool"),
                format!(
                    "{:?} is not a defined pool (defined: {})",
                    d.pool.get_ref(),
                    known(pools.keys())
                ),
            );
        };
        deployments.push(Deployment {
            id: did.as_str().into(),
            pool,
        });
    }
    let find = |name: &Spanned<String>, at: String| -> Result<usize, ConfigError> {
        match deployments.iter().position(|d| &*d.id == name.get_ref()) {
            Some(i) => Ok(i),
            None => src.err(
                name.span(),
                at,
                format!(
                    "{:?} is not a deployment of this model (defined: {}); add it under [[{path}.deployments]]",
                    name.get_ref(),
                    known(deployments.iter().map(|d| &*d.id))
                ),
            ),
        }
    };
    let mut environments = BTreeMap::new();
    for (env, dep) in &m.environments {
        if !is_name(env) {
            return src.err(
                dep.span(),
                format!("{path}.environments.{env}"),
                format!(
                    "{env:?} is not a usable environment name: letters, digits, '-', '_' and '.'"
                ),
            );
        }
        environments.insert(
            env.clone(),
            find(dep, format!("{path}.environments.{env}"))?,
        );
    }
    if !environments.contains_key("production") {
        return src.err(
            m.id.span(),
            format!("{path}.environments"),
            "names no production deployment; add environments = { production = \"<deployment id>\" }".into(),
        );
    }
    let development = match &m.development {
        None => None,
        Some(d) => Some(find(d, format!("{path}.development"))?),
    };
    let predict_path = match &m.predict_path {
        None => DEFAULT_PREDICT_PATH.to_string(),
        Some(p) => {
            let ok = p.get_ref().starts_with('/')
                && p.get_ref().bytes().all(|b| b.is_ascii_graphic())
                && !p.get_ref().contains(['?', '#']);
            if !ok {
                return src.err(
                    p.span(),
                    format!("{path}.predict_path"),
                    format!(
                        "{:?} is not a path: it must start with '/', without spaces, '?' or '#'",
                        p.get_ref()
                    ),
                );
            }
            p.get_ref().clone()
        }
    };
    let millis = |v: &Spanned<u64>, name: &str| match *v.get_ref() {
        0 => src.err(
            v.span(),
            format!("{path}.timeouts.{name}"),
            "must be at least 1 (milliseconds)".into(),
        ),
        n => Ok(Duration::from_millis(n)),
    };
    let price_nanos = match &m.price {
        None => 0,
        Some(p) => {
            let usd = *p.per_request_usd.get_ref();
            let nanos = usd * 1e9;
            if !usd.is_finite() || usd < 0.0 || nanos > 1e15 || (nanos - nanos.round()).abs() > 1e-3
            {
                return src.err(
                    p.per_request_usd.span(),
                    format!("{path}.price.per_request_usd"),
                    format!("{usd} is not a price: USD per call, finite, >= 0, in steps of one nano-dollar"),
                );
            }
            nanos.round() as u64
        }
    };
    let wake = match &m.wake {
        None => None,
        Some(w) => Some(wake(src, w, &format!("{path}.wake"))?),
    };
    Ok(DeployedModel {
        id: id.as_str().into(),
        name: m
            .name
            .as_ref()
            .map_or_else(|| id.as_str().into(), |n| n.get_ref().as_str().into()),
        predict_path,
        environments,
        development,
        deployments,
        predict_timeout: millis(&m.timeouts.predict_ms, "predict_ms")?,
        wake_timeout: millis(&m.timeouts.wake_ms, "wake_ms")?,
        price_nanos,
        wake,
    })
}

fn wake(src: &Source, w: &Spanned<RawWake>, path: &str) -> Result<Wake, ConfigError> {
    let r = w.get_ref();
    let action = match (&r.command, &r.url) {
        (Some(c), None) if !c.is_empty() && !c[0].is_empty() => WakeAction::Command(c.clone()),
        (None, Some(u)) if u.starts_with("http://") || u.starts_with("https://") => {
            WakeAction::Url(u.clone())
        }
        _ => {
            return src.err(
                w.span(),
                path.into(),
                "give exactly one of command = [\"/path/to/program\", \"arg\", …] or url = \"http(s)://…\"".into(),
            )
        }
    };
    let positive = |v: Option<u64>, default: u64, name: &str| match v.unwrap_or(default) {
        0 => src.err(
            w.span(),
            format!("{path}.{name}"),
            "must be at least 1 (milliseconds)".into(),
        ),
        n => Ok(Duration::from_millis(n)),
    };
    Ok(Wake {
        action,
        timeout: positive(r.timeout_ms, 30_000, "timeout_ms")?,
        cooldown: positive(r.cooldown_ms, 60_000, "cooldown_ms")?,
    })
}

fn known<'a>(names: impl Iterator<Item = &'a (impl AsRef<str> + ?Sized + 'a)>) -> String {
    let mut all: Vec<_> = names.map(|n| format!("{:?}", n.as_ref())).collect();
    all.sort();
    if all.is_empty() {
        "none".into()
    } else {
        all.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    const POOL: &str = "[[pools]]\nname = \"p\"\n";
    const KEY: &str = "[[keys]]\nid = \"k\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\ndeployed_models = [\"abcd1234\"]\n";
    const MODEL: &str = "[[deployed_models]]\nid = \"abcd1234\"\nname = \"whisper\"\nenvironments = { production = \"dep-a\", staging = \"dep-b\" }\ndevelopment = \"dep-b\"\nprice = { per_request_usd = 0.002 }\nwake = { command = [\"/bin/true\"] }\n[[deployed_models.deployments]]\nid = \"dep-a\"\npool = \"p\"\n[[deployed_models.deployments]]\nid = \"dep-b\"\npool = \"p\"\n";

    #[test]
    fn a_config_with_only_deployed_models_serves_them() {
        let s = parse(&format!("{POOL}{MODEL}{KEY}")).unwrap();
        let m = s.deployed_model("abcd1234").unwrap();
        assert_eq!(m.predict_path, "/v1/models/model:predict");
        assert_eq!(m.environments["staging"], 1);
        assert_eq!(m.development, Some(1));
        assert_eq!(m.price_nanos, 2_000_000);
        assert_eq!(m.predict_timeout.as_secs(), 1200);
        let key = s.keys().next().unwrap();
        assert!(key.allows_deployed("abcd1234", Some("staging")));
        assert!(!key.allows("anything"));
    }

    #[test]
    fn every_reference_is_checked_and_named() {
        let cases = [
            (
                MODEL.replace("staging = \"dep-b\"", "staging = \"dep-x\""),
                "deployed_models[0].environments.staging",
                "\"dep-x\" is not a deployment of this model",
            ),
            (
                MODEL.replace("development = \"dep-b\"", "development = \"nope\""),
                "deployed_models[0].development",
                "not a deployment",
            ),
            (
                MODEL.replace(
                    "pool = \"p\"\n[[deployed_models.deployments]]",
                    "pool = \"q\"\n[[deployed_models.deployments]]",
                ),
                "deployed_models[0].deployments[0].pool",
                "\"q\" is not a defined pool",
            ),
            (
                MODEL.replace("id = \"dep-b\"", "id = \"dep-a\""),
                "deployed_models[0].deployments[1].id",
                "defined twice",
            ),
            (
                format!("{MODEL}{MODEL}"),
                "deployed_models[1].id",
                "defined twice",
            ),
            (
                MODEL.replace("production = \"dep-a\", ", ""),
                "deployed_models[0].environments",
                "production",
            ),
            (
                MODEL.replace("id = \"abcd1234\"", "id = \"Ab/c\""),
                "deployed_models[0].id",
                "not a usable model id",
            ),
        ];
        for (model, path, says) in cases {
            let e = parse(&format!("{POOL}{model}{KEY}")).unwrap_err();
            assert_eq!(e.path, path, "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
        let e = parse(&format!(
            "{POOL}{MODEL}{}",
            KEY.replace("[\"abcd1234\"]", "[\"abcd1234/qa\"]")
        ))
        .unwrap_err();
        assert_eq!(e.path, "keys[0].deployed_models[0]", "{e}");
    }
}
