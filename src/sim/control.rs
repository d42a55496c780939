//! Faults switched at run time, for a whole replica rather than one request: `/health`
//! failing, and reset mode, in which every model-API request loses its connection before any
//! byte of an answer, as when the server behind a port crashes and restarts.
//!
//! `POST /sim/health` with `{"healthy": false}` and `POST /sim/reset` with `{"on": true}` flip
//! them; `POST /sim/predict` with `{"status": 503, "delay_ms": 200}` makes every predict wait
//! that long and answer that status (`{"status": null, "delay_ms": 0}` turns it off; it
//! answers, and `GET /sim/predict` reads, that switch alone); both answer the replica's switches as JSON. The control paths, `/health` and
//! `/metrics` keep answering in reset mode, so a test can always switch it back off.
//!
//! A reset is decided per request, from its head, before anything is written. The
//! connection's socket is then closed with `SO_LINGER` 0, so the client reads a TCP reset
//! (not an orderly end of stream, and never part of an answer).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The replica-wide switches.
#[derive(Debug)]
pub(crate) struct Switches {
    healthy: AtomicBool,
    reset: AtomicBool,
    /// Every predict answers this status (0: its own).
    predict_status: AtomicU16,
    /// Every predict waits this long first.
    predict_delay_ms: AtomicU64,
}

impl Default for Switches {
    fn default() -> Self {
        Switches {
            healthy: AtomicBool::new(true),
            reset: AtomicBool::new(false),
            predict_status: AtomicU16::new(0),
            predict_delay_ms: AtomicU64::new(0),
        }
    }
}

impl Switches {
    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn resetting(&self) -> bool {
        self.reset.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, on: bool) {
        self.healthy.store(on, Ordering::Relaxed);
    }

    pub(crate) fn set_resetting(&self, on: bool) {
        self.reset.store(on, Ordering::Relaxed);
    }

    /// The status every predict answers, and how long it waits first.
    pub(crate) fn predict_fault(&self) -> (Option<u16>, u64) {
        let status = self.predict_status.load(Ordering::Relaxed);
        (
            (status != 0).then_some(status),
            self.predict_delay_ms.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn set_predict_fault(&self, status: Option<u16>, delay_ms: u64) {
        self.predict_status
            .store(status.unwrap_or(0), Ordering::Relaxed);
        self.predict_delay_ms.store(delay_ms, Ordering::Relaxed);
    }

    fn state(&self) -> Value {
        json!({"healthy": self.healthy(), "reset": self.resetting()})
    }

    fn predict_state(&self) -> Value {
        let (status, delay_ms) = self.predict_fault();
        json!({"status": status, "delay_ms": delay_ms})
    }
}

/// A request to a control path, answered with the status and JSON body to send.
pub(crate) fn answer(
    switches: &Switches,
    method: &Method,
    path: &str,
    body: &[u8],
) -> (StatusCode, Value) {
    if path == "/sim/predict" && method == Method::POST {
        let v: Option<Value> = serde_json::from_slice(body).ok();
        let status = v
            .as_ref()
            .and_then(|v| v.get("status"))
            .and_then(Value::as_u64);
        let delay = v
            .as_ref()
            .and_then(|v| v.get("delay_ms"))
            .and_then(Value::as_u64);
        return match (status.map(u16::try_from), v.is_some()) {
            (Some(Err(_)), _) | (_, false) => (
                StatusCode::BAD_REQUEST,
                json!({"error": "send {\"status\": 503 or null, \"delay_ms\": 0}"}),
            ),
            (s, true) => {
                switches.set_predict_fault(s.and_then(Result::ok), delay.unwrap_or(0));
                (StatusCode::OK, switches.predict_state())
            }
        };
    }
    if path == "/sim/predict" && method == Method::GET {
        return (StatusCode::OK, switches.predict_state());
    }
    let (field, set): (&str, fn(&Switches, bool)) = match path {
        "/sim/health" => ("healthy", Switches::set_healthy),
        "/sim/reset" => ("on", Switches::set_resetting),
        _ => {
            return (
                StatusCode::NOT_FOUND,
                json!({"error": "unknown control path"}),
            )
        }
    };
    if method == Method::GET {
        return (StatusCode::OK, switches.state());
    }
    if method != Method::POST {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "use GET to read the switches, POST to set one"}),
        );
    }
    match serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get(field).and_then(Value::as_bool))
    {
        Some(on) => {
            set(switches, on);
            (StatusCode::OK, switches.state())
        }
        None => (
            StatusCode::BAD_REQUEST,
            json!({"error": format!("send a JSON object with a boolean `{field}`")}),
        ),
    }
}

/// Set by the request handler when the connection must end in a reset.
#[derive(Debug, Default)]
pub(crate) struct Doom(AtomicBool);

impl Doom {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A connection's socket that, once doomed, writes nothing more and closes with a reset.
pub(crate) struct Connection {
    stream: TcpStream,
    doom: Arc<Doom>,
}

impl Connection {
    pub(crate) fn new(stream: TcpStream, doom: Arc<Doom>) -> Connection {
        Connection { stream, doom }
    }

    fn doomed(&self) -> io::Result<()> {
        // SO_LINGER 0 makes the close that follows send RST instead of FIN. Setting it on a
        // socket about to be closed is what tokio's warning is about: it cannot block here.
        let _ = self.stream.set_zero_linger();
        Err(io::Error::from(io::ErrorKind::ConnectionReset))
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.doom.is_set() {
            return Poll::Ready(self.doomed().map(|()| 0));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.doom.is_set() {
            return Poll::Ready(self.doomed().map(|()| 0));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.doom.is_set() {
            return Poll::Ready(self.doomed());
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.doom.is_set() {
            return Poll::Ready(self.doomed());
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.doom.is_set() {
            let _ = self.stream.set_zero_linger();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_paths_set_and_read_the_switches() {
        let s = Switches::default();
        let post = |path: &str, body: &str| answer(&s, &Method::POST, path, body.as_bytes());
        assert_eq!(post("/sim/health", r#"{"healthy": false}"#).0, 200);
        assert!(!s.healthy() && !s.resetting());
        let resp = post("/sim/reset", r#"{"on": true}"#);
        assert_eq!(resp.1, json!({"healthy": false, "reset": true}));
        assert!(s.resetting());
        assert_eq!(post("/sim/reset", r#"{"on": "yes"}"#).0, 400);
        assert_eq!(post("/sim/reset", "not json").0, 400);
        assert_eq!(post("/sim/other", "{}").0, 404);
        let get = answer(&s, &Method::GET, "/sim/health", b"");
        assert_eq!(get.1, json!({"healthy": false, "reset": true}));
        assert_eq!(answer(&s, &Method::PUT, "/sim/health", b"").0, 405);
        let resp = post("/sim/predict", r#"{"status": 503, "delay_ms": 20}"#);
        assert_eq!(resp.1, json!({"status": 503, "delay_ms": 20}));
        assert_eq!(s.predict_fault(), (Some(503), 20));
        assert_eq!(post("/sim/predict", r#"{"status": 70000}"#).0, 400);
        assert_eq!(post("/sim/predict", r#"{"status": null}"#).0, 200);
        assert_eq!(s.predict_fault(), (None, 0));
    }
}
