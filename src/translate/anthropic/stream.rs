//! The per-stream state machine: OpenAI chunks in, Anthropic events out.
//!
//! ```text
//! first chunk ─▶ message_start            (exactly once)
//! reasoning   ─▶ [close] thinking block ─▶ thinking_delta …
//! content     ─▶ [close] text block     ─▶ text_delta …
//! tool call i ─▶ [close] tool_use block ─▶ input_json_delta per argument piece, unbuffered
//! [DONE]/EOF  ─▶ [close] message_delta (stop_reason, usage) ─▶ message_stop
//! failure     ─▶ error                    (and nothing after)
//! ```
//!
//! Only one block is open at a time; switching kind (or to a new tool call index) closes it
//! and opens the next, so indexes run 0, 1, 2… in order. Empty strings open nothing: the
//! role chunk's `"content": ""` makes no text block. Whitespace-only text while a tool call
//! is open is held back (tool parsers leak the newlines between calls) and opens a text
//! block only if real text follows, so it cannot cut a call in two. Argument pieces that
//! arrive for a tool call after another block has opened cannot be placed in a closed block
//! and are dropped (no engine interleaves calls). A call with no `id` gets
//! `toolu_<message id>_<n>` (the n-th call, from 0); one with no name gets `""`, since its
//! arguments must not wait. Reasoning is relayed as thinking blocks only when the request
//! enabled thinking; otherwise it is left out, and still counted as output.
//!
//! Payloads that are not JSON chunks are ignored and counted (`ignored_chunks`); an error
//! object in place of a chunk (vLLM writes `{"error": …}` into a failing stream) ends the
//! stream with an Anthropic `error` event.

use super::events::{
    AnthropicUsage, BlockDelta, BlockStart, Empty, ErrorBody, Event, MessageDelta, MessageStart,
};
use super::wire::{self, Chunk, Delta, ToolCallDelta};
use super::{error_type_for_status, AnswerPlan, Usage};

/// Translates one streamed answer.
#[derive(Debug)]
pub struct StreamTranslator {
    plan: AnswerPlan,
    started: bool,
    done: bool,
    next_index: usize,
    open: Option<Open>,
    /// Upstream tool call indexes that have had a block.
    tools_seen: Vec<u64>,
    called_tool: bool,
    /// Whitespace-only text that arrived while a tool call was open.
    held_text: String,
    finish_reason: Option<String>,
    matched_stop: Option<String>,
    usage: Option<Usage>,
    /// Chunks that carried text, reasoning or arguments: about one token each on vLLM and
    /// SGLang, the output count reported when the replica sent no usage.
    content_chunks: u64,
    ignored: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Thinking,
    Text,
    /// The upstream `tool_calls[].index`.
    Tool(u64),
}

impl StreamTranslator {
    /// The plan's input estimate goes into `message_start` unless the first chunk carries
    /// real usage.
    pub fn new(plan: AnswerPlan) -> Self {
        StreamTranslator {
            plan,
            started: false,
            done: false,
            next_index: 0,
            open: None,
            tools_seen: Vec::new(),
            called_tool: false,
            held_text: String::new(),
            finish_reason: None,
            matched_stop: None,
            usage: None,
            content_chunks: 0,
            ignored: 0,
        }
    }

