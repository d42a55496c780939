//! A pool's fleet settings: how replicas are picked, checked, ejected, ramped and queued for.
//! The serde mirror (`Raw…`) and the validated form side by side, since each raw table maps
//! to one frozen struct.

use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::validate::Source;
use super::ConfigError;

/// How a pool picks among its eligible replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Fewest requests in flight (weighted by slow start), random among ties.
    LeastInflight,
    /// Each replica in turn.
    RoundRobin,
    /// Consistent hashing with bounded loads, on `x-session-affinity` or the prompt's prefix.
    Affinity,
}

impl Policy {
    pub const NAMES: &'static str = "\"least_inflight\", \"round_robin\" or \"affinity\"";

    pub fn name(self) -> &'static str {
        match self {
            Policy::LeastInflight => "least_inflight",
            Policy::RoundRobin => "round_robin",
            Policy::Affinity => "affinity",
        }
    }

    fn parse(s: &str) -> Option<Policy> {
        match s {
            "least_inflight" => Some(Policy::LeastInflight),
            "round_robin" => Some(Policy::RoundRobin),
            "affinity" => Some(Policy::Affinity),
            _ => None,
        }
    }
}

/// Everything a pool knows about keeping its replicas busy and out of trouble.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub policy: Policy,
    /// Under `affinity`, a replica takes a sticky request while its load is under this many
    /// times the pool's mean (more than 1).
    pub load_factor: f64,
    /// Active checks; `None` when the pool turned them off.
    pub health: Option<HealthCheck>,
    /// Passive ejection; `None` when the pool turned it off.
    pub ejection: Option<Ejection>,
    /// How long a returning replica's share of new requests takes to ramp to full.
    pub slow_start: Option<Duration>,
    /// The replica's concurrency target; `None`: no target.
    pub max_inflight_per_replica: Option<NonZeroU32>,
    pub queue: QueueSettings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path of `GET` (starts with `/`).
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed checks in a row that mark a healthy replica unhealthy.
    pub unhealthy_after: NonZeroU32,
    /// Passed checks in a row that mark an unhealthy replica healthy.
    pub healthy_after: NonZeroU32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Failures in a row (connect refused, reset before an answer, 502/503/504) that eject.
    pub failures: NonZeroU32,
    /// The first ejection's length; each further one in a row doubles it, up to `max`.
    pub base: Duration,
    pub max: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// Requests that may wait; one more is refused with 429 `queue_full`.
    pub max_waiting: u32,
    /// The longest wait; past it, 503 `no_capacity`.
    pub timeout: Duration,
}

// ── The serde mirror. ──

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    pub enabled: bool,
    pub path: Spanned<String>,
    pub interval_ms: Spanned<u64>,
    pub timeout_ms: Spanned<u64>,
    pub unhealthy_after: Spanned<u32>,
    pub healthy_after: Spanned<u32>,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            enabled: true,
            path: Spanned::new(0..0, "/health".into()),
            interval_ms: Spanned::new(0..0, 2_000),
            timeout_ms: Spanned::new(0..0, 1_000),
            unhealthy_after: Spanned::new(0..0, 2),
            healthy_after: Spanned::new(0..0, 2),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawEjection {
    pub enabled: bool,
    pub failures: Spanned<u32>,
    pub base_ms: Spanned<u64>,
    pub max_ms: Spanned<u64>,
}

