//! A whole `chat.completion` to an Anthropic `message`.
//!
//! Blocks come in the order thinking, text, tool calls; empty ones are left out. Tool call
//! arguments that are not a JSON object (malformed output, cut short by `max_tokens`) are
//! kept as `{"_unparsed_arguments": "<raw>"}` rather than replaced by `{}`, so the client
//! and the model can see what went wrong; empty arguments are `{}`. A missing `usage`
//! reports zeros: the caller accounts with its estimate then.

use serde::Serialize;
use serde_json::{Map, Value};

use super::events::AnthropicUsage;
use super::wire::{self, Completion, ToolCall};
use super::TranslateError;

/// The key holding tool call arguments that did not parse as a JSON object.
pub const UNPARSED_ARGUMENTS: &str = "_unparsed_arguments";

#[derive(Serialize)]
struct Message<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<Block>,
    stop_reason: &'static str,
    stop_sequence: Option<String>,
    usage: AnthropicUsage,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Thinking {
        thinking: String,
        signature: &'static str,
    },
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

/// `body` is the replica's `chat.completion`; `id` (`msg_…`) and `model` (the name the
/// client asked for) are the caller's; `stop_sequences` are the request's, to recognise
/// which one stopped the answer.
pub fn message_from_openai(
    body: &[u8],
    id: &str,
    model: &str,
    stop_sequences: &[String],
) -> Result<Vec<u8>, TranslateError> {
    let completion: Completion = serde_json::from_slice(body).map_err(|e| {
        TranslateError::new(format!(
            "the replica's answer is not a chat completion ({e})"
        ))
    })?;
    let choice = completion
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| TranslateError::new("the replica's answer has no choices"))?;
    let message = choice
        .message
        .ok_or_else(|| TranslateError::new("the replica's answer has no message"))?;
    let mut content = Vec::new();
    let reasoning = message.reasoning_content.or(message.reasoning);
    if let Some(thinking) = reasoning.filter(|t| !t.is_empty()) {
        content.push(Block::Thinking {
            thinking,
            signature: "",
        });
    }
    let text = message.content.map(content_text).unwrap_or_default();
    if !text.is_empty() {
        content.push(Block::Text { text });
    }
    let calls = message.tool_calls.unwrap_or_default();
    let called_tool = !calls.is_empty();
    for (i, call) in calls.into_iter().enumerate() {
        content.push(tool_use(call, id, i));
    }
    let matched = wire::matched_stop(choice.stop_reason.as_ref(), choice.matched_stop.as_ref());
    let (stop_reason, stop_sequence) = wire::stop_reason(
        choice.finish_reason.as_deref(),
        matched,
        stop_sequences,
        called_tool,
    );
    let usage = completion
        .usage
        .as_ref()
        .and_then(wire::usage)
        .map(AnthropicUsage::from)
        .unwrap_or_default();
    let message = Message {
        id,
        kind: "message",
        role: "assistant",
        model,
        content,
        stop_reason,
        stop_sequence,
        usage,
    };
    serde_json::to_vec(&message)
        .map_err(|e| TranslateError::new(format!("could not write the message ({e})")))
}

/// `content` as a string, or the text of its parts.
fn content_text(content: Value) -> String {
    match content {
        Value::String(s) => s,
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

fn tool_use(call: ToolCall, message_id: &str, nth: usize) -> Block {
    let function = call.function;
    let (name, arguments) = match function {
        Some(f) => (f.name.unwrap_or_default(), f.arguments),
        None => (String::new(), None),
    };
    let id = call
        .id
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| format!("toolu_{}_{nth}", message_id.trim_start_matches("msg_")));
    Block::ToolUse {
        id,
        name,
        input: tool_input(arguments),
    }
}

/// Arguments as an object: parsed, `{}` when empty, or the raw text under a marker key.
pub(super) fn tool_input(arguments: Option<Value>) -> Value {
    match arguments {
        Some(Value::Object(map)) => Value::Object(map),
        Some(Value::String(raw)) if raw.trim().is_empty() => Value::Object(Map::new()),
        Some(Value::String(raw)) => match serde_json::from_str::<Value>(&raw) {
            Ok(Value::Object(map)) => Value::Object(map),
            _ => {
                let mut map = Map::new();
                map.insert(UNPARSED_ARGUMENTS.into(), Value::String(raw));
                Value::Object(map)
            }
        },
        Some(Value::Null) | None => Value::Object(Map::new()),
        Some(other) => {
            let mut map = Map::new();
            map.insert(UNPARSED_ARGUMENTS.into(), Value::String(other.to_string()));
            Value::Object(map)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn translate(body: Value) -> Value {
        let out = message_from_openai(body.to_string().as_bytes(), "msg_1", "m", &[]).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn arguments_become_an_object_whatever_arrives() {
        assert_eq!(tool_input(Some(json!("{\"a\":1}"))), json!({"a": 1}));
        assert_eq!(tool_input(Some(json!(" "))), json!({}));
        assert_eq!(tool_input(None), json!({}));
        assert_eq!(tool_input(Some(json!({"b": 2}))), json!({"b": 2}));
        assert_eq!(
            tool_input(Some(json!("{\"a\":"))),
            json!({UNPARSED_ARGUMENTS: "{\"a\":"})
        );
        assert_eq!(
            tool_input(Some(json!([1]))),
            json!({UNPARSED_ARGUMENTS: "[1]"})
        );
    }

    #[test]
    fn unusable_answers_are_errors() {
        for body in [
            &b"<html>"[..],
            b"[]",
            b"{\"choices\":[]}",
            b"{\"choices\":[{}]}",
        ] {
            assert!(message_from_openai(body, "msg_1", "m", &[]).is_err());
        }
    }

    #[test]
    fn text_parts_missing_ids_and_missing_usage() {
        let out = translate(json!({"choices": [{"message": {
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            "tool_calls": [{"function": {"name": "f", "arguments": ""}}]},
            "finish_reason": "tool_calls"}]}));
        assert_eq!(out["content"][0], json!({"type": "text", "text": "ab"}));
        assert_eq!(out["content"][1]["id"], "toolu_1_0");
        assert_eq!(out["content"][1]["input"], json!({}));
        assert_eq!(out["stop_reason"], "tool_use");
        assert_eq!(out["usage"]["input_tokens"], 0);
    }
}
