//! One upstream exchange over a kept-alive loopback connection, by tollgate's own HTTP/1.1
//! client (`forward::h1::Conn`) and by Pingora's (`protocols::http::v1::client::HttpSession`),
//! against the same replica in the same run: a JSON chat completion with Content-Length, and
//! a chunked SSE stream. Re-run on every Pingora upgrade: it is what keeps the choice of the
//! hand-written client honest.
//!
//!     cargo bench --bench exchange
//!
//! Besides criterion's time per exchange, it prints the CPU time the client thread spent per
//! exchange (from /proc/thread-self/schedstat, Linux only) and the Pingora/own ratios.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::Criterion;
use pingora::http::RequestHeader;
use pingora::protocols::http::v1::client::HttpSession;
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate::forward::h1::Conn;

/// The request both clients send (the body of a short chat completion request).
const BODY: &[u8] =
    br#"{"model":"bench","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}"#;

/// A vLLM-like JSON chat completion, 674 bytes.
fn json_body() -> Vec<u8> {
    let content = "The quick brown fox jumps over the lazy dog. ".repeat(6);
    format!(
        concat!(
            r#"{{"id":"chatcmpl-7f3b2a9c1d8e4f60a5b3c2d1e0f9a8b7","object":"chat.completion","#,
            r#""created":1764720000,"model":"bench","choices":[{{"index":0,"message":{{"#,
            r#""role":"assistant","content":"{}","reasoning_content":null,"tool_calls":[]}},"#,
            r#""logprobs":null,"finish_reason":"length","stop_reason":null}}],"usage":{{"#,
            r#""prompt_tokens":12,"total_tokens":28,"completion_tokens":16,"#,
            r#""prompt_tokens_details":null}},"prompt_logprobs":null}}"#
        ),
        content.trim_end()
    )
    .into_bytes()
}

