//! Errors in the client's dialect: a `Problem` rendered as a JSON body, or as the event that
//! ends a stream whose status was already sent.

use bytes::Bytes;
use serde_json::json;

use super::anthropic;
use crate::vocab::{Dialect, Problem};

/// OpenAI `{"error": {"message", "type", "param", "code"}}` or Anthropic
/// `{"type": "error", "error": {"type", "message"}}`.
pub fn body(dialect: Dialect, p: &Problem) -> Bytes {
    let value = match dialect {
        Dialect::OpenAi => json!({
            "error": {
                "message": p.message,
                "type": p.kind,
                "param": p.param,
                "code": p.code,
            }
        }),
        Dialect::Anthropic => json!({
            "type": "error",
            "error": { "type": anthropic_type(p), "message": p.message },
        }),
        Dialect::Predict => json!({ "error": p.message }),
    };
    Bytes::from(value.to_string())
}

/// A server-sent event carrying the error body. The OpenAI SDKs raise an `APIError` when an
/// event carries an `error` object; Anthropic's read an `error` event.
pub fn event(dialect: Dialect, p: &Problem) -> Bytes {
    let mut out = match dialect {
        Dialect::OpenAi | Dialect::Predict => b"data: ".to_vec(),
        Dialect::Anthropic => b"event: error\ndata: ".to_vec(),
    };
    out.extend_from_slice(&body(dialect, p));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Anthropic's error `type`, decided by the status as the Anthropic API does.
pub fn anthropic_type(p: &Problem) -> &'static str {
    anthropic::error_type_for_status(p.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_dialects_carry_the_message_and_events_end_in_a_blank_line() {
        let p = Problem {
            status: 429,
            kind: "rate_limit_error",
            code: "rate_limit_requests",
            param: None,
            message: "slow down".into(),
        };
        let openai: serde_json::Value = serde_json::from_slice(&body(Dialect::OpenAi, &p)).unwrap();
        assert_eq!(openai["error"]["code"], "rate_limit_requests");
        assert_eq!(openai["error"]["param"], serde_json::Value::Null);
        let anthropic: serde_json::Value =
            serde_json::from_slice(&body(Dialect::Anthropic, &p)).unwrap();
        assert_eq!(anthropic["error"]["type"], "rate_limit_error");
        assert_eq!(anthropic["error"]["message"], "slow down");
        let e = event(Dialect::Anthropic, &p);
        assert!(e.starts_with(b"event: error\ndata: {") && e.ends_with(b"}\n\n"));
    }
}
