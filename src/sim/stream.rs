//! Server-sent event answers: a channel-backed body and the task that generates into it one
//! chunk at a time, stopping as soon as the client goes away.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::generate::Generation;
use super::gpu::Slot;
use super::scenario::Scenario;
use super::service::{BodyError, Reset, SimBody};
use super::stats::SimStats;
use super::wire::{self, ChunkUsage, Envelope, PromptUsage};

/// Tool call arguments are streamed in pieces of about this many characters.
const ARGUMENT_PIECE_CHARS: usize = 8;

type Item = Result<Frame<Bytes>, BodyError>;

/// A streaming completion ready to run.
pub(crate) struct StreamJob {
    pub env: Envelope,
    pub generation: Generation,
    pub prompt: PromptUsage,
    pub include_usage: bool,
    pub scenario: Scenario,
    pub stats: Arc<SimStats>,
    /// The batch slot, freed when the stream ends or its client leaves.
    pub slot: Slot,
}

/// Starts generating and returns the response whose body carries the events.
pub(crate) fn respond(job: StreamJob) -> Response<SimBody> {
    // Capacity 1: the generator runs at most one event ahead of the socket, so a client
    // sees each event before the next is made and a departure is noticed at once.
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(job.run(tx));
    let mut resp = Response::new(ChannelBody { rx }.boxed());
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A body fed by the generator task; dropping it is how the task learns the client left.
pub(crate) struct ChannelBody {
    pub(crate) rx: mpsc::Receiver<Item>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.rx.poll_recv(cx)
    }
}

/// One token's chunk.
struct Event {
    delta: Value,
    tokens: u64,
    reasoning: bool,
}

/// How a stream ended.
enum Outcome {
    Finished,
    ClientGone,
    Reset,
}

/// The client dropped the body.
struct Gone;

/// Tokens sent so far.
#[derive(Default)]
struct Tally {
    completion: u64,
    reasoning: u64,
}

impl StreamJob {
    async fn run(self, tx: mpsc::Sender<Item>) {
        let mut tally = Tally::default();
        let outcome = self.produce(&tx, &mut tally).await;
        let StreamJob {
            stats,
            slot,
            prompt,
            ..
        } = self;
        drop(slot);
        // Counted before the last event goes out, so a client that has read the whole
        // stream already sees the totals.
        stats.add_usage(prompt.prompt, tally.completion);
        match outcome {
            Outcome::Finished => {
                stats.response_completed();
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(wire::DONE))))
                    .await;
            }
            Outcome::ClientGone => stats.stream_cancelled(),
            Outcome::Reset => {
                let _ = tx.send(Err(Box::new(Reset))).await;
            }
        }
    }

    /// Sends every event but `[DONE]`.
    async fn produce(&self, tx: &mpsc::Sender<Item>, tally: &mut Tally) -> Outcome {
        match self.send_all(tx, tally).await {
            Ok(outcome) => outcome,
            Err(Gone) => Outcome::ClientGone,
        }
    }

    async fn send_all(&self, tx: &mpsc::Sender<Item>, tally: &mut Tally) -> Result<Outcome, Gone> {
        let role = wire::delta_choice(json!({"role": "assistant", "content": ""}));
        send(tx, &wire::chunk(&self.env, role, &self.usage_field(tally))).await?;
        let events = events(&self.generation);
        let total = events.len();
        for (sent, event) in events.into_iter().enumerate() {
            if self.scenario.reset_after == Some(sent as u32) {
                return Ok(Outcome::Reset);
            }
            let delay = if sent == 0 {
                self.scenario.ttft
            } else {
                self.scenario.token_delay
            };
            pause(tx, delay).await?;
            tally.completion += event.tokens;
            if event.reasoning {
                tally.reasoning += event.tokens;
            }
            let choice = wire::delta_choice(event.delta);
            send(
                tx,
                &wire::chunk(&self.env, choice, &self.usage_field(tally)),
            )
            .await?;
        }
        // A stream asked to break always breaks, even when it had fewer chunks than asked.
        if self.scenario.reset_after.is_some() {
            return Ok(Outcome::Reset);
        }
        if total == 0 {
            pause(tx, self.scenario.ttft).await?;
        }
        tally.completion += self.generation.withheld_tokens;
        let finish = wire::finish_choice(&self.generation);
        send(
            tx,
            &wire::chunk(&self.env, finish, &self.usage_field(tally)),
        )
        .await?;
        if self.include_usage {
            let usage = wire::usage(self.prompt, tally.completion, tally.reasoning);
            send(tx, &wire::usage_chunk(&self.env, usage)).await?;
        }
        Ok(Outcome::Finished)
    }

    fn usage_field(&self, tally: &Tally) -> ChunkUsage {
        if self.scenario.usage_every_chunk {
            ChunkUsage::Running(wire::usage(self.prompt, tally.completion, tally.reasoning))
        } else if self.include_usage {
            ChunkUsage::Null
        } else {
            ChunkUsage::Absent
        }
    }
}

async fn send(tx: &mpsc::Sender<Item>, event: &Value) -> Result<(), Gone> {
    tx.send(Ok(Frame::data(wire::sse(event))))
        .await
        .map_err(|_| Gone)
}

/// Waits `delay`, cut short if the client leaves meanwhile: a real engine frees the slot at
/// once rather than at its next token.
async fn pause(tx: &mpsc::Sender<Item>, delay: Duration) -> Result<(), Gone> {
    if tx.is_closed() {
        return Err(Gone);
    }
    if delay.is_zero() {
        return Ok(());
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => Ok(()),
        _ = tx.closed() => Err(Gone),
    }
}

/// The token chunks of a generation in order: reasoning, answer, then tool calls (a header
/// chunk per call carrying its token cost, then its arguments in pieces).
fn events(generation: &Generation) -> Vec<Event> {
    let mut events = Vec::new();
    for token in &generation.reasoning {
        events.push(Event {
            delta: json!({"reasoning_content": token}),
            tokens: 1,
            reasoning: true,
        });
    }
    for token in &generation.content {
        events.push(Event {
            delta: json!({"content": token}),
            tokens: 1,
            reasoning: false,
        });
    }
    for (index, call) in generation.tool_calls.iter().enumerate() {
        events.push(Event {
            delta: json!({"tool_calls": [{
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }]}),
            tokens: call.tokens(),
            reasoning: false,
        });
        let chars: Vec<char> = call.arguments.chars().collect();
        for piece in chars.chunks(ARGUMENT_PIECE_CHARS) {
            let piece: String = piece.iter().collect();
            events.push(Event {
                delta: json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}),
                tokens: 0,
                reasoning: false,
            });
        }
    }
    events
}
