//! The serde mirror of the TOML file: every key, its default, nothing validated yet.

use serde::Deserialize;
use toml::Spanned;

use super::fleet::{RawEjection, RawHealth, RawQueue};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tollgate";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 100 * 1024 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub alerts: RawAlerts,
    #[serde(default, rename = "async")]
    pub asynchronous: super::asynchronous::RawAsync,
    #[serde(default)]
    pub pools: Vec<RawPool>,
    #[serde(default)]
    pub models: Vec<RawModel>,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub deployed_models: Vec<super::deployed::RawDeployedModel>,
    pub cluster: Option<super::cluster::RawCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: Spanned<String>,
    pub max_body_bytes: Spanned<u64>,
    pub threads: Spanned<usize>,
    pub grace_period_secs: u64,
    pub client_write_timeout_ms: Spanned<u64>,
    pub upstream_keepalive_pool_size: Spanned<usize>,
    pub reload_on_change: bool,
    pub metadata_rpm: Spanned<u64>,
    pub head_timeout_ms: Spanned<u64>,
    pub body_timeout_ms: Spanned<u64>,
    pub body_min_bytes_per_sec: Spanned<u64>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: Spanned::new(0..0, DEFAULT_LISTEN.to_string()),
            max_body_bytes: Spanned::new(0..0, DEFAULT_MAX_BODY_BYTES),
            threads: Spanned::new(0..0, 2),
            grace_period_secs: 30,
            client_write_timeout_ms: Spanned::new(0..0, 60_000),
            upstream_keepalive_pool_size: Spanned::new(0..0, 1024),
            reload_on_change: true,
            metadata_rpm: Spanned::new(0..0, 600),
            head_timeout_ms: Spanned::new(0..0, 10_000),
            body_timeout_ms: Spanned::new(0..0, 10_000),
            body_min_bytes_per_sec: Spanned::new(0..0, 8192),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: Spanned<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: Spanned::new(0..0, DEFAULT_ADMIN_LISTEN.to_string()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawState {
    pub dir: Spanned<String>,
    pub ledger: bool,
}

impl Default for RawState {
    fn default() -> Self {
        Self {
            dir: Spanned::new(0..0, DEFAULT_STATE_DIR.to_string()),
            ledger: true,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    pub webhook_url: Option<Spanned<String>>,
    pub webhook_secret_env: Option<Spanned<String>>,
}

/// Optional limits; absent means unlimited.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub rpm: Option<Spanned<u64>>,
    pub tpm: Option<Spanned<u64>>,
    pub max_concurrent: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub usd: Spanned<f64>,
    pub period: Spanned<String>,
    #[serde(default = "yes")]
    pub enforce: bool,
    pub alert_at: Option<Spanned<Vec<f64>>>,
    #[serde(default)]
    pub clamp_max_tokens: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: Spanned<String>,
    #[serde(default)]
    pub replicas: Vec<Spanned<String>>,
    pub upstream_api_key_env: Option<Spanned<String>>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: Spanned<u32>,
    // The fleet keys (config/fleet.rs).
    pub policy: Option<Spanned<String>>,
    pub load_factor: Option<Spanned<f64>>,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub ejection: RawEjection,
    pub slow_start_ms: Option<Spanned<u64>>,
    pub max_inflight_per_replica: Option<Spanned<u32>>,
    #[serde(default)]
    pub queue: RawQueue,
}

fn default_max_attempts() -> Spanned<u32> {
    Spanned::new(0..0, 3)
}

/// Upstream timeouts in milliseconds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTimeouts {
    pub connect_ms: Spanned<u64>,
    pub first_byte_ms: Spanned<u64>,
    pub idle_ms: Spanned<u64>,
    pub total_ms: Spanned<u64>,
    pub pool_idle_ms: Spanned<u64>,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        Self {
            connect_ms: Spanned::new(0..0, 2_000),
            first_byte_ms: Spanned::new(0..0, 300_000),
            idle_ms: Spanned::new(0..0, 120_000),
            total_ms: Spanned::new(0..0, 1_800_000),
            pool_idle_ms: Spanned::new(0..0, 4_000),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub slug: Spanned<String>,
    pub pool: Spanned<String>,
    pub upstream_model: Option<Spanned<String>>,
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub owned_by: Option<String>,
    pub created: Option<i64>,
    pub context_tokens: Option<Spanned<u32>>,
    pub max_output_tokens: Option<Spanned<u32>>,
    pub price: Option<Spanned<RawPrice>>,
    #[serde(default)]
    pub features: Vec<Spanned<String>>,
    pub input_modalities: Option<Vec<Spanned<String>>>,
    pub media_urls: Option<Spanned<String>>,
    pub reasoning_switch: Option<Spanned<String>>,
    pub default_max_tokens: Option<Spanned<u32>>,
    #[serde(default)]
    pub limits: RawLimits,
    pub template_overhead: Option<RawOverhead>,
    pub max_image_tokens: Option<Spanned<u32>>,
    pub tokenizer: Option<Spanned<String>>,
}

/// Tokens a model's chat template adds to a prompt.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverhead {
    pub per_message: Option<u32>,
    pub per_request: Option<u32>,
}

/// USD per million tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input_per_mtok: f64,
    pub cached_input_per_mtok: Option<f64>,
    pub output_per_mtok: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: Spanned<String>,
    pub sha256: Spanned<String>,
    pub models: Option<Spanned<Vec<Spanned<String>>>>,
    /// Deployed models: `"{id}"` (every target) or `"{id}/{environment}"`.
    pub deployed_models: Option<Spanned<Vec<Spanned<String>>>>,
    pub rpm: Option<Spanned<u64>>,
    pub tpm: Option<Spanned<u64>>,
    pub max_concurrent: Option<Spanned<u64>>,
    pub budget: Option<Spanned<RawBudget>>,
}
