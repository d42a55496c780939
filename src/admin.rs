//! The admin listener (loopback by default): `/metrics` in Prometheus text format, `/healthz`.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;

pub struct Admin {
    metrics: Arc<Metrics>,
}

impl Admin {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Admin { metrics }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (status, content_type, body) = match (req.method.as_str(), req.uri.path()) {
            ("GET", "/metrics") => (200, "text/plain; version=0.0.4", self.metrics.render()),
            ("GET", "/healthz") => (200, "application/json", br#"{"status":"ok"}"#.to_vec()),
            _ => (
                404,
                "application/json",
                br#"{"error":"unknown admin URL; try GET /metrics or GET /healthz"}"#.to_vec(),
            ),
        };
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}
