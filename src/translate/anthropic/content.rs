//! Messages and content blocks of a Messages request: validated into types that hold only
//! what the replica can be sent.

use serde_json::Value;

use super::fields::{self, Object};
use crate::translate::media::{fetched_url, MediaPart, Modality};
use crate::translate::RequestError;
use crate::vocab::echo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone)]
pub(super) struct Message {
    pub role: Role,
    /// A string `content` is one `Text` block. `thinking` and `redacted_thinking` blocks
    /// are already gone: OpenAI history has no place for them and engines reject them.
    pub blocks: Vec<Block>,
}

#[derive(Debug, Clone)]
pub(super) enum Block {
    Text(String),
    Image(Image),
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        parts: Vec<ResultPart>,
        is_error: bool,
    },
}

#[derive(Debug, Clone)]
pub(super) enum Image {
    Base64 { media_type: String, data: String },
    Url(String),
}

impl Image {
    /// The image at `at` as the media check reads it.
    fn media_part(&self, at: &str, optional: bool) -> MediaPart {
        MediaPart {
            at: at.to_string(),
            part_type: "image",
            modality: Modality::Image,
            url: match self {
                Image::Base64 { .. } => None,
                Image::Url(url) => fetched_url(url),
            },
            optional,
        }
    }
}

/// One piece of a `tool_result`'s content.
#[derive(Debug, Clone)]
pub(super) enum ResultPart {
    Text(String),
    /// An image. OpenAI tool messages carry text only: it travels in the user message that
    /// follows the turn's tool messages.
    Image(Image),
}

const BLOCK_TYPES: &str =
    "\"text\", \"image\", \"tool_use\", \"tool_result\", \"thinking\" or \"redacted_thinking\"";

/// `messages`: non-empty. Consecutive messages of one role become one turn, as the
/// Messages API combines them. A final assistant message is a prefill the answer continues;
/// it may hold text only, since a tool call there would have no result to follow it.
pub(super) fn parse_messages(
    body: &Object,
    media: &mut Vec<MediaPart>,
) -> Result<Vec<Message>, RequestError> {
    let hint = "Send at least one message, e.g. [{\"role\": \"user\", \"content\": \"Hello\"}].";
    let items = fields::opt_array(body, "", "messages", "an array of messages")?
        .filter(|items| !items.is_empty())
        .ok_or_else(|| RequestError::missing("messages", hint))?;
    let mut messages: Vec<Message> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("messages[{i}]");
        let obj = fields::object(item, &at)?;
        let role =
            match fields::string(obj, &at, "role", "Use \"user\" or \"assistant\".")? {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "system" => return Err(RequestError::invalid_value(
                    &format!("{at}.role"),
                    "the system prompt goes in the top-level \"system\" field, not in messages.",
                )),
                _ => {
                    return Err(RequestError::invalid_value(
                        &format!("{at}.role"),
                        "must be \"user\" or \"assistant\".",
                    ))
                }
            };
        let blocks = parse_content(obj, &at, role, media)?;
        match messages.last_mut() {
            Some(last) if last.role == role => last.blocks.extend(blocks),
            _ => messages.push(Message { role, blocks }),
        }
    }
    let last = messages.last().filter(|m| m.role == Role::Assistant);
    if last.is_some_and(|m| m.blocks.iter().any(|b| matches!(b, Block::ToolUse { .. }))) {
        return Err(RequestError::invalid_value(
            &format!("messages[{}].content", items.len() - 1),
            "the conversation ends with a tool_use block that has no result; add a user \
             message with a tool_result block for it (a final assistant message may hold \
             only text to continue).",
        ));
    }
    Ok(messages)
}

fn parse_content(
    obj: &Object,
    at: &str,
    role: Role,
    media: &mut Vec<MediaPart>,
) -> Result<Vec<Block>, RequestError> {
    let key = fields::path(at, "content");
    match obj.get("content") {
        Some(Value::String(text)) => Ok(vec![Block::Text(text.clone())]),
        Some(Value::Array(items)) => {
            let mut blocks = Vec::with_capacity(items.len());
            for (j, item) in items.iter().enumerate() {
                if let Some(block) = parse_block(item, &format!("{key}[{j}]"), role, media)? {
                    blocks.push(block);
                }
            }
            Ok(blocks)
        }
        None | Some(Value::Null) => Err(RequestError::missing(
            &key,
            "Send a string or an array of content blocks.",
        )),
        Some(_) => Err(RequestError::wrong_type(
            &key,
            "a string or an array of content blocks",
        )),
    }
}