    /// One upstream `data:` payload: a chunk, or `[DONE]` (which finishes the message).
    pub fn on_data(&mut self, data: &str, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        let data = data.trim();
        if data == "[DONE]" {
            self.finish(out);
            return;
        }
        let Ok(chunk) = serde_json::from_str::<Chunk<'_>>(data) else {
            self.ignored = self.ignored.saturating_add(1);
            return;
        };
        if let Some((kind, message)) = upstream_error(&chunk) {
            self.fail(kind, &message, out);
            return;
        }
        if let Some(usage) = chunk.usage.as_ref().and_then(wire::usage) {
            self.usage = Some(usage);
        }
        self.start(out);
        let choice = chunk.choices.iter().find(|c| c.index.unwrap_or(0) == 0);
        let Some(choice) = choice else { return };
        if let Some(delta) = &choice.delta {
            self.delta(delta, out);
        }
        if let Some(reason) = &choice.finish_reason {
            self.finish_reason = Some(reason.to_string());
        }
        if let Some(s) =
            wire::matched_stop(choice.stop_reason.as_ref(), choice.matched_stop.as_ref())
        {
            self.matched_stop = Some(s.to_string());
        }
    }

    /// The upstream ended normally: close the open block, then `message_delta` and
    /// `message_stop`. Idempotent; a no-op after `fail`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        self.start(out);
        self.close(out);
        let (stop_reason, stop_sequence) = wire::stop_reason(
            self.finish_reason.as_deref(),
            self.matched_stop.as_deref(),
            &self.plan.stop_sequences,
            self.called_tool,
        );
        let usage = match self.usage {
            Some(u) => AnthropicUsage::from(u),
            None => AnthropicUsage {
                input_tokens: u64::from(self.plan.input_estimate),
                output_tokens: self.content_chunks,
                ..AnthropicUsage::default()
            },
        };
        Event::MessageDelta {
            delta: MessageDelta {
                stop_reason,
                stop_sequence: stop_sequence.as_deref(),
            },
            usage,
        }
        .write(out);
        Event::MessageStop.write(out);
        self.done = true;
    }

    /// The replica's body ended. With a finish reason (or after `[DONE]`) the message is
    /// complete; without one the stream was cut short, and the client is told so with an
    /// `error` event rather than a `message_stop` that would pass the part for a whole.
    pub fn end_of_body(&mut self, out: &mut Vec<u8>) {
        match self.finish_reason {
            Some(_) => self.finish(out),
            None => self.fail(
                "api_error",
                "The model's answer ended before it was complete (the replica closed the stream without a finish reason). Retry the request.",
                out,
            ),
        }
    }

    /// The upstream failed mid-stream: one `error` event, nothing after. Idempotent; a
    /// no-op after `finish`.
    pub fn fail(&mut self, error_type: &str, message: &str, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        Event::Error {
            error: ErrorBody {
                kind: error_type,
                message,
            },
        }
        .write(out);
        self.done = true;
    }

    /// The last usage the replica reported (running counts are replaced, never added).
    /// `None` when it sent none: then account with the estimate.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Payloads that were neither JSON chunks nor `[DONE]`.
    pub fn ignored_chunks(&self) -> u32 {
        self.ignored
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let usage = match self.usage {
            Some(u) => AnthropicUsage {
                output_tokens: 1,
                ..AnthropicUsage::from(u)
            },
            None => AnthropicUsage {
                input_tokens: u64::from(self.plan.input_estimate),
                output_tokens: 1,
                ..AnthropicUsage::default()
            },
        };
        Event::MessageStart {
            message: MessageStart {
                id: &self.plan.id,
                kind: "message",
                role: "assistant",
                content: [],
                model: &self.plan.model,
                stop_reason: None,
                stop_sequence: None,
                usage,
            },
        }
        .write(out);
    }

    fn delta(&mut self, delta: &Delta<'_>, out: &mut Vec<u8>) {
        let mut carried = false;
        if let Some(thinking) = delta.reasoning_text().filter(|t| !t.is_empty()) {
            if self.plan.thinking {
                self.open_block(Open::Thinking, out);
                self.block_delta(BlockDelta::Thinking { thinking }, out);
            }
            carried = true;
        }
        if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
            self.text(text, out);
            carried = true;
        }
        for call in delta.tool_calls.iter().flatten() {
            carried |= self.tool_delta(call, out);
        }
        if carried {
            self.content_chunks += 1;
        }
    }

    /// A piece of text: held back while it is only whitespace inside a tool call.
    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        if matches!(self.open, Some(Open::Tool(_))) && text.trim().is_empty() {
            self.held_text.push_str(text);
            return;
        }
        self.open_block(Open::Text, out);
        if self.held_text.is_empty() {
            self.block_delta(BlockDelta::Text { text }, out);
        } else {
            let mut joined = std::mem::take(&mut self.held_text);
            joined.push_str(text);
            self.block_delta(BlockDelta::Text { text: &joined }, out);
        }
    }

    /// One entry of `tool_calls`; true when it carried something.
    fn tool_delta(&mut self, call: &ToolCallDelta<'_>, out: &mut Vec<u8>) -> bool {
        let current = match self.open {
            Some(Open::Tool(i)) => Some(i),
            _ => None,
        };
        let index = match (call.index, current) {
            (Some(i), _) => i,
            // No index: a piece of the open call, unless it brings an id of its own.
            (None, Some(i)) if call.id.is_none() => i,
            (None, _) => self
                .tools_seen
                .iter()
                .max()
                .map_or(0, |m| m.saturating_add(1)),
        };
        let function = call.function.as_ref();
        let arguments = function
            .and_then(|f| f.arguments.as_deref())
            .filter(|a| !a.is_empty());
        let opened = current != Some(index);
        if opened {
            if self.tools_seen.contains(&index) {
                return false;
            }
            let nth = self.tools_seen.len();
            self.tools_seen.push(index);
            self.close(out);
            let id = match call.id.as_deref().filter(|id| !id.is_empty()) {
                Some(id) => id.to_string(),
                None => format!("toolu_{}_{nth}", self.plan.id.trim_start_matches("msg_")),
            };
            let name = function.and_then(|f| f.name.as_deref()).unwrap_or("");
            self.open_new(
                Open::Tool(index),
                BlockStart::ToolUse {
                    id: &id,
                    name,
                    input: Empty {},
                },
                out,
            );
            self.called_tool = true;
        }
        if let Some(partial_json) = arguments {
            self.block_delta(BlockDelta::InputJson { partial_json }, out);
        }
        opened || arguments.is_some()
    }

    /// Makes `kind` the open block, closing another one first.
    fn open_block(&mut self, kind: Open, out: &mut Vec<u8>) {
        if self.open == Some(kind) {
            return;
        }
        self.close(out);
        let start = match kind {
            Open::Thinking => BlockStart::Thinking {
                thinking: "",
                signature: "",
            },
            _ => BlockStart::Text { text: "" },
        };
        self.open_new(kind, start, out);
    }

    fn open_new(&mut self, kind: Open, start: BlockStart<'_>, out: &mut Vec<u8>) {
        Event::ContentBlockStart {
            index: self.next_index,
            content_block: start,
        }
        .write(out);
        self.open = Some(kind);
    }

    fn block_delta(&self, delta: BlockDelta<'_>, out: &mut Vec<u8>) {
        Event::ContentBlockDelta {
            index: self.next_index,
            delta,
        }
        .write(out);
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if self.open.take().is_some() {
            Event::ContentBlockStop {
                index: self.next_index,
            }
            .write(out);
            self.next_index += 1;
        }
    }
}

/// An error object sent in place of a chunk: its Anthropic type and message.
fn upstream_error(chunk: &Chunk<'_>) -> Option<(&'static str, String)> {
    let error = match (&chunk.error, chunk.object.as_deref()) {
        (Some(e), _) if !e.is_null() => e,
        (_, Some("error")) => {
            let message = chunk.message.as_deref().unwrap_or("the replica failed");
            return Some((status_type(chunk.code.as_ref()), message.to_string()));
        }
        _ => return None,
    };
    let kind = status_type(error.get("code"));
    let message = match error {
        serde_json::Value::String(s) => s.clone(),
        _ => error
            .get("message")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("the replica failed")
            .to_string(),
    };
    Some((kind, message))
}

/// The Anthropic type for an HTTP status given as an error's `code`, else `api_error`.
fn status_type(code: Option<&serde_json::Value>) -> &'static str {
    code.and_then(serde_json::Value::as_u64)
        .and_then(|c| u16::try_from(c).ok())
        .map_or("api_error", error_type_for_status)
}
