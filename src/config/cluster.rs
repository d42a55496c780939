//! The `[cluster]` section: several nodes sharing limits and budgets through Redis. Absent,
//! the node counts alone, in process, and never needs Redis.

use std::num::NonZeroU64;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::validate::Source;
use super::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub redis_url: Spanned<String>,
    pub node_id: Spanned<String>,
    #[serde(default = "default_on_down")]
    pub on_redis_down: Spanned<String>,
    #[serde(default = "default_timeout")]
    pub timeout_ms: Spanned<u64>,
    #[serde(default = "default_expected_nodes")]
    pub expected_nodes: Spanned<u64>,
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_ms: Spanned<u64>,
}

fn default_on_down() -> Spanned<String> {
    Spanned::new(0..0, "local".into())
}
fn default_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 50)
}
fn default_expected_nodes() -> Spanned<u64> {
    Spanned::new(0..0, 2)
}
fn default_lease_ttl() -> Spanned<u64> {
    Spanned::new(0..0, 10_000)
}

/// What a node does while Redis cannot be reached in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRedisDown {
    /// Refuse with 503 `limits_unavailable`.
    Reject,
    /// Count in process, each limit and budget divided by `expected_nodes`.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// May hold a password: never logged, never in a metric or an answer.
    pub redis_url: String,
    /// Names this node's concurrency leases; unique per node.
    pub node_id: String,
    pub on_redis_down: OnRedisDown,
    /// Longest wait for one Redis round trip before it counts as down.
    pub timeout: Duration,
    /// The divisor of every limit and budget while counting locally.
    pub expected_nodes: NonZeroU64,
    /// How long a concurrency slot outlives the last renewal of a node that stopped.
    pub lease_ttl: Duration,
}

pub(super) fn cluster(
    raw: Option<&RawCluster>,
    src: &Source,
) -> Result<Option<ClusterSettings>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let url = raw.redis_url.get_ref();
    if redis::Client::open(url.as_str()).is_err() {
        // The URL itself is not repeated: it may carry a password.
        return src.err(
            raw.redis_url.span(),
            "cluster.redis_url".into(),
            "is not a Redis URL; write it as redis://[:password@]host:port/db or unix:///path"
                .into(),
        );
    }
    let node_id = raw.node_id.get_ref();
    if node_id.is_empty()
        || node_id.len() > 64
        || !node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return src.err(
            raw.node_id.span(),
            "cluster.node_id".into(),
            format!("{node_id:?} must be 1-64 letters, digits, '-', '_' or '.', unique per node"),
        );
    }
    let on_redis_down = match raw.on_redis_down.get_ref().as_str() {
        "local" => OnRedisDown::Local,
        "reject" => OnRedisDown::Reject,
        other => {
            return src.err(
                raw.on_redis_down.span(),
                "cluster.on_redis_down".into(),
                format!("{other:?} is not a choice; use \"local\" or \"reject\""),
            )
        }
    };
    let timeout = *raw.timeout_ms.get_ref();
    if !(1..=10_000).contains(&timeout) {
        return src.err(
            raw.timeout_ms.span(),
            "cluster.timeout_ms".into(),
            format!("{timeout} must be between 1 and 10000 milliseconds"),
        );
    }
    let Some(expected_nodes) = NonZeroU64::new(*raw.expected_nodes.get_ref()) else {
        return src.err(
            raw.expected_nodes.span(),
            "cluster.expected_nodes".into(),
            "must be at least 1: the number of nodes sharing the limits".into(),
        );
    };
    let ttl = *raw.lease_ttl_ms.get_ref();
    if !(1_000..=600_000).contains(&ttl) {
        return src.err(
            raw.lease_ttl_ms.span(),
            "cluster.lease_ttl_ms".into(),
            format!("{ttl} must be between 1000 and 600000 milliseconds"),
        );
    }
    Ok(Some(ClusterSettings {
        redis_url: url.clone(),
        node_id: node_id.clone(),
        on_redis_down,
        timeout: Duration::from_millis(timeout),
        expected_nodes,
        lease_ttl: Duration::from_millis(ttl),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn with(cluster: &str) -> String {
        format!(
            "[[pools]]\nname = \"p\"\nreplicas = [\"127.0.0.1:8000\"]\n[[models]]\nslug = \"m\"\n\
             pool = \"p\"\n[[keys]]\nid = \"k\"\n\
             sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n\
             models = [\"*\"]\n[cluster]\n{cluster}"
        )
    }

    #[test]
    fn a_cluster_gets_the_documented_defaults() {
        let s = parse(&with(
            "redis_url = \"redis://127.0.0.1:6379/0\"\nnode_id = \"edge-1\"\n",
        ))
        .unwrap();
        let c = s.cluster.unwrap();
        assert_eq!(c.on_redis_down, OnRedisDown::Local);
        assert_eq!(c.timeout, Duration::from_millis(50));
        assert_eq!(c.expected_nodes.get(), 2);
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert!(parse(&with("redis_url = \"x\"\n"))
            .unwrap_err()
            .to_string()
            .contains("node_id"));
    }

    #[test]
    fn bad_values_are_named_and_a_password_is_never_repeated() {
        let cases = [
            (
                "redis_url = \"http://:hunter2@h/\"\nnode_id = \"a\"\n",
                "cluster.redis_url",
            ),
            (
                "redis_url = \"redis://h\"\nnode_id = \"a b\"\n",
                "cluster.node_id",
            ),
            (
                "redis_url = \"redis://h\"\nnode_id = \"a\"\non_redis_down = \"retry\"\n",
                "cluster.on_redis_down",
            ),
            (
                "redis_url = \"redis://h\"\nnode_id = \"a\"\ntimeout_ms = 0\n",
                "cluster.timeout_ms",
            ),
            (
                "redis_url = \"redis://h\"\nnode_id = \"a\"\nexpected_nodes = 0\n",
                "cluster.expected_nodes",
            ),
            (
                "redis_url = \"redis://h\"\nnode_id = \"a\"\nlease_ttl_ms = 10\n",
                "cluster.lease_ttl_ms",
            ),
        ];
        for (text, path) in cases {
            let e = parse(&with(text)).unwrap_err().to_string();
            assert!(e.contains(path), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
