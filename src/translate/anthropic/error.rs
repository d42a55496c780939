//! Errors in the Anthropic dialect: the type for an HTTP status, and upstream error bodies
//! rewritten with the replica's own message kept.

use serde::Serialize;
use serde_json::Value;

/// The longest upstream message passed on, in bytes; longer ones are cut at a character
/// boundary (an HTML error page is not a message).
const MAX_MESSAGE_BYTES: usize = 2048;

/// Anthropic's error `type` for an HTTP status, as its API documents them: 400
/// `invalid_request_error` (also used for other 4xx), 401 `authentication_error`, 402
/// `billing_error`, 403 `permission_error`, 404 `not_found_error`, 413
/// `request_too_large`, 429 `rate_limit_error`, 500 `api_error`, 504 `timeout_error` (the
/// SDKs' `GatewayTimeoutError`), 529 `overloaded_error`. 503 means the same as 529 for a
/// replica (no capacity now, retry later) and is reported as `overloaded_error`; any
/// other status is `api_error`.
pub fn error_type_for_status(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

/// `{"type":"error","error":{"type":…,"message":…}}`.
pub fn error_body(error_type: &str, message: &str) -> Vec<u8> {
    let envelope = ErrorEnvelope {
        kind: "error",
        error: ErrorObject {
            kind: error_type,
            message,
        },
    };
    // Two plain strings cannot fail to serialise.
    serde_json::to_vec(&envelope).unwrap_or_default()
}

/// A replica's error answer as an Anthropic error body, typed by `status`. The message is
/// read from OpenAI's `{"error":{"message"}}`, vLLM's `{"object":"error","message"}`,
/// FastAPI's `{"detail": "…" | [{"loc","msg"}…]}` or `{"error": "…"}`; a body that is none
/// of these is passed on as text; an empty one becomes a sentence naming the status.
pub fn error_from_openai(status: u16, body: &[u8]) -> Vec<u8> {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| message_of(&v))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    let message = if message.is_empty() {
        format!("The model replica answered HTTP {status} with no message.")
    } else {
        truncate(message)
    };
    error_body(error_type_for_status(status), &message)
}

fn message_of(body: &Value) -> Option<String> {
    let text = |v: &Value| v.as_str().map(str::to_string);
    if let Some(error) = body.get("error") {
        return match error {
            Value::String(s) => Some(s.clone()),
            _ => error.get("message").and_then(text),
        };
    }
    if let Some(message) = body.get("message").and_then(text) {
        return Some(message);
    }
    match body.get("detail")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(detail_item).collect();
            Some(parts.join("; "))
        }
        other => Some(other.to_string()),
    }
}

/// One FastAPI validation error: `body.messages.0.content: Field required`.
fn detail_item(item: &Value) -> String {
    let msg = item.get("msg").and_then(Value::as_str);
    let loc = item.get("loc").and_then(Value::as_array).map(|parts| {
        parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(".")
    });
    match (loc, msg) {
        (Some(loc), Some(msg)) => format!("{loc}: {msg}"),
        (None, Some(msg)) => msg.to_string(),
        _ => item.to_string(),
    }
}

fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn translated(status: u16, body: &str) -> Value {
        serde_json::from_slice(&error_from_openai(status, body.as_bytes())).unwrap()
    }

    #[test]
    fn statuses_map_to_documented_types() {
        let cases = [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (402, "billing_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (408, "invalid_request_error"),
            (413, "request_too_large"),
            (422, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (504, "timeout_error"),
            (529, "overloaded_error"),
            (200, "api_error"),
        ];
        for (status, kind) in cases {
            assert_eq!(error_type_for_status(status), kind, "{status}");
        }
    }

    #[test]
    fn upstream_messages_are_kept() {
        let openai = r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"BadRequestError","param":null,"code":400}}"#;
        assert_eq!(
            translated(400, openai),
            json!({"type": "error", "error": {"type": "invalid_request_error",
                "message": "This model's maximum context length is 8192 tokens."}})
        );
        let vllm = r#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}"#;
        assert_eq!(
            translated(404, vllm)["error"]["message"],
            "The model `x` does not exist."
        );
        let fastapi = r#"{"detail":[{"type":"missing","loc":["body","messages",0,"content"],"msg":"Field required"}]}"#;
        assert_eq!(
            translated(422, fastapi)["error"]["message"],
            "body.messages.0.content: Field required"
        );
        assert_eq!(
            translated(404, r#"{"detail":"Not Found"}"#)["error"]["message"],
            "Not Found"
        );
        assert_eq!(
            translated(500, r#"{"error":"boom"}"#)["error"]["message"],
            "boom"
        );
        assert_eq!(
            translated(502, "  upstream connect error  ")["error"]["message"],
            "upstream connect error"
        );
        let empty = translated(503, "");
        assert_eq!(empty["error"]["type"], "overloaded_error");
        assert!(empty["error"]["message"].as_str().unwrap().contains("503"));
        let long = translated(500, &"é".repeat(5000));
        assert!(long["error"]["message"].as_str().unwrap().len() <= MAX_MESSAGE_BYTES + 3);
    }
}
