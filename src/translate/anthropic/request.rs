//! The Messages request: top-level fields, tools and thinking, validated and typed.
//!
//! The fields below are read and mapped. Anthropic-only features the replica cannot honour
//! (`service_tier`, `container`, `mcp_servers`, `context_management`, `cache_control` on
//! blocks, …) are accepted and dropped. Any other top-level field is an engine extension
//! (`chat_template_kwargs`, `repetition_penalty`, …) and passes through unchanged, as on the
//! OpenAI surface.

use serde_json::{Number, Value};

use super::content::{self, Message};
use super::fields::{self, Object};
use crate::translate::media::MediaPart;
use crate::translate::{structure, RequestError};
use crate::vocab::echo;

/// A validated `POST /v1/messages` (or count_tokens) body.
#[derive(Debug, Clone)]
pub struct MessagesRequest {
    pub model: String,
    pub stream: bool,
    /// 0 only for count_tokens bodies that left it out.
    pub max_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub(super) system: Vec<String>,
    pub(super) messages: Vec<Message>,
    pub(super) tools: Vec<Tool>,
    pub(super) tool_choice: Option<ToolChoice>,
    /// `tool_choice.disable_parallel_tool_use`.
    pub(super) no_parallel_tools: bool,
    pub(super) temperature: Option<Number>,
    pub(super) top_p: Option<Number>,
    pub(super) top_k: Option<u64>,
    /// `metadata.user_id`.
    pub(super) user: Option<String>,
    pub(super) thinking: Option<Thinking>,
    /// Unknown top-level fields, passed to the replica as they are.
    pub(super) extra: Object,
    /// The images, for the media check.
    pub media: Vec<MediaPart>,
    /// Whether the model takes images (its `input_modalities`): images a tool returned
    /// then reach it; else they stay a marker in the tool's text, as a text-only engine
    /// would refuse the request. Set by the caller once the model is known; true until then.
    pub tool_images: bool,
}

/// Fields this module maps itself.
const MAPPED: &[&str] = &[
    "model",
    "max_tokens",
    "stream",
    "stop_sequences",
    "system",
    "messages",
    "tools",
    "tool_choice",
    "temperature",
    "top_p",
    "top_k",
    "metadata",
    "thinking",
];

/// Anthropic API features with no OpenAI-engine equivalent: dropped, never forwarded.
/// OpenAI fields that would override what tollgate admits and clamps (the output cap, the
/// number of answers): never passed through from a Messages request.
const GATEWAY_OWNED: &[&str] = &["max_completion_tokens", "n", "best_of"];

const ANTHROPIC_ONLY: &[&str] = &[
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
    "output_format",
    "output_config",
    "betas",
    "anthropic_version",
    "anthropic_beta",
    "cache_control",
    "inference_geo",
];