/// One block; `None` for thinking blocks, which are dropped.
fn parse_block(
    item: &Value,
    at: &str,
    role: Role,
    media: &mut Vec<MediaPart>,
) -> Result<Option<Block>, RequestError> {
    let obj = fields::object(item, at)?;
    let kind = fields::string(obj, at, "type", &format!("Use one of {BLOCK_TYPES}."))?;
    let only_in = |wanted: Role, what: &str| {
        if role == wanted {
            Ok(())
        } else {
            Err(RequestError::invalid_value(&fields::path(at, "type"), what))
        }
    };
    let block = match kind {
        "text" => Block::Text(text(obj, at)?),
        "image" => {
            only_in(
                Role::User,
                "image blocks are only allowed in user messages.",
            )?;
            let image = parse_image(obj, at)?;
            media.push(image.media_part(at, false));
            Block::Image(image)
        }
        "tool_use" => {
            only_in(
                Role::Assistant,
                "tool_use blocks belong in assistant messages.",
            )?;
            let input = match obj.get("input") {
                None | Some(Value::Null) => Value::Object(Object::new()),
                Some(v @ Value::Object(_)) => v.clone(),
                Some(_) => {
                    return Err(RequestError::wrong_type(
                        &fields::path(at, "input"),
                        "an object",
                    ))
                }
            };
            Block::ToolUse {
                id: fields::string(obj, at, "id", "Give the id the tool call was made with.")?
                    .into(),
                name: fields::string(obj, at, "name", "Name the tool that was called.")?.into(),
                input,
            }
        }
        "tool_result" => {
            only_in(Role::User, "tool_result blocks belong in user messages.")?;
            Block::ToolResult {
                tool_use_id: fields::string(
                    obj,
                    at,
                    "tool_use_id",
                    "Give the id of the tool_use block this answers.",
                )?
                .into(),
                parts: parse_result_content(obj, at, media)?,
                is_error: fields::opt_bool(obj, at, "is_error")?.unwrap_or(false),
            }
        }
        "thinking" | "redacted_thinking" => return Ok(None),
        "document" => {
            return Err(RequestError::invalid_value(
                &fields::path(at, "type"),
                "document blocks are not supported; send the document's text as a text block.",
            ))
        }
        _ => {
            return Err(RequestError::invalid_value(
                &fields::path(at, "type"),
                &format!(
                    "unsupported content block type \"{}\"; use one of {BLOCK_TYPES}.",
                    echo(kind)
                ),
            ))
        }
    };
    Ok(Some(block))
}

fn text(obj: &Object, at: &str) -> Result<String, RequestError> {
    Ok(fields::string(obj, at, "text", "A text block needs its \"text\".")?.to_string())
}

fn parse_image(obj: &Object, at: &str) -> Result<Image, RequestError> {
    let at = fields::path(at, "source");
    let source = match obj.get("source") {
        Some(v) if !v.is_null() => fields::object(v, &at)?,
        _ => {
            return Err(RequestError::missing(
                &at,
                "Give {\"type\": \"base64\", \"media_type\", \"data\"} or {\"type\": \"url\", \"url\"}.",
            ))
        }
    };
    match fields::string(source, &at, "type", "Use \"base64\" or \"url\".")? {
        "base64" => Ok(Image::Base64 {
            media_type: fields::string(source, &at, "media_type", "e.g. \"image/png\".")?.into(),
            data: fields::string(source, &at, "data", "The base64-encoded image.")?.into(),
        }),
        "url" => Ok(Image::Url(
            fields::string(source, &at, "url", "The image's URL.")?.into(),
        )),
        _ => Err(RequestError::invalid_value(
            &fields::path(&at, "type"),
            "image sources must be \"base64\" or \"url\"; uploaded files are not supported.",
        )),
    }
}

/// `tool_result.content`: absent, a string, or text and image blocks.
fn parse_result_content(
    obj: &Object,
    at: &str,
    media: &mut Vec<MediaPart>,
) -> Result<Vec<ResultPart>, RequestError> {
    let key = fields::path(at, "content");
    let items = match obj.get("content") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => return Ok(vec![ResultPart::Text(s.clone())]),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(RequestError::wrong_type(
                &key,
                "a string or an array of text and image blocks",
            ))
        }
    };
    let mut parts = Vec::with_capacity(items.len());
    for (k, item) in items.iter().enumerate() {
        let at = format!("{key}[{k}]");
        let block = fields::object(item, &at)?;
        match fields::string(block, &at, "type", "Use \"text\" or \"image\".")? {
            "text" => parts.push(ResultPart::Text(text(block, &at)?)),
            "image" => {
                let image = parse_image(block, &at)?;
                // A text-only model gets a marker in its place (see `upstream`).
                media.push(image.media_part(&at, true));
                parts.push(ResultPart::Image(image));
            }
            other => {
                return Err(RequestError::invalid_value(
                    &fields::path(&at, "type"),
                    &format!(
                        "tool results may hold \"text\" and \"image\" blocks, not \"{}\".",
                        echo(other)
                    ),
                ))
            }
        }
    }
    Ok(parts)
}
