//! A replica's error answer, in the client's dialect. Engines answer errors in several
//! shapes; the message is kept, the rest is rewritten to the shape the client's SDK reads.

use serde_json::{json, Value};

use crate::vocab::Dialect;

/// The longest upstream message passed on, in bytes; longer ones are cut at a character
/// boundary (an HTML error page is not a message).
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// The status the client gets for a replica's error status. A replica refusing with 401 or
/// 403 refuses tollgate's credentials (the pool's upstream key), not the client's key,
/// which tollgate accepted: that is a gateway fault, 502, and no SDK should tell its user
/// that their key is invalid.
pub fn client_status(replica: u16) -> u16 {
    match replica {
        401 | 403 => 502,
        s => s,
    }
}

/// The message of a replica's error answer. It is read from OpenAI's
/// `{"error":{"message"}}`, vLLM's `{"object":"error","message"}`, FastAPI's
/// `{"detail": "…" | [{"loc","msg"}…]}` or `{"error": "…"}`; a body that is none of these is
/// passed on as text; an empty one becomes a sentence naming the status.
pub fn message(status: u16, body: &[u8]) -> String {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| message_of(&v))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    let message = if message.is_empty() {
        format!("The model replica answered HTTP {status} with no message.")
    } else {
        truncate(message)
    };
    match status {
        401 | 403 => format!(
            "The model replica refused the gateway's credentials (HTTP {status}: {message}). Your API key was accepted; the operator must check the pool's upstream_api_key_env."
        ),
        _ => message,
    }
}

/// A replica's error answer in the client's `dialect` (see `openai_body` and
/// `anthropic::error_from_openai`).
pub fn body(dialect: Dialect, status: u16, body: &[u8]) -> Vec<u8> {
    match dialect {
        Dialect::OpenAi | Dialect::Predict => openai_body(status, body),
        Dialect::Anthropic => crate::translate::anthropic::error_from_openai(status, body),
    }
}

/// A replica's error answer in OpenAI's shape, `{"error":{"message","type","param","code"}}`:
/// the message kept; `type` from the status, as tollgate types its own errors; `param`
/// and `code` kept when the replica gave them as strings (engines often send the status
/// as a number in `code`), else `null` and `"replica_error"`.
pub fn openai_body(status: u16, body: &[u8]) -> Vec<u8> {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let field = |name: &str| {
        let v = parsed.as_ref()?;
        let error = v.get("error").filter(|e| e.is_object()).unwrap_or(v);
        error.get(name)?.as_str().map(str::to_string)
    };
    let kind = match client_status(status) {
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    let code = match status {
        401 | 403 => Some("replica_auth_failed".to_string()),
        _ => field("code"),
    };
    json!({"error": {
        "message": message(status, body),
        "type": kind,
        "param": field("param"),
        "code": code.unwrap_or_else(|| "replica_error".into()),
    }})
    .to_string()
    .into_bytes()
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
