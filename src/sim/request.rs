//! Reads a chat completion request: model, limits, stop strings, reasoning, tool choice and
//! the deterministic prompt token estimate.

use serde_json::Value;

use super::scenario::Scenario;
use super::{SimOptions, DEFAULT_MODEL};

/// Reasoning length when reasoning is on but `sim.reasoning_tokens` does not say.
const DEFAULT_REASONING_TOKENS: u32 = 8;
/// What vLLM's tokenizers average on English text; good enough for a stable estimate.
const CHARS_PER_TOKEN: u64 = 4;
/// Per-message cost of the chat template's role markers.
const MESSAGE_OVERHEAD: u64 = 4;
/// A low-detail image tile, as OpenAI bills it.
const IMAGE_TOKENS: u64 = 85;

/// Why a request cannot be served.
#[derive(Debug)]
pub(crate) enum RequestError {
    Invalid(String),
    UnknownModel(String),
}

/// A tool the model will call.
#[derive(Debug, Clone)]
pub(crate) struct ToolSpec {
    pub name: String,
    pub parameters: Value,
}

/// The parts of a chat completion request the replica acts on.
#[derive(Debug)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub prompt_tokens: u64,
    /// Upper bound on completion tokens (reasoning included, as in vLLM).
    pub max_tokens: u32,
    pub stops: Vec<String>,
    /// Reasoning tokens to emit before the answer; 0 when reasoning is off.
    pub reasoning_tokens: u32,
    /// Tools to call instead of answering; empty means answer with text.
    pub tool_calls: Vec<ToolSpec>,
}

impl ChatRequest {
    pub(crate) fn parse(
        body: &Value,
        scenario: &Scenario,
        opts: &SimOptions,
    ) -> Result<ChatRequest, RequestError> {
        let invalid = |m: &str| RequestError::Invalid(m.to_owned());
        let messages = match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => m,
            _ => return Err(invalid("`messages` must be a non-empty array")),
        };
        let model = match body.get("model") {
            Some(Value::String(m)) => m.clone(),
            None | Some(Value::Null) => opts
                .models
                .first()
                .cloned()
                .unwrap_or_else(|| DEFAULT_MODEL.to_owned()),
            Some(_) => return Err(invalid("`model` must be a string")),
        };
        if !opts.models.is_empty() && !opts.models.contains(&model) {
            return Err(RequestError::UnknownModel(model));
        }
        let max_tokens = match max_tokens(body)? {
            Some(n) => n,
            None => opts.default_max_tokens,
        };
        let thinking = body.get("reasoning_effort").is_some_and(|v| !v.is_null())
            || ["chat_template_args", "chat_template_kwargs"]
                .iter()
                .any(|k| {
                    body.pointer(&format!("/{k}/enable_thinking")) == Some(&Value::Bool(true))
                });
        let reasoning_tokens = match scenario.reasoning_tokens {
            Some(n) => n,
            None if thinking => DEFAULT_REASONING_TOKENS,
            None => 0,
        };
        let last_is_tool_result = messages
            .last()
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            == Some("tool");
        let tool_calls = if last_is_tool_result {
            Vec::new()
        } else {
            choose_tools(body, scenario.parallel_tools)?
        };
        Ok(ChatRequest {
            model,
            stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: body.pointer("/stream_options/include_usage")
                == Some(&Value::Bool(true)),
            prompt_tokens: match scenario.prompt_tokens {
                Some(n) => u64::from(n),
                None => prompt_tokens(messages, body.get("tools")),
            },
            max_tokens,
            stops: stops(body.get("stop"))?,
            reasoning_tokens,
            tool_calls,
        })
    }
}

fn max_tokens(body: &Value) -> Result<Option<u32>, RequestError> {
    for key in ["max_completion_tokens", "max_tokens"] {
        match body.get(key) {
            None | Some(Value::Null) => continue,
            Some(v) => {
                return match v.as_u64() {
                    Some(n) if n >= 1 => Ok(Some(u32::try_from(n).unwrap_or(u32::MAX))),
                    _ => Err(RequestError::Invalid(format!(
                        "`{key}` must be a positive integer, got {v}"
                    ))),
                }
            }
        }
    }
    Ok(None)
}

fn stops(stop: Option<&Value>) -> Result<Vec<String>, RequestError> {
    let all = match stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| RequestError::Invalid("`stop` items must be strings".to_owned()))?,
        Some(_) => {
            return Err(RequestError::Invalid(
                "`stop` must be a string or an array of strings".to_owned(),
            ))
        }
    };
    Ok(all.into_iter().filter(|s| !s.is_empty()).collect())
}

