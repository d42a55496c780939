//! The frozen, validated configuration: types that cannot hold invalid values.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use super::fleet::Fleet;

pub use crate::vocab::TokenPrices;

/// One immutable view of the config file. A request takes one at its start and keeps it.
#[derive(Debug)]
pub struct Snapshot {
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub state: StateSettings,
    pub alerts: AlertSettings,
    /// `[async]`: async predict's queue and result webhooks.
    pub asynchronous: super::AsyncSettings,
    pub pools: Vec<Pool>,
    /// In file order, which is the catalog order.
    pub models: Vec<Arc<Model>>,
    pub(super) model_index: HashMap<String, usize>,
    pub(super) keys: HashMap<[u8; 32], Arc<Key>>,
    /// Models deployed on replicas of their own, in file order.
    pub deployed_models: Vec<Arc<super::DeployedModel>>,
    pub(super) deployed_index: HashMap<String, usize>,
    /// `[cluster]`: limits and budgets shared through Redis; `None` counts in process.
    pub cluster: Option<super::ClusterSettings>,
}

impl Snapshot {
    pub fn model(&self, slug: &str) -> Option<&Arc<Model>> {
        self.model_index.get(slug).map(|&i| &self.models[i])
    }

    pub fn deployed_model(&self, id: &str) -> Option<&Arc<super::DeployedModel>> {
        self.deployed_index
            .get(id)
            .map(|&i| &self.deployed_models[i])
    }

    /// Looks a key up by the SHA-256 digest of its secret.
    pub fn key_by_digest(&self, digest: &[u8; 32]) -> Option<&Arc<Key>> {
        self.keys.get(digest)
    }

    pub fn keys(&self) -> impl Iterator<Item = &Arc<Key>> {
        self.keys.values()
    }

    pub fn key_by_id(&self, id: &str) -> Option<&Arc<Key>> {
        self.keys.values().find(|k| &*k.id == id)
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

#[derive(Debug)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: u64,
    pub threads: NonZeroUsize,
    pub grace_period: Duration,
    /// How long a write to a client may make no progress before the client is given up.
    pub client_write_timeout: Duration,
    pub upstream_keepalive_pool_size: NonZeroUsize,
    /// Reload when the config file changes (checked every second).
    pub reload_on_change: bool,
    /// Requests per sliding minute each key may make to `count_tokens` and `/v1/models`,
    /// counted apart from its `rpm`.
    pub metadata_rpm: u64,
    /// How long a request head may take to arrive in all: from the connection's accept for
    /// its first request, from the head's first byte for each later one (the idle time
    /// between two requests on a kept-alive connection is not the client's head).
    pub head_timeout: Duration,
    /// How fast a request body must arrive.
    pub body_pace: BodyPace,
}

/// How fast a request body must arrive: all of it within `grace` of the first read, plus one
/// second for every `min_rate` bytes received by then. A body that keeps up with `min_rate`
/// on average is never cut, whatever its size; one trickling in is, however often it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPace {
    pub grace: Duration,
    /// Bytes per second.
    pub min_rate: NonZeroU64,
}

#[derive(Debug)]
pub struct AdminSettings {
    pub listen: SocketAddr,
}

#[derive(Debug)]
pub struct StateSettings {
    /// Where the usage ledger lives.
    pub dir: PathBuf,
    /// Whether finished requests are written to the ledger.
    pub ledger: bool,
}

#[derive(Debug, Default)]
pub struct AlertSettings {
    /// Budget alerts are POSTed here as JSON, signed with HMAC-SHA256 when a secret is set.
    pub webhook_url: Option<String>,
    /// One or several (comma-separated in the variable, while rotating).
    pub webhook_secrets: Vec<Secret>,
}

/// Optional request, token and concurrency limits (per key, or per model across keys).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_concurrent: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.max_concurrent.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    Total,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// The budget in nano-dollars.
    pub nanos: u64,
    pub period: Period,
    /// Reject (402) what would pass the budget; otherwise only alert.
    pub enforce: bool,
    /// Fractions of the budget that raise an alert, ascending.
    pub alert_at: Vec<f64>,
    /// Lower `max_tokens` to what the remaining budget pays for instead of rejecting.
    pub clamp_max_tokens: bool,
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub replicas: Vec<SocketAddr>,
    /// Sent upstream as `Authorization: Bearer …` instead of the client's key.
    pub upstream_key: Option<Secret>,
    pub timeouts: Timeouts,
    /// Attempts per request, counting the first; connect failures and 502/503 answers are
    /// retried on another replica.
    pub max_attempts: NonZeroU32,
    /// Picking, health, ejection, slow start, concurrency target and queue.
    pub fleet: Fleet,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
    pub total: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub pool_idle: Duration,
}

