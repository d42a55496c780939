//! HTTP/1 spoken by hand over TCP, for what an HTTP client library hides: the request line's
//! version, missing or extra header fields, the response's framing, pauses mid-request.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a raw exchange may take before the test fails: far beyond any answer here.
pub const RAW_LIMIT: Duration = Duration::from_secs(30);

/// A response as it came off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header fields, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// Everything after the head, as sent (chunk framing included, if any).
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// Parses one response from the start of `bytes`; the body is the rest.
    pub fn parse(bytes: &[u8]) -> RawResponse {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(bytes)));
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        RawResponse {
            status,
            headers,
            body: bytes[end + 4..].to_vec(),
        }
    }
}

/// Sends `request` on a new connection and reads until tollgate closes it.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.expect("tollgate accepts");
    s.write_all(request).await.expect("request written");
    RawResponse::parse(&read_to_close(&mut s).await)
}

/// Everything the peer sends until it closes the connection.
pub async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(RAW_LIMIT, s.read_to_end(&mut out))
        .await
        .expect("the connection is closed in time")
        .expect("read until close");
    out
}

/// A POST of `body` (JSON) to `path` with `KEY`, in HTTP/`version`, with a Host field.
pub fn post(version: &str, path: &str, body: &serde_json::Value) -> Vec<u8> {
    post_with(version, path, "", body)
}

/// `post` with `extra` header lines (each ending in CRLF).
pub fn post_with(version: &str, path: &str, extra: &str, body: &serde_json::Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/{version}\r\nHost: tollgate\r\n{extra}Authorization: Bearer {}\r\nx-api-key: {}\r\nanthropic-version: 2023-06-01\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        crate::common::KEY,
        crate::common::KEY,
        body.len()
    )
    .into_bytes()
}
