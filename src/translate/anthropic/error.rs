//! Errors in the Anthropic dialect: the type for an HTTP status, and upstream error bodies
//! rewritten with the replica's own message kept.

use serde::Serialize;

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

/// A replica's error answer as an Anthropic error body, typed by `status`, with the
/// replica's message kept (see `replica_error::message`).
pub fn error_from_openai(status: u16, body: &[u8]) -> Vec<u8> {
    use crate::translate::replica_error;
    error_body(
        error_type_for_status(replica_error::client_status(status)),
        &replica_error::message(status, body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

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
        assert!(
            long["error"]["message"].as_str().unwrap().len()
                <= crate::translate::replica_error::MAX_MESSAGE_BYTES + 3
        );
    }
}
