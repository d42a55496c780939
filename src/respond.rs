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
    };
    Bytes::from(value.to_string())
}

/// Writes a complete JSON response with an exact Content-Length.
pub async fn send_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
) -> pingora::Result<()> {
    let mut header = ResponseHeader::build(status, Some(4))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    header.insert_header("x-request-id", request_id)?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// A server-sent event that ends a stream whose replica failed after the status was sent.
/// The OpenAI SDKs raise an `APIError` when an event carries an `error` object.
pub fn stream_error_event(dialect: Dialect, err: &GatewayError) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&error_body(dialect, err));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
