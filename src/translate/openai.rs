//! OpenAI Chat Completions requests: validate what routing needs, keep every other field as is.

use serde_json::{Map, Value};

use super::RequestError;

/// A validated chat completion request. Fields tollgate does not interpret stay in `body`
/// untouched, so engine extensions (`top_k`, `chat_template_args`, …) reach the replica.
#[derive(Debug)]
pub struct ChatRequest {
    pub model: String,
    pub stream: bool,
    /// The client asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    body: Map<String, Value>,
}

impl ChatRequest {
    pub fn parse(bytes: &[u8]) -> Result<Self, RequestError> {
        let value: Value = serde_json::from_slice(bytes).map_err(RequestError::invalid_json)?;
        let Value::Object(body) = value else {
            return Err(RequestError::invalid_json("the top level is not an object"));
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) | None => {
                return Err(RequestError::missing(
                    "model",
                    "Name the model to use; GET /v1/models lists them.",
                ))
            }
            Some(_) => return Err(RequestError::wrong_type("model", "a string")),
        };
        match body.get("messages") {
            Some(Value::Array(list)) if !list.is_empty() => {
                for (i, m) in list.iter().enumerate() {
                    match m.get("role") {
                        Some(Value::String(_)) => {}
                        Some(_) => {
                            return Err(RequestError::wrong_type(
                                &format!("messages[{i}].role"),
                                "a string",
                            ))
                        }
                        None if m.is_object() => {
                            return Err(RequestError::missing(
                                &format!("messages[{i}].role"),
                                "Each message needs a role such as \"user\".",
                            ))
                        }
                        None => {
                            return Err(RequestError::wrong_type(
                                &format!("messages[{i}]"),
                                "an object",
                            ))
                        }
                    }
                }
            }
            Some(Value::Array(_)) | None => {
                return Err(RequestError::missing(
                    "messages",
                    "Send at least one message, e.g. [{\"role\": \"user\", \"content\": \"Hi\"}].",
                ))
            }
            Some(_) => return Err(RequestError::wrong_type("messages", "an array of messages")),
        }
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(RequestError::wrong_type("stream", "a boolean")),
        };
        for field in ["max_tokens", "max_completion_tokens"] {
            match body.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::Number(n)) if n.is_u64() => {}
                Some(_) => return Err(RequestError::wrong_type(field, "a non-negative integer")),
            }
        }
        match body.get("stream_options") {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(_) => return Err(RequestError::wrong_type("stream_options", "an object")),
        }
        let include_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(ChatRequest {
            model,
            stream,
            include_usage,
            body,
        })
    }

    /// The output cap the client set: `max_completion_tokens`, else `max_tokens`.
    pub fn max_output_tokens(&self) -> Option<u64> {
        ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|f| self.body.get(*f).and_then(Value::as_u64))
    }

    /// Lowers the output cap (a budget clamp): sets whichever cap fields the client used.
    pub fn set_max_output_tokens(&mut self, n: u64) {
        let mut set = false;
        for f in ["max_completion_tokens", "max_tokens"] {
            if self.body.get(f).is_some_and(|v| !v.is_null()) {
                self.body.insert(f.into(), Value::from(n));
                set = true;
            }
        }
        if !set {
            self.body.insert("max_tokens".into(), Value::from(n));
        }
    }

    /// Prompt tokens, estimated: 4 per message plus one per 4 characters of text (content
    /// strings, text parts, tool call arguments), 85 per image, and the tool definitions'
    /// JSON at one token per 4 bytes. The replica's count replaces it when one arrives.
    pub fn estimate_input_tokens(&self) -> u32 {
        let mut chars = 0usize;
        let mut tokens = 0usize;
        if let Some(Value::Array(messages)) = self.body.get("messages") {
            for m in messages {
                tokens += 4;
                match m.get("content") {
                    Some(Value::String(s)) => chars += s.len(),
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            match p.get("text") {
                                Some(Value::String(s)) => chars += s.len(),
                                _ if p.get("image_url").is_some() => tokens += 85,
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
                if let Some(Value::Array(calls)) = m.get("tool_calls") {
                    for c in calls {
                        if let Some(Value::String(a)) = c.pointer("/function/arguments") {
                            chars += a.len();
                        }
                    }
                }
            }
        }
        if let Some(tools) = self.body.get("tools") {
            chars += tools.to_string().len();
        }
        (tokens + chars.div_ceil(4)).max(1).min(u32::MAX as usize) as u32
    }

    /// The body for the replica: the same request with `model` set to what the replica
    /// serves, and, when streaming, the usage chunk always requested (accounting needs it).
    pub fn upstream_body(mut self, upstream_model: &str) -> Vec<u8> {
        self.body
            .insert("model".into(), Value::String(upstream_model.to_string()));
        if self.stream && !self.include_usage {
            let options = self
                .body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if !options.is_object() {
                *options = Value::Object(Map::new());
            }
            if let Value::Object(o) = options {
                o.insert("include_usage".into(), Value::Bool(true));
            }
        }
        // Serialising a `Map` of `Value`s cannot fail: keys are strings and numbers are finite.
        serde_json::to_vec(&self.body).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> RequestError {
        ChatRequest::parse(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn unknown_fields_survive_and_model_is_rewritten() {
        let body = r#"{"model":"a","messages":[{"role":"user","content":"hi"}],"top_k":5,"chat_template_args":{"enable_thinking":true},"stream":true}"#;
        let req = ChatRequest::parse(body.as_bytes()).unwrap();
        assert_eq!(req.model, "a");
        assert!(req.stream);
        let out: Value = serde_json::from_slice(&req.upstream_body("served")).unwrap();
        assert_eq!(out["model"], "served");
        assert_eq!(out["top_k"], 5);
        assert_eq!(out["chat_template_args"]["enable_thinking"], true);
        assert_eq!(out["messages"][0]["content"], "hi");
    }

    #[test]
    fn each_violation_names_its_field() {
        assert_eq!(err("{").code, "invalid_json");
        assert_eq!(err("[1]").code, "invalid_json");
        assert_eq!(
            err(r#"{"messages":[{"role":"user"}]}"#).param.as_deref(),
            Some("model")
        );
        assert_eq!(
            err(r#"{"model":7,"messages":[]}"#).param.as_deref(),
            Some("model")
        );
        assert_eq!(err(r#"{"model":"a"}"#).param.as_deref(), Some("messages"));
        assert_eq!(
            err(r#"{"model":"a","messages":"hi"}"#).param.as_deref(),
            Some("messages")
        );
        assert_eq!(
            err(r#"{"model":"a","messages":[{"content":"x"}]}"#)
                .param
                .as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            err(r#"{"model":"a","messages":[{"role":"user"}],"stream":"yes"}"#)
                .param
                .as_deref(),
            Some("stream")
        );
        assert_eq!(
            err(r#"{"model":"a","messages":[{"role":"user"}],"max_tokens":-1}"#)
                .param
                .as_deref(),
            Some("max_tokens")
        );
    }
}
