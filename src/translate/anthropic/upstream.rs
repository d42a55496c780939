//! The Chat Completions body a Messages request becomes.
//!
//! - `system` → one system message first; its text blocks joined with `\n`.
//! - A user message's `tool_result` blocks → one `tool` message each, in order, before the
//!   rest of that message. Array content is flattened to text joined with `\n`;
//!   `is_error: true` prefixes the text with `Error: `. OpenAI tool messages carry text
//!   only, so an image in a tool result is marked in that text and travels in the user
//!   message that follows the tool messages, first, after a line naming its tool call;
//!   for a model without the image modality it stays a marker only.
//! - The rest of a user message: one string when it is only text (blocks joined with `\n`,
//!   as engines render text parts anyway), content parts when it has images.
//! - An assistant message: text blocks joined with `\n` as `content` (`null` when it has
//!   tool calls and no text, `""` when it has neither), `tool_use` blocks as `tool_calls`.
//! - `tool_choice` is sent only with a non-empty `tools`: engines refuse it alone.
//! - A final assistant message (prefill) sets `continue_final_message: true` and
//!   `add_generation_prompt: false`, so the engine continues it rather than starting a new
//!   turn; the answer holds only the continuation, as on the Messages API.

use serde_json::{json, Map, Value};

use super::content::{Block, Image, Message, ResultPart, Role};
use super::request::{MessagesRequest, Thinking, ToolChoice};
use super::ThinkingStyle;

/// What stands in for an image inside a tool result.
/// Where a tool result's image was, in the text of its tool message.
pub(super) const IMAGE_FOLLOWS: &str = "[image: in the next user message]";
/// The same, for a model that takes no images.
pub(super) const IMAGE_OMITTED: &str = "[image omitted: this model takes text only]";