#[derive(Debug)]
pub struct Model {
    pub slug: Arc<str>,
    /// Index into `Snapshot::pools`.
    pub pool: usize,
    pub upstream_model: String,
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub owned_by: String,
    pub created: i64,
    pub context_tokens: Option<u32>,
    pub max_output_tokens: Option<u32>,
    pub price: Price,
    /// `price` in nano-dollars per token, for exact integer cost sums.
    pub token_prices: TokenPrices,
    pub features: Vec<&'static str>,
    pub input_modalities: Vec<&'static str>,
    /// Which media URLs (images, audio, video) the model's replicas may be sent to fetch.
    pub media_urls: MediaUrls,
    /// How an Anthropic `thinking` request is passed to this model's engine.
    pub reasoning_switch: ThinkingStyle,
    /// Output tokens reserved when a request sets no `max_tokens`.
    pub default_max_tokens: u32,
    /// Limits across all keys, protecting the pool.
    pub limits: Limits,
    /// How its prompts are counted for reservations.
    pub prompt: super::PromptRules,
}

/// Which URLs in media parts reach a model's replicas, which fetch them themselves (vLLM
/// does): a client could otherwise make a GPU host fetch an internal address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaUrls {
    /// http(s) URLs whose host is, and resolves only to, public addresses; inline data.
    PublicOnly,
    /// Any URL: the replicas' own egress rules are what protects the network.
    Any,
    /// Inline data only (`data:` URLs, base64 sources).
    None,
}

/// How a replica's model is told whether to think. The Anthropic `thinking` field is mapped
/// to exactly one of these; when the client sent no `thinking`, nothing is sent and the
/// model's own default applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinkingStyle {
    /// `chat_template_kwargs.enable_thinking` (vLLM, SGLang).
    ChatTemplateKwargs,
    /// `chat_template_args.enable_thinking` (TensorRT-LLM and some hosted engines).
    ChatTemplateArgs,
    /// `reasoning_effort`: `low` for budgets under 4,096 tokens, `medium` under 16,384,
    /// `high` above. Disabled thinking asks for `low`, the least effort every engine takes
    /// (OpenAI's `none` is refused by engines that know only the three levels); the
    /// reasoning it still produces is left out of the answer.
    ReasoningEffort,
    /// The model is not told: `thinking` is dropped.
    Ignore,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Price {
    pub input_per_mtok: f64,
    pub cached_input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl From<&Price> for TokenPrices {
    fn from(p: &Price) -> Self {
        let nanos = |usd_per_mtok: f64| (usd_per_mtok * 1000.0).round() as u64;
        TokenPrices {
            input: nanos(p.input_per_mtok),
            cached_input: nanos(p.cached_input_per_mtok),
            output: nanos(p.output_per_mtok),
        }
    }
}

#[derive(Debug)]
pub struct Key {
    /// Appears in logs, metrics and usage; never the secret.
    pub id: Arc<str>,
    pub models: ModelAccess,
    /// Deployed models it may call: `(id, None)` every target of a model, `(id,
    /// Some(environment))` that environment only.
    pub deployed: Vec<(String, Option<String>)>,
    pub limits: Limits,
    pub budget: Option<Budget>,
}

#[derive(Debug)]
pub enum ModelAccess {
    All,
    Only(Vec<ModelPattern>),
}

#[derive(Debug)]
pub enum ModelPattern {
    Exact(String),
    /// `org/*` is stored as the prefix `org/`.
    Prefix(String),
}

impl ModelPattern {
    pub fn matches(&self, slug: &str) -> bool {
        match self {
            ModelPattern::Exact(s) => s == slug,
            ModelPattern::Prefix(p) => slug.starts_with(p.as_str()),
        }
    }
}

impl Key {
    pub fn allows(&self, slug: &str) -> bool {
        match &self.models {
            ModelAccess::All => true,
            ModelAccess::Only(patterns) => patterns.iter().any(|p| p.matches(slug)),
        }
    }

    /// Whether it may call deployed model `id` in `environment` (`None`: a target that is no
    /// environment, a deployment or development, which only a grant of the whole model
    /// reaches).
    pub fn allows_deployed(&self, id: &str, environment: Option<&str>) -> bool {
        self.deployed.iter().any(|(m, env)| {
            m == id
                && match env {
                    None => true,
                    Some(e) => Some(e.as_str()) == environment,
                }
        })
    }
}

/// A credential from the environment. Its `Debug` never shows the value.
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}