#[derive(Debug, Clone)]
pub(super) struct Tool {
    pub name: String,
    pub description: Option<String>,
    pub input_schema: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ToolChoice {
    Auto,
    Any,
    Tool(String),
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Thinking {
    /// `enabled` with its budget; `adaptive` (the model decides) has none.
    Enabled {
        budget_tokens: Option<u32>,
    },
    Disabled,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Messages,
    CountTokens,
}

impl MessagesRequest {
    /// Whether the client enabled thinking, and so gets `thinking` blocks back.
    pub fn shows_thinking(&self) -> bool {
        matches!(self.thinking, Some(Thinking::Enabled { .. }))
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, RequestError> {
        parse(bytes, Endpoint::Messages)
    }
}

/// A count_tokens body: the same as a message request, but `max_tokens` may be left out
/// (then 0) and `stream` is ignored.
pub fn parse_count_tokens(bytes: &[u8]) -> Result<MessagesRequest, RequestError> {
    parse(bytes, Endpoint::CountTokens)
}

fn parse(bytes: &[u8], endpoint: Endpoint) -> Result<MessagesRequest, RequestError> {
    structure::check(bytes)?;
    let value: Value = serde_json::from_slice(bytes).map_err(RequestError::invalid_json)?;
    let Value::Object(body) = value else {
        return Err(RequestError::invalid_json("the top level is not an object"));
    };
    if body.get("chat_template").is_some_and(|t| !t.is_null()) {
        return Err(RequestError::client_template());
    }
    let model = match fields::string(&body, "", "model", "Name the model to use.")? {
        "" => return Err(RequestError::missing("model", "Name the model to use.")),
        m => m.to_string(),
    };
    let max_tokens = match fields::opt_positive_u32(&body, "", "max_tokens")? {
        Some(n) => n,
        None if endpoint == Endpoint::CountTokens => 0,
        None => {
            return Err(RequestError::missing(
                "max_tokens",
                "Set the most tokens to generate, e.g. \"max_tokens\": 1024.",
            ))
        }
    };
    let stream = match endpoint {
        Endpoint::Messages => fields::opt_bool(&body, "", "stream")?.unwrap_or(false),
        Endpoint::CountTokens => false,
    };
    let (tool_choice, no_parallel_tools) = parse_tool_choice(&body)?;
    let mut media = Vec::new();
    let messages = content::parse_messages(&body, &mut media)?;
    Ok(MessagesRequest {
        model,
        stream,
        max_tokens,
        stop_sequences: fields::opt_strings(&body, "", "stop_sequences")?,
        system: parse_system(&body)?,
        messages,
        tools: parse_tools(&body)?,
        tool_choice,
        no_parallel_tools,
        temperature: fields::opt_number(&body, "", "temperature")?,
        top_p: fields::opt_number(&body, "", "top_p")?,
        top_k: fields::opt_u64(&body, "", "top_k")?,
        user: parse_user(&body)?,
        thinking: parse_thinking(&body)?,
        extra: body
            .iter()
            .filter(|(k, _)| {
                let k = k.as_str();
                !MAPPED.contains(&k) && !ANTHROPIC_ONLY.contains(&k) && !GATEWAY_OWNED.contains(&k)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        tool_images: true,
        media,
    })
}

/// `system`: a string or text blocks, kept as the list of texts.
fn parse_system(body: &Object) -> Result<Vec<String>, RequestError> {
    match body.get("system") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let at = format!("system[{i}]");
                let block = fields::object(item, &at)?;
                match fields::string(block, &at, "type", "System blocks are \"text\".")? {
                    "text" => Ok(fields::string(block, &at, "text", "Give the text.")?.to_string()),
                    _ => Err(RequestError::invalid_value(
                        &format!("{at}.type"),
                        "system blocks must be of type \"text\".",
                    )),
                }
            })
            .collect(),
        Some(_) => Err(RequestError::wrong_type(
            "system",
            "a string or an array of text blocks",
        )),
    }
}

fn parse_tools(body: &Object) -> Result<Vec<Tool>, RequestError> {
    let Some(items) = fields::opt_array(body, "", "tools", "an array of tools")? else {
        return Ok(Vec::new());
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("tools[{i}]");
            let tool = fields::object(item, &at)?;
            if let Some(kind) = fields::opt_string(tool, &at, "type")? {
                if kind != "custom" {
                    return Err(RequestError::invalid_value(
                        &format!("{at}.type"),
                        &format!(
                            "server tool \"{}\" is not supported; define a custom tool \
                             with \"name\", \"description\" and \"input_schema\".",
                            echo(kind)
                        ),
                    ));
                }
            }
            let name = fields::string(tool, &at, "name", "Every tool needs a name.")?;
            if name.is_empty() {
                return Err(RequestError::missing(
                    &format!("{at}.name"),
                    "Every tool needs a name.",
                ));
            }
            let input_schema =
                match tool.get("input_schema") {
                    Some(v @ Value::Object(_)) => v.clone(),
                    None | Some(Value::Null) => return Err(RequestError::missing(
                        &format!("{at}.input_schema"),
                        "Give the JSON schema of the tool's input, e.g. {\"type\": \"object\"}.",
                    )),
                    Some(_) => {
                        return Err(RequestError::wrong_type(
                            &format!("{at}.input_schema"),
                            "an object",
                        ))
                    }
                };
            Ok(Tool {
                name: name.to_string(),
                description: fields::opt_string(tool, &at, "description")?.map(str::to_string),
                input_schema,
            })
        })
        .collect()
}

fn parse_tool_choice(body: &Object) -> Result<(Option<ToolChoice>, bool), RequestError> {
    let at = "tool_choice";
    let choice = match body.get(at) {
        None | Some(Value::Null) => return Ok((None, false)),
        Some(v) => fields::object(v, at)?,
    };
    let kind = fields::string(
        choice,
        at,
        "type",
        "Use \"auto\", \"any\", \"tool\" or \"none\".",
    )?;
    let parsed = match kind {
        "auto" => ToolChoice::Auto,
        "any" => ToolChoice::Any,
        "none" => ToolChoice::None,
        "tool" => ToolChoice::Tool(
            fields::string(choice, at, "name", "Name the tool the model must call.")?.to_string(),
        ),
        _ => {
            return Err(RequestError::invalid_value(
                "tool_choice.type",
                "must be \"auto\", \"any\", \"tool\" or \"none\".",
            ))
        }
    };
    let no_parallel = fields::opt_bool(choice, at, "disable_parallel_tool_use")?.unwrap_or(false);
    Ok((Some(parsed), no_parallel))
}

fn parse_user(body: &Object) -> Result<Option<String>, RequestError> {
    match body.get("metadata") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let metadata = fields::object(v, "metadata")?;
            Ok(fields::opt_string(metadata, "metadata", "user_id")?.map(str::to_string))
        }
    }
}

fn parse_thinking(body: &Object) -> Result<Option<Thinking>, RequestError> {
    let at = "thinking";
    let thinking = match body.get(at) {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => fields::object(v, at)?,
    };
    let kind = fields::string(thinking, at, "type", "Use \"enabled\" or \"disabled\".")?;
    match kind {
        "enabled" => match fields::opt_positive_u32(thinking, at, "budget_tokens")? {
            Some(budget) => Ok(Some(Thinking::Enabled {
                budget_tokens: Some(budget),
            })),
            None => Err(RequestError::missing(
                "thinking.budget_tokens",
                "Give the thinking budget in tokens, e.g. 2048.",
            )),
        },
        "adaptive" => Ok(Some(Thinking::Enabled {
            budget_tokens: None,
        })),
        "disabled" => Ok(Some(Thinking::Disabled)),
        _ => Err(RequestError::invalid_value(
            "thinking.type",
            "must be \"enabled\", \"adaptive\" or \"disabled\".",
        )),
    }
}
