//! `[async]`: async predict's queue, payload cap, run timeout, kept outputs and result
//! webhooks. The serde mirror and the validated form side by side, as in `deployed.rs`.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::validate::Source;
use super::{ConfigError, Secret};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAsync {
    pub webhook_secret_env: Option<Spanned<String>>,
    pub max_payload_bytes: Spanned<u64>,
    pub webhook_allow_private: bool,
    pub max_queued: Spanned<u64>,
    pub max_in_progress: Spanned<u64>,
    pub run_timeout_secs: Spanned<u64>,
    pub output_max_bytes: Spanned<u64>,
    pub output_retention_secs: Spanned<u64>,
}

impl Default for RawAsync {
    fn default() -> Self {
        Self {
            webhook_secret_env: None,
            max_payload_bytes: Spanned::new(0..0, 256 * 1024),
            webhook_allow_private: false,
            max_queued: Spanned::new(0..0, 10_000),
            max_in_progress: Spanned::new(0..0, 64),
            run_timeout_secs: Spanned::new(0..0, 3600),
            output_max_bytes: Spanned::new(0..0, 1024 * 1024),
            output_retention_secs: Spanned::new(0..0, 3600),
        }
    }
}

/// The validated `[async]` section.
#[derive(Debug)]
pub struct AsyncSettings {
    /// Result webhooks are signed with each of these (several while one is rotated out).
    pub webhook_secrets: Vec<Secret>,
    /// A submit body larger than this is refused with 413.
    pub max_payload_bytes: u64,
    /// Webhooks may go to `http://` URLs and private addresses (loopback always may).
    pub webhook_allow_private: bool,
    /// Per deployment: queued requests past this are refused with 429 `CAPACITY_EXCEEDED`.
    pub max_queued: u64,
    /// Per deployment: async requests running at once, at most (they also take only room
    /// under the pool's concurrency target that no sync request waits for).
    pub max_in_progress: u64,
    /// Each attempt at running a request must end within this.
    pub run_timeout: Duration,
    /// Outputs up to this size are kept for `GET /async_request/{id}/output`; 0 keeps none.
    pub output_max_bytes: u64,
    /// How long a finished request's status and output stay readable.
    pub retention: Duration,
}

impl Default for AsyncSettings {
    fn default() -> Self {
        AsyncSettings {
            webhook_secrets: Vec::new(),
            max_payload_bytes: 256 * 1024,
            webhook_allow_private: false,
            max_queued: 10_000,
            max_in_progress: 64,
            run_timeout: Duration::from_secs(3600),
            output_max_bytes: 1024 * 1024,
            retention: Duration::from_secs(3600),
        }
    }
}

/// The secrets an environment variable holds: comma-separated, blanks around them ignored.
pub fn secrets_of(value: &str) -> Vec<Secret> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| Secret::new(s.to_string()))
        .collect()
}

pub(super) fn async_settings(src: &Source, a: &RawAsync) -> Result<AsyncSettings, ConfigError> {
    let webhook_secrets = match &a.webhook_secret_env {
        None => Vec::new(),
        Some(var) => {
            let secrets = std::env::var(var.get_ref())
                .map(|v| secrets_of(&v))
                .unwrap_or_default();
            if secrets.is_empty() {
                return src.err(
                    var.span(),
                    "async.webhook_secret_env".into(),
                    format!(
                        "environment variable {} is not set or empty; set it to one secret, or several separated by commas while rotating",
                        var.get_ref()
                    ),
                );
            }
            secrets
        }
    };
    let within = |v: &Spanned<u64>, name: &str, lo: u64, hi: u64, unit: &str| {
        let n = *v.get_ref();
        if n < lo || n > hi {
            return src.err(
                v.span(),
                format!("async.{name}"),
                format!("{n} is out of range: {lo} to {hi} {unit}"),
            );
        }
        Ok(n)
    };
    Ok(AsyncSettings {
        webhook_secrets,
        max_payload_bytes: within(
            &a.max_payload_bytes,
            "max_payload_bytes",
            1,
            64 * 1024 * 1024,
            "bytes",
        )?,
        webhook_allow_private: a.webhook_allow_private,
        max_queued: within(&a.max_queued, "max_queued", 1, 1_000_000, "requests")?,
        max_in_progress: within(
            &a.max_in_progress,
            "max_in_progress",
            1,
            100_000,
            "requests",
        )?,
        run_timeout: Duration::from_secs(within(
            &a.run_timeout_secs,
            "run_timeout_secs",
            1,
            86_400,
            "seconds",
        )?),
        output_max_bytes: within(
            &a.output_max_bytes,
            "output_max_bytes",
            0,
            64 * 1024 * 1024,
            "bytes",
        )?,
        retention: Duration::from_secs(within(
            &a.output_retention_secs,
            "output_retention_secs",
            1,
            7 * 86_400,
            "seconds",
        )?),
    })
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    const BASE: &str = "[[pools]]\nname = \"p\"\n[[models]]\nslug = \"m\"\npool = \"p\"\n[[keys]]\nid = \"k\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nmodels = [\"*\"]\n";

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = parse(BASE).unwrap();
        assert_eq!(s.asynchronous.max_payload_bytes, 262_144);
        assert_eq!(s.asynchronous.run_timeout.as_secs(), 3600);
        assert_eq!(s.asynchronous.retention.as_secs(), 3600);
        assert!(s.asynchronous.webhook_secrets.is_empty());
    }

    #[test]
    fn ranges_and_the_secret_variable_are_checked() {
        let e = parse(&format!("[async]\nmax_queued = 0\n{BASE}")).unwrap_err();
        assert_eq!(e.path, "async.max_queued", "{e}");
        let e = parse(&format!(
            "[async]\nwebhook_secret_env = \"TOLLGATE_TEST_UNSET_SECRET_VAR\"\n{BASE}"
        ))
        .unwrap_err();
        assert_eq!(e.path, "async.webhook_secret_env", "{e}");
        assert!(!e.to_string().contains("Secret("), "{e}");
    }

    #[test]
    fn several_secrets_are_separated_by_commas() {
        let s = secrets_of(" old , new,,");
        let v: Vec<&str> = s.iter().map(Secret::expose).collect();
        assert_eq!(v, ["old", "new"]);
    }
}
