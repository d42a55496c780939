//! The per-request `"sim"` object: timing, length and failure overrides chosen by the caller.

use std::time::Duration;

use http::StatusCode;
use serde_json::{Map, Value};

use super::SimOptions;

const FIELDS: [&str; 11] = [
    "ttft_ms",
    "token_delay_ms",
    "tokens",
    "reasoning_tokens",
    "parallel_tools",
    "fail_status",
    "stall_ms",
    "reset_after",
    "include_usage_every_chunk",
    "no_usage",
    "prompt_tokens",
];

/// What one request asked the replica to simulate, with the replica's defaults filled in.
#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    pub ttft: Duration,
    pub token_delay: Duration,
    /// Natural answer length; `None` runs until the token limit.
    pub tokens: Option<u32>,
    pub reasoning_tokens: Option<u32>,
    pub parallel_tools: bool,
    pub fail_status: Option<StatusCode>,
    pub stall: Option<Duration>,
    pub reset_after: Option<u32>,
    pub usage_every_chunk: bool,
    /// Report no usage at all, as some engines do.
    pub no_usage: bool,
    /// The prompt's tokens to report instead of the replica's own count, as a tokenizer
    /// that counts more than it would (one token per short word, say).
    pub prompt_tokens: Option<u32>,
}

impl Scenario {
    /// Reads `body.sim`. Unknown fields are rejected so that a typo in a test fails loudly
    /// instead of silently running the default scenario.
    pub(crate) fn from_body(body: &Value, opts: &SimOptions) -> Result<Scenario, String> {
        let empty = Map::new();
        let sim = match body.get("sim") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(sim)) => sim,
            Some(_) => return Err("`sim` must be an object".to_owned()),
        };
        if let Some(unknown) = sim.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(format!(
                "unknown field `sim.{unknown}`; expected one of {}",
                FIELDS.join(", ")
            ));
        }
        let fail_status = match uint(sim, "fail_status")? {
            None => None,
            Some(code) => Some(
                u16::try_from(code)
                    .ok()
                    .filter(|c| (400..=599).contains(c))
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| format!("`sim.fail_status` must be 400-599, got {code}"))?,
            ),
        };
        let usage_every_chunk = flag(sim, "include_usage_every_chunk")?;
        let no_usage = flag(sim, "no_usage")?;
        if usage_every_chunk && no_usage {
            return Err(
                "`sim.no_usage` and `sim.include_usage_every_chunk` contradict each other"
                    .to_owned(),
            );
        }
        Ok(Scenario {
            ttft: millis(sim, "ttft_ms")?.unwrap_or(opts.ttft),
            token_delay: millis(sim, "token_delay_ms")?.unwrap_or(opts.token_delay),
            tokens: count(sim, "tokens")?,
            reasoning_tokens: count(sim, "reasoning_tokens")?,
            parallel_tools: flag(sim, "parallel_tools")?,
            fail_status,
            stall: millis(sim, "stall_ms")?,
            reset_after: count(sim, "reset_after")?,
            usage_every_chunk,
            no_usage,
            prompt_tokens: count(sim, "prompt_tokens")?,
        })
    }
}

fn uint(sim: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match sim.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("`sim.{key}` must be a non-negative integer, got {v}")),
    }
}

fn count(sim: &Map<String, Value>, key: &str) -> Result<Option<u32>, String> {
    uint(sim, key).map(|n| n.map(|n| u32::try_from(n).unwrap_or(u32::MAX)))
}

fn millis(sim: &Map<String, Value>, key: &str) -> Result<Option<Duration>, String> {
    uint(sim, key).map(|n| n.map(Duration::from_millis))
}

fn flag(sim: &Map<String, Value>, key: &str) -> Result<bool, String> {
    match sim.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("`sim.{key}` must be a boolean, got {v}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_come_from_options() {
        let opts = SimOptions {
            ttft: Duration::from_millis(7),
            ..SimOptions::default()
        };
        let s = Scenario::from_body(&json!({"model": "m"}), &opts).unwrap();
        assert_eq!(s.ttft, Duration::from_millis(7));
        assert_eq!(s.tokens, None);
        assert!(s.fail_status.is_none() && !s.parallel_tools);
    }

    #[test]
    fn overrides_are_read() {
        let body = json!({"sim": {"ttft_ms": 5, "tokens": 3, "fail_status": 503,
            "include_usage_every_chunk": true, "reset_after": 2}});
        let s = Scenario::from_body(&body, &SimOptions::default()).unwrap();
        assert_eq!(s.ttft, Duration::from_millis(5));
        assert_eq!(s.tokens, Some(3));
        assert_eq!(s.fail_status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(s.reset_after, Some(2));
        assert!(s.usage_every_chunk);
    }

    #[test]
    fn bad_fields_are_rejected() {
        let opts = SimOptions::default();
        for sim in [
            json!({"ttfb_ms": 5}),
            json!({"fail_status": 200}),
            json!({"tokens": -1}),
            json!({"parallel_tools": "yes"}),
            json!("fast"),
        ] {
            assert!(Scenario::from_body(&json!({ "sim": sim }), &opts).is_err());
        }
    }
}