/// Picks the tools the model calls, following `tool_choice` and `parallel_tool_calls`.
fn choose_tools(body: &Value, parallel: bool) -> Result<Vec<ToolSpec>, RequestError> {
    let tools: Vec<ToolSpec> = match body.get("tools") {
        Some(Value::Array(tools)) => tools
            .iter()
            .filter_map(|t| {
                let function = t.get("function")?;
                Some(ToolSpec {
                    name: function.get("name")?.as_str()?.to_owned(),
                    parameters: function.get("parameters").cloned().unwrap_or(Value::Null),
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    if tools.is_empty() {
        return Ok(tools);
    }
    match body.get("tool_choice") {
        Some(Value::String(choice)) if choice == "none" => Ok(Vec::new()),
        Some(Value::Object(_)) => {
            let named = body
                .pointer("/tool_choice/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    RequestError::Invalid("`tool_choice.function.name` is required".to_owned())
                })?;
            match tools.into_iter().find(|t| t.name == named) {
                Some(tool) => Ok(vec![tool]),
                None => Err(RequestError::Invalid(format!(
                    "tool `{named}` named in `tool_choice` is not in `tools`"
                ))),
            }
        }
        _ => {
            let allowed = body.get("parallel_tool_calls") != Some(&Value::Bool(false));
            let n = if parallel && allowed { 2 } else { 1 };
            Ok(tools.into_iter().take(n).collect())
        }
    }
}

/// 4 tokens per message plus its text at 4 characters a token, 85 per image, plus the tool
/// definitions at 4 bytes a token; at least 1.
pub(crate) fn prompt_tokens(messages: &[Value], tools: Option<&Value>) -> u64 {
    let mut total = 0;
    for message in messages {
        let mut chars = 0;
        let mut images = 0;
        match message.get("content") {
            Some(Value::String(text)) => chars += text.chars().count() as u64,
            Some(Value::Array(parts)) => {
                for part in parts {
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let text = part.get("text").and_then(Value::as_str).unwrap_or("");
                            chars += text.chars().count() as u64;
                        }
                        Some("image_url") => images += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        total += MESSAGE_OVERHEAD + chars.div_ceil(CHARS_PER_TOKEN) + images * IMAGE_TOKENS;
    }
    if let Some(tools @ Value::Array(list)) = tools {
        if !list.is_empty() {
            total += (tools.to_string().len() as u64).div_ceil(CHARS_PER_TOKEN);
        }
    }
    total.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<ChatRequest, RequestError> {
        let opts = SimOptions::default();
        let scenario = Scenario::from_body(&body, &opts).unwrap();
        ChatRequest::parse(&body, &scenario, &opts)
    }

    #[test]
    fn prompt_estimate_counts_text_images_and_tools() {
        let messages = [
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
            ]}),
        ];
        // 4 + ceil(9/4) = 7; 4 + ceil(13/4) + 85 = 93.
        assert_eq!(prompt_tokens(&messages, None), 100);
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let extra = (tools.to_string().len() as u64).div_ceil(4);
        assert_eq!(prompt_tokens(&messages, Some(&tools)), 100 + extra);
        assert_eq!(prompt_tokens(&[], None), 1);
    }

    #[test]
    fn limits_and_stops() {
        let r = parse(json!({"messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 9, "max_completion_tokens": 5, "stop": ["x", ""]}))
        .unwrap();
        assert_eq!((r.max_tokens, r.stops.clone()), (5, vec!["x".to_owned()]));
        assert_eq!(r.model, DEFAULT_MODEL);
        assert!(matches!(
            parse(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})),
            Err(RequestError::Invalid(_))
        ));
        assert!(matches!(
            parse(json!({"model": "m"})),
            Err(RequestError::Invalid(_))
        ));
    }

    #[test]
    fn tool_choice_selects_tools() {
        let tools = json!([
            {"type": "function", "function": {"name": "a"}},
            {"type": "function", "function": {"name": "b"}}
        ]);
        let user = json!([{"role": "user", "content": "hi"}]);
        let names = |extra: Value| {
            let mut body = json!({"messages": user, "tools": tools});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let r = parse(body).unwrap();
            r.tool_calls.into_iter().map(|t| t.name).collect::<Vec<_>>()
        };
        assert_eq!(names(json!({})), ["a"]);
        assert_eq!(names(json!({"tool_choice": "none"})), Vec::<String>::new());
        assert_eq!(
            names(json!({"tool_choice": {"type": "function", "function": {"name": "b"}}})),
            ["b"]
        );
        assert_eq!(names(json!({"sim": {"parallel_tools": true}})), ["a", "b"]);
        assert_eq!(
            names(json!({"sim": {"parallel_tools": true}, "parallel_tool_calls": false})),
            ["a"]
        );
        let after_result = json!({"messages": [{"role": "tool", "content": "42"}], "tools": tools});
        assert!(parse(after_result).unwrap().tool_calls.is_empty());
    }
}
