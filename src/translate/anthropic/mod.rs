//! The Anthropic Messages dialect over an OpenAI Chat Completions replica.
//!
//! ```text
//! client ── POST /v1/messages ──▶ MessagesRequest::parse ─▶ to_openai ──▶ replica
//! client ◀── message JSON ─────── message_from_openai ◀──────────────── chat.completion
//! client ◀── Anthropic SSE ────── StreamTranslator::on_data ◀── SseFramer ◀── chunks
//! client ◀── error JSON ───────── error_from_openai ◀──────────────── 4xx/5xx body
//! ```
//!
//! Everything here is pure: ids are chosen by the caller, nothing reads a clock or logs.
//!
//! - `request`, `content`: the typed request and its validation (400s name the field path).
//! - `upstream`: the Chat Completions body sent to the replica.
//! - `wire`: the OpenAI answer shapes read back (lenient), usage and stop reasons.
//! - `response`: a whole `chat.completion` to a `message`.
//! - `events`, `stream`: the Anthropic stream events and the per-stream state machine.
//! - `error`: upstream error bodies and HTTP statuses to Anthropic errors.

mod content;
mod error;
mod events;
mod fields;
mod request;
mod response;
mod stream;
mod upstream;
mod wire;

use std::fmt;

pub use error::{error_body, error_from_openai, error_type_for_status};
pub use request::{parse_count_tokens, MessagesRequest};
pub use response::{message_from_openai, UNPARSED_ARGUMENTS};
pub use stream::StreamTranslator;

/// How a model's engine is told whether to think: chosen per model in the config.
pub use crate::config::ThinkingStyle;

/// What the client's request decides about its answer: the caller builds it once per
/// request and both the whole-message and the stream translation read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerPlan {
    /// The `msg_…` id to report.
    pub id: String,
    /// The model name the client asked for.
    pub model: String,
    /// The request's `stop_sequences`, to recognise which one stopped the answer.
    pub stop_sequences: Vec<String>,
    /// Prompt tokens as estimated, reported when the replica sends no usage.
    pub input_estimate: u32,
    /// Whether `thinking` blocks are returned: only when the request enabled thinking, as
    /// on the Messages API. A model that reasons anyway (Qwen3 and DeepSeek-R1 do by
    /// default) has its reasoning left out of the answer; its tokens still count as output.
    pub thinking: bool,
}

impl AnswerPlan {
    /// A plan with no stop sequences, no estimate and no thinking shown.
    pub fn new(id: &str, model: &str) -> Self {
        AnswerPlan {
            id: id.to_string(),
            model: model.to_string(),
            stop_sequences: Vec::new(),
            input_estimate: 0,
            thinking: false,
        }
    }
}

/// The replica sent something that cannot be turned into an Anthropic answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslateError {
    pub message: String,
}

impl TranslateError {
    fn new(message: impl Into<String>) -> Self {
        TranslateError {
            message: message.into(),
        }
    }
}

impl fmt::Display for TranslateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TranslateError {}

/// Token usage as the replica reported it, in OpenAI terms: the subsets are inside the
/// totals (cached ⊂ input, reasoning ⊂ output), never to be added on top.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    /// Completion tokens, reasoning included.
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Anthropic's `input_tokens`: the prompt tokens that were not read from cache.
    pub fn uncached_input_tokens(&self) -> u64 {
        self.input_tokens.saturating_sub(self.cached_input_tokens)
    }
}

#[cfg(test)]
mod tests;