impl Default for RawEjection {
    fn default() -> Self {
        Self {
            enabled: true,
            failures: Spanned::new(0..0, 3),
            base_ms: Spanned::new(0..0, 5_000),
            max_ms: Spanned::new(0..0, 300_000),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawQueue {
    pub max_waiting: Spanned<u32>,
    pub timeout_ms: Spanned<u64>,
}

impl Default for RawQueue {
    fn default() -> Self {
        Self {
            max_waiting: Spanned::new(0..0, 1024),
            timeout_ms: Spanned::new(0..0, 30_000),
        }
    }
}

/// The pool's fleet keys, as `RawPool` holds them.
pub struct RawFleet<'a> {
    pub policy: &'a Option<Spanned<String>>,
    pub load_factor: &'a Option<Spanned<f64>>,
    pub health: &'a RawHealth,
    pub ejection: &'a RawEjection,
    pub slow_start_ms: &'a Option<Spanned<u64>>,
    pub max_inflight_per_replica: &'a Option<Spanned<u32>>,
    pub queue: &'a RawQueue,
}

pub const DEFAULT_LOAD_FACTOR: f64 = 1.25;

pub(super) fn fleet(src: &Source, raw: RawFleet<'_>, path: &str) -> Result<Fleet, ConfigError> {
    let policy = match raw.policy {
        None => Policy::LeastInflight,
        Some(p) => match Policy::parse(p.get_ref()) {
            Some(policy) => policy,
            None => {
                return src.err(
                    p.span(),
                    format!("{path}.policy"),
                    format!("{:?} is not a policy; use {}", p.get_ref(), Policy::NAMES),
                )
            }
        },
    };
    let load_factor = match raw.load_factor {
        None => DEFAULT_LOAD_FACTOR,
        Some(f) if f.get_ref().is_finite() && *f.get_ref() > 1.0 && *f.get_ref() <= 100.0 => {
            *f.get_ref()
        }
        Some(f) => {
            return src.err(
                f.span(),
                format!("{path}.load_factor"),
                format!(
                    "{} is out of range; use a number above 1 (a replica may take this many times the mean load), e.g. 1.25",
                    f.get_ref()
                ),
            )
        }
    };
    let h = raw.health;
    let health = if h.enabled {
        let hp = format!("{path}.health");
        if !h.path.get_ref().starts_with('/')
            || h.path.get_ref().bytes().any(|b| !b.is_ascii_graphic())
        {
            return src.err(
                h.path.span(),
                format!("{hp}.path"),
                format!(
                    "{:?} is not a URL path; use one starting with '/' without spaces, e.g. \"/health\"",
                    h.path.get_ref()
                ),
            );
        }
        Some(HealthCheck {
            path: h.path.get_ref().clone(),
            interval: millis(src, &h.interval_ms, format!("{hp}.interval_ms"))?,
            timeout: millis(src, &h.timeout_ms, format!("{hp}.timeout_ms"))?,
            unhealthy_after: count(src, &h.unhealthy_after, format!("{hp}.unhealthy_after"))?,
            healthy_after: count(src, &h.healthy_after, format!("{hp}.healthy_after"))?,
        })
    } else {
        None
    };
    let e = raw.ejection;
    let ejection = if e.enabled {
        let ep = format!("{path}.ejection");
        let base = millis(src, &e.base_ms, format!("{ep}.base_ms"))?;
        let max = millis(src, &e.max_ms, format!("{ep}.max_ms"))?;
        if max < base {
            return src.err(
                e.max_ms.span(),
                format!("{ep}.max_ms"),
                format!(
                    "{} is below base_ms ({}); the longest ejection cannot be shorter than the first",
                    e.max_ms.get_ref(),
                    e.base_ms.get_ref()
                ),
            );
        }
        Some(Ejection {
            failures: count(src, &e.failures, format!("{ep}.failures"))?,
            base,
            max,
        })
    } else {
        None
    };
    let slow_start = match raw.slow_start_ms {
        None => None,
        Some(v) if *v.get_ref() == 0 => None,
        Some(v) => Some(Duration::from_millis(*v.get_ref())),
    };
    let max_inflight_per_replica = match raw.max_inflight_per_replica {
        None => None,
        Some(v) => Some(count(src, v, format!("{path}.max_inflight_per_replica"))?),
    };
    let q = raw.queue;
    let queue = QueueSettings {
        max_waiting: *q.max_waiting.get_ref(),
        timeout: millis(src, &q.timeout_ms, format!("{path}.queue.timeout_ms"))?,
    };
    Ok(Fleet {
        policy,
        load_factor,
        health,
        ejection,
        slow_start,
        max_inflight_per_replica,
        queue,
    })
}

fn millis(src: &Source, v: &Spanned<u64>, path: String) -> Result<Duration, ConfigError> {
    match *v.get_ref() {
        0 => src.err(v.span(), path, "must be at least 1 (milliseconds)".into()),
        n => Ok(Duration::from_millis(n)),
    }
}

fn count(src: &Source, v: &Spanned<u32>, path: String) -> Result<NonZeroU32, ConfigError> {
    match NonZeroU32::new(*v.get_ref()) {
        Some(n) => Ok(n),
        None => src.err(v.span(), path, "must be at least 1".into()),
    }
}

/// A replica's `host:port`, its name resolved once, at load.
pub(super) fn replica_addr(s: &str) -> Result<SocketAddr, String> {
    let addr = resolve(s)?;
    if addr.port() == 0 {
        return Err(format!(
            "{s:?} has port 0; name the port the replica serves on"
        ));
    }
    Ok(addr)
}

fn resolve(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad = || format!("{s:?} is not host:port (e.g. \"10.0.0.7:8000\")");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{host:?} resolves to no address")),
        Err(e) => Err(format!("cannot resolve {host:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, Policy};

    fn pool(extra: &str) -> Result<crate::config::Snapshot, crate::config::ConfigError> {
        parse(&format!(
            "[[pools]]\nname = \"p\"\nreplicas = [\"127.0.0.1:9\"]\n{extra}\n\n[[models]]\nslug = \"m\"\npool = \"p\"\n\n[[keys]]\nid = \"k\"\nsha256 = \"{}\"\nmodels = [\"*\"]\n",
            "0".repeat(64)
        ))
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = pool("").unwrap();
        let f = &s.pools[0].fleet;
        assert_eq!(f.policy, Policy::LeastInflight);
        assert_eq!(f.load_factor, 1.25);
        let h = f.health.as_ref().unwrap();
        assert_eq!((h.path.as_str(), h.interval.as_millis()), ("/health", 2000));
        assert_eq!(f.queue.max_waiting, 1024);
        assert_eq!(f.queue.timeout.as_millis(), 30_000);
        assert!(f.max_inflight_per_replica.is_none());
    }

    #[test]
    fn bad_values_name_their_path() {
        for (extra, path) in [
            ("policy = \"random\"", "pools[0].policy"),
            ("load_factor = 0.9", "pools[0].load_factor"),
            ("health = { path = \"health\" }", "pools[0].health.path"),
            (
                "health = { interval_ms = 0 }",
                "pools[0].health.interval_ms",
            ),
            (
                "ejection = { base_ms = 10, max_ms = 5 }",
                "pools[0].ejection.max_ms",
            ),
            (
                "max_inflight_per_replica = 0",
                "pools[0].max_inflight_per_replica",
            ),
            ("queue = { timeout_ms = 0 }", "pools[0].queue.timeout_ms"),
        ] {
            let e = pool(extra).unwrap_err();
            assert_eq!(e.path, path, "{extra}: {e}");
        }
        let s =
            pool("policy = \"affinity\"\nload_factor = 1.5\nhealth = { enabled = false }").unwrap();
        assert_eq!(s.pools[0].fleet.policy, Policy::Affinity);
        assert!(s.pools[0].fleet.health.is_none());
    }
}