impl MessagesRequest {
    /// The OpenAI Chat Completions body for the replica serving `upstream_model`. When
    /// streaming, `stream_options.include_usage` is always set so the final usage arrives.
    pub fn to_openai(&self, upstream_model: &str, thinking: ThinkingStyle) -> Value {
        let mut body = Map::new();
        body.insert("model".into(), json!(upstream_model));
        body.insert("messages".into(), Value::Array(self.openai_messages()));
        if self
            .messages
            .last()
            .is_some_and(|m| m.role == Role::Assistant)
        {
            // A prefill: the answer continues the last assistant message (vLLM, SGLang).
            body.insert("continue_final_message".into(), json!(true));
            body.insert("add_generation_prompt".into(), json!(false));
        }
        body.insert("max_tokens".into(), json!(self.max_tokens));
        if !self.stop_sequences.is_empty() {
            body.insert("stop".into(), json!(self.stop_sequences));
        }
        for (key, value) in [("temperature", &self.temperature), ("top_p", &self.top_p)] {
            if let Some(n) = value {
                body.insert(key.into(), Value::Number(n.clone()));
            }
        }
        if let Some(k) = self.top_k {
            body.insert("top_k".into(), json!(k));
        }
        if let Some(user) = &self.user {
            body.insert("user".into(), json!(user));
        }
        if !self.tools.is_empty() {
            let tools: Vec<Value> = self
                .tools
                .iter()
                .map(|t| {
                    let mut function = Map::new();
                    function.insert("name".into(), json!(t.name));
                    if let Some(d) = &t.description {
                        function.insert("description".into(), json!(d));
                    }
                    function.insert("parameters".into(), t.input_schema.clone());
                    json!({"type": "function", "function": function})
                })
                .collect();
            body.insert("tools".into(), Value::Array(tools));
            if let Some(choice) = &self.tool_choice {
                body.insert("tool_choice".into(), tool_choice(choice));
            }
            if self.no_parallel_tools {
                body.insert("parallel_tool_calls".into(), json!(false));
            }
        }
        if let Some(t) = self.thinking {
            add_thinking(&mut body, t, thinking);
        }
        body.insert("stream".into(), json!(self.stream));
        if self.stream {
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        // Engine extensions pass through; what was mapped above wins over them.
        for (key, value) in &self.extra {
            body.entry(key.clone()).or_insert_with(|| value.clone());
        }
        Value::Object(body)
    }

    /// The body `model`'s replica is sent, whose prompt is counted (see `translate::prompt`).
    pub fn prompt_body(&self, model: &crate::config::Model) -> Map<String, Value> {
        match self.to_openai(&model.upstream_model, model.reasoning_switch) {
            Value::Object(fields) => fields,
            _ => Map::new(),
        }
    }

    fn openai_messages(&self) -> Vec<Value> {
        let mut out = Vec::with_capacity(self.messages.len() + 1);
        if !self.system.is_empty() {
            out.push(json!({"role": "system", "content": self.system.join("\n")}));
        }
        for message in &self.messages {
            match message.role {
                Role::User => user_messages(message, self.tool_images, &mut out),
                Role::Assistant => out.push(assistant_message(message)),
            }
        }
        out
    }
}

fn tool_choice(choice: &ToolChoice) -> Value {
    match choice {
        ToolChoice::Auto => json!("auto"),
        ToolChoice::Any => json!("required"),
        ToolChoice::None => json!("none"),
        ToolChoice::Tool(name) => json!({"type": "function", "function": {"name": name}}),
    }
}

fn add_thinking(body: &mut Map<String, Value>, thinking: Thinking, style: ThinkingStyle) {
    let enabled = matches!(thinking, Thinking::Enabled { .. });
    match style {
        ThinkingStyle::ChatTemplateKwargs => {
            body.insert(
                "chat_template_kwargs".into(),
                json!({"enable_thinking": enabled}),
            );
        }
        ThinkingStyle::ChatTemplateArgs => {
            body.insert(
                "chat_template_args".into(),
                json!({"enable_thinking": enabled}),
            );
        }
        ThinkingStyle::ReasoningEffort => {
            let effort = match thinking {
                Thinking::Disabled => "low",
                Thinking::Enabled {
                    budget_tokens: None,
                } => "medium",
                Thinking::Enabled {
                    budget_tokens: Some(b),
                } if b < 4096 => "low",
                Thinking::Enabled {
                    budget_tokens: Some(b),
                } if b < 16384 => "medium",
                Thinking::Enabled { .. } => "high",
            };
            body.insert("reasoning_effort".into(), json!(effort));
        }
        ThinkingStyle::Ignore => {}
    }
}

/// One `tool` message per tool result, then the user's own content if any is left. Images a
/// tool returned go first in that user message, each after a line naming its tool call:
/// OpenAI tool messages carry text only.
fn user_messages(message: &Message, tool_images: bool, out: &mut Vec<Value>) {
    let mut texts: Vec<&str> = Vec::new();
    let mut has_image = false;
    let mut has_results = false;
    let mut result_images: Vec<Value> = Vec::new();
    for block in &message.blocks {
        match block {
            Block::ToolResult {
                tool_use_id,
                parts,
                is_error,
            } => {
                has_results = true;
                out.push(json!({
                    "role": "tool",
                    "tool_call_id": tool_use_id,
                    "content": tool_result_text(parts, *is_error, tool_images),
                }));
                let images = parts.iter().filter_map(|p| match p {
                    ResultPart::Image(image) if tool_images => Some(image),
                    _ => None,
                });
                for image in images {
                    result_images.push(json!({
                        "type": "text",
                        "text": format!("Image returned by tool call {tool_use_id}:"),
                    }));
                    result_images.push(image_part(image));
                }
            }
            Block::Text(t) => texts.push(t),
            Block::Image(_) => has_image = true,
            // Parsing refuses tool calls in user messages.
            Block::ToolUse { .. } => {}
        }
    }
    if !has_image && result_images.is_empty() {
        // A user turn made only of tool results needs no user message of its own.
        if !(has_results && texts.is_empty()) {
            out.push(json!({"role": "user", "content": texts.join("\n")}));
        }
        return;
    }
    let mut parts = result_images;
    parts.extend(message.blocks.iter().filter_map(|block| match block {
        Block::Text(t) => Some(json!({"type": "text", "text": t})),
        Block::Image(image) => Some(image_part(image)),
        _ => None,
    }));
    out.push(json!({"role": "user", "content": parts}));
}

fn image_part(image: &Image) -> Value {
    json!({"type": "image_url", "image_url": {"url": image_url(image)}})
}

fn image_url(image: &Image) -> String {
    match image {
        Image::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        Image::Url(url) => url.clone(),
    }
}

fn tool_result_text(parts: &[ResultPart], is_error: bool, images_follow: bool) -> String {
    let text = parts
        .iter()
        .map(|p| match p {
            ResultPart::Text(t) => t.as_str(),
            ResultPart::Image(_) if images_follow => IMAGE_FOLLOWS,
            ResultPart::Image(_) => IMAGE_OMITTED,
        })
        .collect::<Vec<_>>()
        .join("\n");
    match (is_error, text.is_empty()) {
        (false, _) => text,
        (true, true) => "Error".to_string(),
        (true, false) => format!("Error: {text}"),
    }
}

fn assistant_message(message: &Message) -> Value {
    let mut texts: Vec<&str> = Vec::new();
    let mut calls = Vec::new();
    for block in &message.blocks {
        match block {
            Block::Text(t) => texts.push(t),
            Block::ToolUse { id, name, input } => calls.push(json!({
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": input.to_string()},
            })),
            // Parsing refuses images and tool results in assistant messages.
            Block::Image(_) | Block::ToolResult { .. } => {}
        }
    }
    let content = match (texts.is_empty(), calls.is_empty()) {
        (false, _) => json!(texts.join("\n")),
        (true, false) => Value::Null,
        (true, true) => json!(""),
    };
    let mut msg = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        msg["tool_calls"] = Value::Array(calls);
    }
    msg
}
