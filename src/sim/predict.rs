//! A Truss-style deployed model: `POST /v1/models/model:predict` (Truss's default route) and
//! any method under `/echo/…`, for tests of the deployed-model surface and the demo.
//!
//! Request headers choose the behaviour, so one replica serves every test in parallel:
//!
//! | header | effect |
//! |---|---|
//! | (none) | echo the body and its content type; `x-echo-*` fields report what arrived |
//! | `x-sim-delay-ms: N` | wait N ms before answering |
//! | `x-sim-stream: N` | a streaming generator: N chunks `chunk {i}\n`, `x-sim-interval-ms` apart |
//! | `x-sim-large: N` | an answer of N bytes, sent in 64 KiB pieces |
//! | `x-sim-count: 1` | read the body as it comes and answer `{"bytes": n}` |
//! | `x-sim-status: S` | answer with status S |
//!
//! `/echo/{route}` answers `{"method", "path", "query"}` with the status of `?status=`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde_json::json;

use super::service::{full, Reset, SimBody};
use super::stream::ChannelBody;

fn number(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

pub(crate) async fn predict(req: Request<Incoming>) -> Result<Response<SimBody>, Reset> {
    if let Some(ms) = number(&req, "x-sim-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = number(&req, "x-sim-status")
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::OK);
    let report = |name: &str| -> HeaderValue {
        req.headers()
            .get(name)
            .cloned()
            .unwrap_or(HeaderValue::from_static("-"))
    };
    let seen = [
        ("x-echo-authorization", report("authorization")),
        ("x-echo-api-key", report("x-api-key")),
        ("x-echo-forwarded-for", report("x-forwarded-for")),
        ("x-echo-forwarded-proto", report("x-forwarded-proto")),
        ("x-echo-custom", report("x-custom")),
        ("x-echo-framing", report("transfer-encoding")),
        ("x-echo-host", report("host")),
    ];
    let content_type = req.headers().get(CONTENT_TYPE).cloned();
    let (stream, large) = (number(&req, "x-sim-stream"), number(&req, "x-sim-large"));
    let count = number(&req, "x-sim-count").is_some();
    let interval = Duration::from_millis(number(&req, "x-sim-interval-ms").unwrap_or(0));
    let mut body = req.into_body();
    if stream.is_some() || large.is_some() {
        // Read first, so the connection can carry the next request.
        while let Some(frame) = body.frame().await {
            frame.map_err(|_| Reset)?;
        }
    }
    let mut resp = if let Some(n) = stream {
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, super::service::BodyError>>(1);
        tokio::spawn(async move {
            for i in 0..n {
                // No interval: chunks as fast as the connection takes them (a timer tick
                // per chunk would pace the stream at the timer's resolution).
                if i > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                let frame = Frame::data(Bytes::from(format!("chunk {i}\n")));
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Response::new(ChannelBody { rx }.boxed());
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    } else if let Some(n) = large {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let piece = Bytes::from(vec![b'x'; 64 * 1024]);
            let mut left = n as usize;
            while left > 0 {
                let take = left.min(piece.len());
                if tx.send(Ok(Frame::data(piece.slice(..take)))).await.is_err() {
                    return;
                }
                left -= take;
            }
        });
        let mut r = Response::new(ChannelBody { rx }.boxed());
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        r
    } else if count {
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| Reset)?;
            bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        json_of(&json!({ "bytes": bytes }))
    } else {
        let body = body.collect().await.map_err(|_| Reset)?.to_bytes();
        let mut r = Response::new(full(body));
        if let Some(t) = content_type {
            r.headers_mut().insert(CONTENT_TYPE, t);
        }
        r
    };
    *resp.status_mut() = status;
    for (name, value) in seen {
        resp.headers_mut().insert(name, value);
    }
    Ok(resp)
}

/// `/echo/{route}`: what arrived, with the status `?status=` asks for.
pub(crate) async fn echo(req: Request<Incoming>) -> Result<Response<SimBody>, Reset> {
    let query = req.uri().query().unwrap_or("").to_string();
    let status = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "status")
        .and_then(|(_, v)| v.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let value = json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": query,
        "host": req.headers().get("host").and_then(|v| v.to_str().ok()),
    });
    let mut resp = json_of(&value);
    *resp.status_mut() = status;
    Ok(resp)
}

fn json_of(value: &serde_json::Value) -> Response<SimBody> {
    let mut r = Response::new(full(Bytes::from(value.to_string())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
