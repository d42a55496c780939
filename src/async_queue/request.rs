//! The submit body: `{model_input, webhook_endpoint?, priority?, max_time_in_queue_seconds?,
//! inference_retry_config?}`, every field checked against its range, and a bad one named
//! with the range in the message.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::AsyncError;
use crate::webhook;

/// `inference_retry_config`: attempts, and the exponential backoff between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Retry {
    pub max_attempts: u32,
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 3,
            initial_delay_ms: 1000,
            max_delay_ms: 5000,
        }
    }
}

impl Retry {
    /// The wait before attempt `next` (2, 3, …): the initial delay doubled per attempt
    /// since, at most the maximum.
    pub fn delay_ms(&self, next: u32) -> u64 {
        let doublings = next.saturating_sub(2).min(32);
        self.initial_delay_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_delay_ms)
    }
}

/// A checked submit body.
#[derive(Debug)]
pub struct Submit {
    /// Sent as the predict body, as the client wrote it.
    pub model_input: Box<RawValue>,
    pub webhook: Option<String>,
    pub priority: u8,
    pub max_time_in_queue_secs: u64,
    pub retry: Retry,
}

#[derive(Deserialize)]
struct RawSubmit {
    model_input: Option<Box<RawValue>>,
    webhook_endpoint: Option<Value>,
    priority: Option<Value>,
    max_time_in_queue_seconds: Option<Value>,
    inference_retry_config: Option<Value>,
}

fn bad(message: String) -> AsyncError {
    AsyncError::BadField { message }
}

/// An integer field within `lo..=hi`, or the error naming it and its range.
fn integer(v: &Value, name: &str, lo: u64, hi: u64) -> Result<u64, AsyncError> {
    match v.as_u64() {
        Some(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(bad(format!(
            "{name} must be an integer from {lo} to {hi}; got {}",
            crate::vocab::echo(&v.to_string())
        ))),
    }
}

/// Parses and checks a submit body.
pub fn parse(body: &[u8], allow_private: bool) -> Result<Submit, AsyncError> {
    let raw: RawSubmit = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "the body must be a JSON object with model_input ({e})"
        ))
    })?;
    let model_input = match raw.model_input {
        Some(v) if v.get() != "null" => v,
        _ => {
            return Err(bad(
                "model_input is required: the JSON your model's predict takes".into(),
            ))
        }
    };
    let webhook = match raw.webhook_endpoint {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) => {
            webhook::check_url(&url, allow_private)
                .map_err(|reason| bad(format!("webhook_endpoint is refused: {reason}")))?;
            Some(url)
        }
        Some(_) => return Err(bad("webhook_endpoint must be a URL string".into())),
    };
    let priority = match &raw.priority {
        None | Some(Value::Null) => 1,
        Some(v) => integer(v, "priority", 0, 2)? as u8,
    };
    let max_time_in_queue_secs = match &raw.max_time_in_queue_seconds {
        None | Some(Value::Null) => 600,
        Some(v) => integer(v, "max_time_in_queue_seconds", 10, 72 * 3600)?,
    };
    let retry = match &raw.inference_retry_config {
        None | Some(Value::Null) => Retry::default(),
        Some(Value::Object(o)) => {
            let d = Retry::default();
            let field = |name: &str, lo, hi, default| match o.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => integer(v, &format!("inference_retry_config.{name}"), lo, hi),
            };
            if let Some(k) = o.keys().find(|k| {
                !matches!(
                    k.as_str(),
                    "max_attempts" | "initial_delay_ms" | "max_delay_ms"
                )
            }) {
                return Err(bad(format!(
                    "inference_retry_config has no field {}; it takes max_attempts, initial_delay_ms and max_delay_ms",
                    crate::vocab::echo(k)
                )));
            }
            Retry {
                max_attempts: field("max_attempts", 1, 10, d.max_attempts as u64)? as u32,
                initial_delay_ms: field("initial_delay_ms", 0, 10_000, d.initial_delay_ms)?,
                max_delay_ms: field("max_delay_ms", 0, 60_000, d.max_delay_ms)?,
            }
        }
        Some(_) => return Err(bad("inference_retry_config must be an object".into())),
    };
    Ok(Submit {
        model_input,
        webhook,
        priority,
        max_time_in_queue_secs,
        retry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        match parse(body.as_bytes(), false) {
            Err(AsyncError::BadField { message }) => message,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_mirrored_apis() {
        let s = parse(br#"{"model_input": {"x": 1}}"#, false).unwrap();
        assert_eq!(s.model_input.get(), r#"{"x": 1}"#);
        assert_eq!((s.priority, s.max_time_in_queue_secs), (1, 600));
        assert_eq!(s.retry, Retry::default());
        assert_eq!(s.webhook, None);
    }

    #[test]
    fn each_bad_field_is_named_with_its_range() {
        assert!(err("{}").contains("model_input"));
        assert!(err(r#"{"model_input": 1, "priority": 3}"#)
            .contains("priority must be an integer from 0 to 2"));
        assert!(err(r#"{"model_input": 1, "max_time_in_queue_seconds": 9}"#)
            .contains("from 10 to 259200"));
        assert!(
            err(r#"{"model_input": 1, "inference_retry_config": {"max_attempts": 11}}"#)
                .contains("inference_retry_config.max_attempts must be an integer from 1 to 10")
        );
        assert!(
            err(r#"{"model_input": 1, "inference_retry_config": {"initial_delay_ms": -1}}"#)
                .contains("from 0 to 10000")
        );
        assert!(
            err(r#"{"model_input": 1, "inference_retry_config": {"max_delay_ms": 60001}}"#)
                .contains("from 0 to 60000")
        );
        assert!(
            err(r#"{"model_input": 1, "webhook_endpoint": "http://example.com/h"}"#)
                .contains("https")
        );
        assert!(err("[1]").contains("JSON object"));
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let r = Retry {
            max_attempts: 5,
            initial_delay_ms: 100,
            max_delay_ms: 350,
        };
        assert_eq!(
            [r.delay_ms(2), r.delay_ms(3), r.delay_ms(4)],
            [100, 200, 350]
        );
    }
}
