//! Responses tollgate writes itself: errors in the client's dialect and direct JSON answers.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde_json::json;

use crate::error::GatewayError;

/// The error shape a client understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `{"error": {"message", "type", "param", "code"}}`
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`
    Anthropic,
}

pub fn error_body(dialect: Dialect, err: &GatewayError) -> Bytes {
    let value = match dialect {
        Dialect::OpenAi => json!({
            "error": {
                "message": err.message(),
                "type": err.kind(),
                "param": err.param(),
                "code": err.code(),
            }
        }),
        Dialect::Anthropic => json!({
            "type": "error",
            "error": { "type": err.anthropic_type(), "message": err.message() },
        }),
    };
    Bytes::from(value.to_string())
}

/// Writes a complete JSON response with an exact Content-Length.
pub async fn send_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
    extra: &[(&'static str, String)],
) -> pingora::Result<()> {
    let mut header = ResponseHeader::build(status, Some(5 + extra.len()))?;
    for (name, value) in extra {
        header.insert_header(*name, value.as_str())?;
    }
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    header.insert_header("x-request-id", request_id)?;
    header.insert_header("request-id", request_id)?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// A server-sent event that ends an OpenAI stream whose replica failed after the status was
/// sent. The OpenAI SDKs raise an `APIError` when an event carries an `error` object.
pub fn stream_error_event(dialect: Dialect, err: &GatewayError) -> Bytes {
    let mut out = match dialect {
        Dialect::OpenAi => b"data: ".to_vec(),
        Dialect::Anthropic => b"event: error\ndata: ".to_vec(),
    };
    out.extend_from_slice(&error_body(dialect, err));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
