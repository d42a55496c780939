//! The prompt's tokens as reserved before the replica counts them: never fewer than the
//! replica will count, whatever the text.
//!
//! ```text
//! tokens = per_request
//!        + Σ messages: per_message + text tokens + max_image_tokens × media parts
//!        + text tokens of the tool definitions
//! ```
//!
//! Text is every string of a message that a chat template may render: role, content (text
//! parts joined by a newline, as engines join them), name, tool call ids and names,
//! reasoning, any other field; not `type` tags, and not media parts (`image_url`,
//! `input_audio`, `video_url`, …), which the engine decodes and which reserve the model's
//! `max_image_tokens` each. JSON a template renders
//! (tool definitions, tool call arguments) counts as JSON indented by four spaces: no
//! template renders it in fewer bytes, since `tojson` adds a space after `:` and `,`.
//! Strings and numbers of `chat_template_kwargs` count too; a `chat_template` sent with the
//! request is refused, since it could render the prompt any number of times.
//!
//! Text tokens are the model's tokenizer's exact count when it has one; else the text's UTF-8
//! bytes. No token of a byte-level BPE (or byte-fallback) tokenizer is shorter than one byte,
//! so that bounds every such tokenizer. Both surfaces count the same body: an Anthropic
//! request is counted as the Chat Completions request the replica is sent.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::PromptRules;

/// Content part keys that carry media the engine decodes rather than tokenizes as text.
const MEDIA: &[&str] = &[
    "image_url",
    "input_image",
    "image",
    "input_audio",
    "audio_url",
    "video_url",
    "file",
];

/// Top-level fields that chat templates render as JSON.
const RENDERED_JSON: &[&str] = &["tools", "functions", "documents"];

/// Top-level fields whose values a chat template may render as text.
const TEMPLATE_VARIABLES: &[&str] = &["chat_template_kwargs", "chat_template_args"];

/// Counts one request's prompt under a model's rules.
pub struct Counter<'r> {
    rules: &'r PromptRules,
    tokens: u64,
}

impl<'r> Counter<'r> {
    pub fn new(rules: &'r PromptRules) -> Self {
        Counter {
            rules,
            tokens: u64::from(rules.per_request),
        }
    }

    /// The prompt tokens of a Chat Completions body (see the module doc).
    pub fn body(mut self, body: &Map<String, Value>) -> u64 {
        if let Some(Value::Array(messages)) = body.get("messages") {
            for message in messages {
                self.message(message);
            }
        }
        for field in RENDERED_JSON {
            match body.get(*field) {
                None | Some(Value::Null) => {}
                Some(v) => self.json(v),
            }
        }
        for field in TEMPLATE_VARIABLES {
            if let Some(v) = body.get(*field) {
                self.value(v);
            }
        }
        self.tokens
    }

    fn message(&mut self, message: &Value) {
        self.add(u64::from(self.rules.per_message));
        let Value::Object(fields) = message else {
            self.value(message);
            return;
        };
        for (key, value) in fields {
            match (key.as_str(), value) {
                ("type", _) => {}
                ("content", Value::Array(parts)) => self.parts(parts),
                ("tool_calls", Value::Array(calls)) => calls.iter().for_each(|c| self.call(c)),
                _ => self.value(value),
            }
        }
    }

    /// Content parts: engines join the text parts with a newline into one text, which is
    /// counted as such; media parts reserve the model's maximum each.
    fn parts(&mut self, parts: &[Value]) {
        let mut texts: Vec<&str> = Vec::new();
        for part in parts {
            match part {
                Value::Object(fields) if fields.keys().any(|k| MEDIA.contains(&k.as_str())) => {
                    self.add(u64::from(self.rules.max_image_tokens));
                }
                // A plain text part, `type` and `text` only; anything more counts apart.
                Value::Object(fields) => match fields.get("text") {
                    Some(Value::String(text)) if fields.len() <= 2 => texts.push(text),
                    _ => self.value(part),
                },
                _ => self.value(part),
            }
        }
        match texts.as_slice() {
            [] => {}
            [one] => self.add(self.text_tokens(one)),
            many => self.add(self.text_tokens(&many.join("\n"))),
        }
    }

