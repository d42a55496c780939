//! The Anthropic stream events, serialised straight into the output buffer.
//!
//! Each event's SSE name equals its `type`. Borrowed fields keep a text delta to one copy.

use serde::Serialize;

use crate::translate::sse;

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Event<'a> {
    MessageStart {
        message: MessageStart<'a>,
    },
    ContentBlockStart {
        index: usize,
        content_block: BlockStart<'a>,
    },
    ContentBlockDelta {
        index: usize,
        delta: BlockDelta<'a>,
    },
    ContentBlockStop {
        index: usize,
    },
    MessageDelta {
        delta: MessageDelta<'a>,
        usage: AnthropicUsage,
    },
    MessageStop,
    Error {
        error: ErrorBody<'a>,
    },
}

impl Event<'_> {
    fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
            Event::Error { .. } => "error",
        }
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        sse::write_json_event(out, self.name(), self);
    }
}

#[derive(Serialize)]
pub(super) struct MessageStart<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub role: &'static str,
    pub content: [(); 0],
    pub model: &'a str,
    pub stop_reason: Option<&'static str>,
    pub stop_sequence: Option<&'a str>,
    pub usage: AnthropicUsage,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum BlockStart<'a> {
    Text {
        text: &'static str,
    },
    Thinking {
        thinking: &'static str,
        signature: &'static str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Empty,
    },
}

/// Serialises as `{}`.
#[derive(Serialize)]
pub(super) struct Empty {}

/// Serialised with Anthropic's `…_delta` type names.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum BlockDelta<'a> {
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: &'a str },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: &'a str },
}

#[derive(Serialize)]
pub(super) struct MessageDelta<'a> {
    pub stop_reason: &'static str,
    pub stop_sequence: Option<&'a str>,
}

/// Anthropic's usage object. `input_tokens` excludes cache reads; every count is the total
/// so far, never an increment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(super) struct AnthropicUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl From<super::Usage> for AnthropicUsage {
    fn from(u: super::Usage) -> Self {
        AnthropicUsage {
            input_tokens: u.uncached_input_tokens(),
            output_tokens: u.output_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: u.cached_input_tokens,
        }
    }
}

#[derive(Serialize)]
pub(super) struct ErrorBody<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub message: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes() {
        let mut out = Vec::new();
        Event::ContentBlockStart {
            index: 2,
            content_block: BlockStart::ToolUse {
                id: "call_1",
                name: "f",
                input: Empty {},
            },
        }
        .write(&mut out);
        Event::MessageStop.write(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2,\
             \"content_block\":{\"type\":\"tool_use\",\"id\":\"call_1\",\"name\":\"f\",\"input\":{}}}\n\n\
             event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        );
    }
}
