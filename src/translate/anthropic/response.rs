//! A whole `chat.completion` to an Anthropic `message`.
//!
//! Blocks come in the order thinking, text, tool calls; empty ones are left out, and so is
//! whitespace-only text beside tool calls (engines' tool parsers leave the newlines between
//! calls behind). Thinking is returned only when the request enabled it. Tool call
//! arguments that are not a JSON object (malformed output, cut short by `max_tokens`) are
//! kept as `{"_unparsed_arguments": "<raw>"}` rather than replaced by `{}`, so the client
//! and the model can see what went wrong; empty arguments are `{}`. A missing `usage`
//! reports the estimates tollgate accounts with: the prompt estimate, and the generated
//! text at four bytes a token.

use serde::Serialize;
use serde_json::{Map, Value};

use super::events::AnthropicUsage;
use super::wire::{self, Completion, ToolCall};
use super::{AnswerPlan, TranslateError};
use crate::translate::usage::estimate_output;

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

/// `body` is the replica's `chat.completion`; `plan` is what the request decided.
pub fn message_from_openai(body: &[u8], plan: &AnswerPlan) -> Result<Vec<u8>, TranslateError> {
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
    if let Some(thinking) = reasoning.filter(|t| plan.thinking && !t.is_empty()) {
        content.push(Block::Thinking {
            thinking,
            signature: "",
        });
    }
    let calls = message.tool_calls.unwrap_or_default();
    let called_tool = !calls.is_empty();
    let text = message.content.map(content_text).unwrap_or_default();
    let blank = if called_tool {
        text.trim().is_empty()
    } else {
        text.is_empty()
    };
    if !blank {
        content.push(Block::Text { text });
    }
    for (i, call) in calls.into_iter().enumerate() {
        content.push(tool_use(call, &plan.id, i));
    }
    let matched = wire::matched_stop(choice.stop_reason.as_ref(), choice.matched_stop.as_ref());
    let (stop_reason, stop_sequence) = wire::stop_reason(
        choice.finish_reason.as_deref(),
        matched,
        &plan.stop_sequences,
        called_tool,
    );
    let usage = match completion.usage.as_ref().and_then(wire::usage) {
        Some(u) => AnthropicUsage::from(u),
        None => AnthropicUsage {
            input_tokens: u64::from(plan.input_estimate),
            output_tokens: estimate_output(body),
            ..AnthropicUsage::default()
        },
    };
    let message = Message {
        id: &plan.id,
        kind: "message",
        role: "assistant",
        model: &plan.model,
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

    fn translate_with(body: Value, plan: &AnswerPlan) -> Value {
        let out = message_from_openai(body.to_string().as_bytes(), plan).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn translate(body: Value) -> Value {
        translate_with(body, &AnswerPlan::new("msg_1", "m"))
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
            assert!(message_from_openai(body, &AnswerPlan::new("msg_1", "m")).is_err());
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
        // No usage from the replica: the estimates tollgate accounts with (2 bytes → 1).
        assert_eq!(out["usage"]["input_tokens"], 0);
        assert_eq!(out["usage"]["output_tokens"], 1);
        let plan = AnswerPlan {
            input_estimate: 42,
            ..AnswerPlan::new("msg_1", "m")
        };
        let out = translate_with(
            json!({"choices": [{"message": {"content": "twelve bytes"}}]}),
            &plan,
        );
        assert_eq!(out["usage"]["input_tokens"], 42);
        assert_eq!(out["usage"]["output_tokens"], 3);
    }

    #[test]
    fn thinking_is_returned_only_when_the_request_enabled_it() {
        let body = json!({"choices": [{"message": {
            "reasoning_content": "Let me see.", "content": "4"}, "finish_reason": "stop"}]});
        let hidden = translate(body.clone());
        assert_eq!(hidden["content"], json!([{"type": "text", "text": "4"}]));
        let plan = AnswerPlan {
            thinking: true,
            ..AnswerPlan::new("msg_1", "m")
        };
        let shown = translate_with(body, &plan);
        assert_eq!(
            shown["content"][0],
            json!({"type": "thinking", "thinking": "Let me see.", "signature": ""})
        );
        assert_eq!(shown["content"][1]["text"], "4");
    }

    #[test]
    fn whitespace_beside_tool_calls_is_no_text_block() {
        let out = translate(json!({"choices": [{"message": {
            "content": "\n\n",
            "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]},
            "finish_reason": "tool_calls"}]}));
        assert_eq!(out["content"].as_array().unwrap().len(), 1);
        assert_eq!(out["content"][0]["type"], "tool_use");
        // Without tool calls, whitespace is the answer and is kept.
        let out = translate(json!({"choices": [{"message": {"content": " "}}]}));
        assert_eq!(out["content"], json!([{"type": "text", "text": " "}]));
    }
}