    fn call(&mut self, call: &Value) {
        let Value::Object(fields) = call else {
            return self.value(call);
        };
        for (key, value) in fields {
            match (key.as_str(), value) {
                ("type", _) => {}
                ("function", Value::Object(function)) => {
                    for (key, value) in function {
                        match (key.as_str(), value) {
                            ("arguments", Value::String(s)) => self.arguments(s),
                            ("arguments", v) => self.json(v),
                            _ => self.value(value),
                        }
                    }
                }
                _ => self.value(value),
            }
        }
    }

    /// Arguments as sent, or as the JSON an engine may parse them into and render again,
    /// whichever is longer.
    fn arguments(&mut self, text: &str) {
        let as_sent = self.text_tokens(text);
        let rendered = match serde_json::from_str::<Value>(text) {
            Ok(v @ (Value::Object(_) | Value::Array(_))) => self.text_tokens(&indented(&v)),
            _ => 0,
        };
        self.add(as_sent.max(rendered));
    }

    /// Every string and number in `value`, recursively; object keys and `type` tags are not
    /// rendered as text.
    fn value(&mut self, value: &Value) {
        match value {
            Value::String(s) => self.add(self.text_tokens(s)),
            Value::Number(n) => self.add(self.text_tokens(&n.to_string())),
            Value::Array(items) => items.iter().for_each(|v| self.value(v)),
            Value::Object(fields) => fields
                .iter()
                .filter(|(k, _)| k.as_str() != "type")
                .for_each(|(_, v)| self.value(v)),
            Value::Bool(_) | Value::Null => {}
        }
    }

    fn json(&mut self, value: &Value) {
        self.add(self.text_tokens(&indented(value)));
    }

    fn text_tokens(&self, text: &str) -> u64 {
        match &self.rules.tokenizer {
            Some(t) => t.count(text),
            None => text.len() as u64,
        }
    }

    fn add(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_add(n);
    }
}

/// `value` as JSON indented by four spaces.
fn indented(value: &Value) -> String {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    // Serialising a `Value` into memory cannot fail.
    let _ = value.serialize(&mut ser);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> PromptRules {
        PromptRules {
            per_message: 8,
            per_request: 64,
            max_image_tokens: 1000,
            tokenizer: None,
        }
    }

    fn count(body: Value) -> u64 {
        Counter::new(&rules()).body(body.as_object().unwrap())
    }

    #[test]
    fn one_token_per_byte_of_rendered_text_plus_the_template() {
        // 64 + 8 + "user" + "Hello"
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "Hello"}]});
        assert_eq!(count(body), 64 + 8 + 4 + 5);
        // A CJK character is 3 bytes, an emoji 4.
        let body = json!({"messages": [{"role": "user", "content": "日本🙂"}]});
        assert_eq!(count(body), 64 + 8 + 4 + 10);
    }

    #[test]
    fn an_image_reserves_the_model_maximum_whatever_its_size() {
        let url = format!("data:image/png;base64,{}", "A".repeat(100_000));
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is it"},
            {"type": "image_url", "image_url": {"url": url}}]}]});
        assert_eq!(count(body), 64 + 8 + 4 + 10 + 1000);
    }

    #[test]
    fn tools_and_arguments_count_as_indented_json() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        let body = json!({"messages": [{"role": "user", "content": ""}], "tools": tools});
        assert_eq!(count(body), 64 + 8 + 4 + indented(&tools).len() as u64);
        let body = json!({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}]});
        // "{\n    \"a\": 1\n}" is longer than the 7 bytes sent.
        assert_eq!(count(body), 64 + 8 + 9 + 2 + 1 + 14);
    }
}
