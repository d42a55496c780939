//! End-to-end tests of the simulated replica over real sockets, with an ordinary HTTP client.

mod chat;
mod faults;
mod streaming;

use serde_json::{json, Value};

use super::{SimOptions, SimReplica};

async fn start(opts: SimOptions) -> SimReplica {
    SimReplica::start(opts).await.unwrap()
}

/// A client that ignores proxy settings of the environment.
fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn url(sim: &SimReplica, path: &str) -> String {
    format!("http://{}{}", sim.addr(), path)
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

async fn chat(sim: &SimReplica, body: Value) -> reqwest::Response {
    client()
        .post(url(sim, "/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A whole event stream: the JSON events in order, and whether `[DONE]` closed it.
struct Sse {
    events: Vec<Value>,
    done: bool,
}

async fn read_sse(resp: reqwest::Response) -> Sse {
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    parse_sse(&resp.text().await.unwrap())
}

fn parse_sse(text: &str) -> Sse {
    let mut sse = Sse {
        events: Vec::new(),
        done: false,
    };
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").unwrap();
        assert!(!sse.done, "event after [DONE]: {data}");
        if data == "[DONE]" {
            sse.done = true;
        } else {
            sse.events.push(serde_json::from_str(data).unwrap());
        }
    }
    sse
}

/// Concatenates one delta field over a stream.
fn joined(events: &[Value], field: &str) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"][field].as_str())
        .collect()
}