/// The whole canned response for `path`: `/json` or `/sse` (50 events, one chunk each).
fn response(path: &str) -> Vec<u8> {
    const HEAD: &str =
        "HTTP/1.1 200 OK\r\ndate: Thu, 03 Dec 2026 12:00:00 GMT\r\nserver: uvicorn\r\n";
    if path == "/json" {
        let body = json_body();
        let mut r = format!(
            "{HEAD}content-length: {}\r\ncontent-type: application/json\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(&body);
        return r;
    }
    let mut r = format!(
        "{HEAD}content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    let mut chunk = |event: String| {
        r.extend_from_slice(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes());
    };
    for i in 0..49 {
        chunk(format!(
            concat!(
                "data: {{\"id\":\"chatcmpl-7f3b2a9c1d8e4f60a5b3c2d1e0f9a8b7\",",
                "\"object\":\"chat.completion.chunk\",\"created\":1764720000,\"model\":\"bench\",",
                "\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token{}\"}},",
                "\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
            ),
            i
        ));
    }
    chunk("data: [DONE]\n\n".to_string());
    r.extend_from_slice(b"0\r\n\r\n");
    r
}

/// The replica: answers every request on a connection, kept alive, with the canned response
/// for its path, written at once.
async fn replica() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let json = response("/json");
    let sse = response("/sse");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            conn.set_nodelay(true).unwrap();
            let (json, sse) = (json.clone(), sse.clone());
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                loop {
                    // One request: its head, then Content-Length bytes of body.
                    let (head, length, path) = loop {
                        let mut fields = [httparse::EMPTY_HEADER; 16];
                        let mut req = httparse::Request::new(&mut fields);
                        if let httparse::Status::Complete(n) = req.parse(&buf).unwrap() {
                            let length = req
                                .headers
                                .iter()
                                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                .map_or(0, |h| {
                                    std::str::from_utf8(h.value).unwrap().parse().unwrap()
                                });
                            break (n, length, req.path.unwrap() == "/json");
                        }
                        if conn.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    };
                    while buf.len() < head + length {
                        if conn.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                    buf.drain(..head + length);
                    let answer = if path { &json } else { &sse };
                    if conn.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A connection as both clients get one: a TCP stream as a Pingora stream.
async fn connect(addr: SocketAddr) -> Stream {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    Box::new(pingora::protocols::l4::stream::Stream::from(tcp))
}

/// tollgate's exchange, as `forward` drives it: one write, head, body pieces, then the
/// stream back to the pool. Returns the body size.
async fn own(stream: &mut Option<Stream>, path: &str) -> usize {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"POST ");
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: replica\r\ncontent-type: application/json\r\n");
    head.extend_from_slice(format!("content-length: {}\r\n", BODY.len()).as_bytes());
    head.extend_from_slice(b"accept: */*\r\nx-request-id: bench\r\n\r\n");
    let mut conn = Conn::new(stream.take().unwrap());
    conn.send(&head, BODY).await.unwrap();
    let got = conn.read_head().await.unwrap();
    assert_eq!(got.status, 200);
    let mut n = 0;
    while let Some(piece) = conn.read_body().await.unwrap() {
        n += piece.len();
    }
    assert!(conn.reusable());
    *stream = Some(conn.into_stream());
    n
}

/// Pingora's exchange with its HTTP/1 client session: header, body, response header, body
/// until done, then the stream back for reuse.
async fn pingora(stream: &mut Option<Stream>, path: &str) -> usize {
    let mut req = RequestHeader::build_no_case("POST", path.as_bytes(), Some(8)).unwrap();
    req.insert_header("host", "replica").unwrap();
    req.insert_header("content-type", "application/json")
        .unwrap();
    req.insert_header("content-length", BODY.len()).unwrap();
    req.insert_header("accept", "*/*").unwrap();
    req.insert_header("x-request-id", "bench").unwrap();
    let mut session = HttpSession::new(stream.take().unwrap());
    session.write_request_header(Box::new(req)).await.unwrap();
    session.write_body(BODY).await.unwrap();
    session.finish_body().await.unwrap();
    session.read_response().await.unwrap();
    assert_eq!(session.get_status().unwrap(), 200);
    let mut n = 0;
    while let Some(piece) = session.read_body_ref().await.unwrap() {
        n += piece.len();
    }
    session.respect_keepalive();
    *stream = Some(session.reuse().await.expect("kept alive"));
    n
}

/// CPU time this thread has run, from the scheduler's own count; `None` off Linux.
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Totals over every iteration criterion ran (warm-up included) of one benchmark.
#[derive(Default, Clone, Copy)]
struct Totals {
    iters: u64,
    wall: Duration,
    cpu: Option<Duration>,
}

impl Totals {
    fn per(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1e6 / self.iters.max(1) as f64
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The replica runs on a thread of its own, as a replica process would.
    let replica_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        replica_rt.block_on(async {
            tx.send(replica().await).unwrap();
            std::future::pending::<()>().await
        })
    });
    let addr = rx.recv().unwrap();

    let mut c = Criterion::default()
        .sample_size(40)
        .measurement_time(Duration::from_secs(6))
        .warm_up_time(Duration::from_secs(2))
        .configure_from_args();
    let mut group = c.benchmark_group("exchange");
    let mut totals = Vec::new();
    for path in ["/json", "/sse"] {
        let size = response(path).len();
        for client in ["own", "pingora"] {
            let mut stream = Some(rt.block_on(connect(addr)));
            let mut t = Totals::default();
            let name = format!("{}_{client}", &path[1..]);
            group.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let cpu = thread_cpu();
                        let start = Instant::now();
                        for _ in 0..iters {
                            let n = if client == "own" {
                                own(&mut stream, path).await
                            } else {
                                pingora(&mut stream, path).await
                            };
                            assert!(n > 0 && n < size);
                        }
                        let wall = start.elapsed();
                        t.iters += iters;
                        t.wall += wall;
                        t.cpu = match (t.cpu, cpu, thread_cpu()) {
                            (sum, Some(a), Some(b)) => Some(sum.unwrap_or_default() + (b - a)),
                            _ => None,
                        };
                        wall
                    })
                })
            });
            totals.push((name, t));
        }
    }
    group.finish();
    c.final_summary();

    println!("\nper exchange, mean over every iteration run (warm-up included):");
    for (name, t) in &totals {
        let cpu = t
            .cpu
            .map_or("n/a".into(), |c| format!("{:.2} us", t.per(c)));
        println!(
            "  {name:<14} {:>8.2} us wall, client thread CPU {cpu} ({} exchanges)",
            t.per(t.wall),
            t.iters
        );
    }
    for pair in totals.chunks(2) {
        let [(name, own), (_, theirs)] = pair else {
            continue;
        };
        let kind = name.split('_').next().unwrap();
        let cpu = match (own.cpu, theirs.cpu) {
            (Some(a), Some(b)) => format!("{:.2}x", theirs.per(b) / own.per(a)),
            _ => "n/a".into(),
        };
        println!(
            "  {kind}: pingora/own {:.2}x wall, {cpu} client CPU",
            theirs.per(theirs.wall) / own.per(own.wall)
        );
    }
}
