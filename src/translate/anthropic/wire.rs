//! What replicas send back, read leniently: completion and chunk shapes, usage, and the
//! stop reason both directions share.
//!
//! Every field is optional and unknown fields are ignored, so engine differences (vLLM's
//! `reasoning_content` or `reasoning`, its `stop_reason`, SGLang's `matched_stop`, `usage`
//! on every chunk or only the last) need no special cases.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use super::Usage;

/// A `chat.completion.chunk`, or an error object sent in its place.
#[derive(Debug, Deserialize)]
pub(super) struct Chunk<'a> {
    #[serde(default, borrow)]
    pub choices: Vec<ChunkChoice<'a>>,
    #[serde(default)]
    pub usage: Option<Value>,
    /// `{"error": {...}}`, as vLLM writes a failure into a started stream.
    #[serde(default)]
    pub error: Option<Value>,
    /// `"error"` for vLLM's older bare error objects.
    #[serde(default, borrow)]
    pub object: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub message: Option<Cow<'a, str>>,
    #[serde(default)]
    pub code: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChunkChoice<'a> {
    #[serde(default)]
    pub index: Option<u64>,
    #[serde(default, borrow)]
    pub delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    pub finish_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    pub stop_reason: Option<Value>,
    #[serde(default)]
    pub matched_stop: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct Delta<'a> {
    #[serde(default, borrow)]
    pub content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub reasoning: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

impl Delta<'_> {
    /// The reasoning text, under whichever name the engine uses.
    pub fn reasoning_text(&self) -> Option<&str> {
        self.reasoning_content
            .as_deref()
            .or(self.reasoning.as_deref())
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ToolCallDelta<'a> {
    #[serde(default)]
    pub index: Option<u64>,
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub function: Option<FunctionDelta<'a>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    pub name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub arguments: Option<Cow<'a, str>>,
}

/// A whole `chat.completion`.
#[derive(Debug, Deserialize)]
pub(super) struct Completion {
    #[serde(default)]
    pub choices: Vec<Choice>,
    #[serde(default)]
    pub usage: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Choice {
    #[serde(default)]
    pub message: Option<ChoiceMessage>,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub stop_reason: Option<Value>,
    #[serde(default)]
    pub matched_stop: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChoiceMessage {
    /// A string, `null`, or (some engines) text parts.
    #[serde(default)]
    pub content: Option<Value>,
    #[serde(default)]
    pub reasoning_content: Option<String>,
    #[serde(default)]
    pub reasoning: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ToolCall {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub function: Option<Function>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Function {
    #[serde(default)]
    pub name: Option<String>,
    /// A JSON string as OpenAI specifies; an object from a few engines.
    #[serde(default)]
    pub arguments: Option<Value>,
}

/// OpenAI `usage` → [`Usage`]; `None` unless it is an object with token counts.
pub(super) fn usage(value: &Value) -> Option<Usage> {
    let obj = value.as_object()?;
    if !obj.contains_key("prompt_tokens") && !obj.contains_key("completion_tokens") {
        return None;
    }
    let count = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let detail = |outer: &str, inner: &str| count(obj.get(outer).and_then(|d| d.get(inner)));
    Some(Usage {
        input_tokens: count(obj.get("prompt_tokens")),
        cached_input_tokens: detail("prompt_tokens_details", "cached_tokens"),
        output_tokens: count(obj.get("completion_tokens")),
        reasoning_tokens: detail("completion_tokens_details", "reasoning_tokens"),
    })
}

/// The stop string the engine says it matched: vLLM's `stop_reason` or SGLang's
/// `matched_stop` when it is a string (a number there is a stop token id).
pub(super) fn matched_stop<'v>(
    stop_reason: Option<&'v Value>,
    matched_stop: Option<&'v Value>,
) -> Option<&'v str> {
    stop_reason
        .and_then(Value::as_str)
        .or_else(|| matched_stop.and_then(Value::as_str))
}

/// Anthropic's `stop_reason` and `stop_sequence`.
///
/// `length` wins over a tool call: a call cut short by the token limit is reported as
/// `max_tokens`, as Anthropic does, so the client does not run half-written input. Any
/// tool call means `tool_use`, whatever finish reason the engine gave. A `stop` is a
/// `stop_sequence` when the engine names the matched string and it is one the client asked
/// for. `tool_calls` without any call and unknown reasons end the turn normally;
/// `content_filter` is a `refusal`.
pub(super) fn stop_reason(
    finish: Option<&str>,
    matched: Option<&str>,
    stop_sequences: &[String],
    called_tool: bool,
) -> (&'static str, Option<String>) {
    match finish {
        Some("length") => ("max_tokens", None),
        _ if called_tool => ("tool_use", None),
        Some("content_filter") => ("refusal", None),
        _ => match matched {
            Some(s) if stop_sequences.iter().any(|q| q == s) => {
                ("stop_sequence", Some(s.to_string()))
            }
            _ => ("end_turn", None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_reads_openai_counts_and_skips_null() {
        let u = usage(
            &json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2}}),
        )
        .unwrap();
        assert_eq!((u.input_tokens, u.cached_input_tokens), (10, 4));
        assert_eq!((u.output_tokens, u.reasoning_tokens), (5, 2));
        assert_eq!(u.uncached_input_tokens(), 6);
        assert_eq!(usage(&Value::Null), None);
        assert_eq!(usage(&json!({})), None);
        let u = usage(&json!({"prompt_tokens": 3, "prompt_tokens_details": null})).unwrap();
        assert_eq!(u.cached_input_tokens, 0);
    }

    #[test]
    fn stop_reasons() {
        let seqs = vec!["###".to_string()];
        let (hit, token) = (json!("###"), json!(128009));
        assert_eq!(matched_stop(Some(&token), Some(&hit)), Some("###"));
        assert_eq!(matched_stop(Some(&hit), None), Some("###"));
        assert_eq!(matched_stop(Some(&token), None), None);
        let reason = |finish, matched, tool| stop_reason(finish, matched, &seqs, tool);
        assert_eq!(reason(Some("stop"), None, false).0, "end_turn");
        assert_eq!(reason(Some("length"), None, true).0, "max_tokens");
        assert_eq!(reason(Some("stop"), None, true).0, "tool_use");
        assert_eq!(reason(Some("tool_calls"), None, false).0, "end_turn");
        assert_eq!(reason(None, None, false).0, "end_turn");
        assert_eq!(reason(Some("content_filter"), None, false).0, "refusal");
        assert_eq!(
            reason(Some("stop"), Some("###"), false),
            ("stop_sequence", Some("###".into()))
        );
        assert_eq!(reason(Some("stop"), Some("END"), false).0, "end_turn");
    }
}
