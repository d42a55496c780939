//! JSON shapes of the OpenAI chat completion API as vLLM writes them: completions, stream
//! chunks, usage and error bodies.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Value};

use super::generate::{random_alnum, Generation};

/// The last event of every stream.
pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

/// Fields every chunk of one completion repeats.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Envelope {
    pub(crate) fn new(model: &str) -> Envelope {
        Envelope {
            id: format!("chatcmpl-{}", random_alnum(32)),
            created: unix_now(),
            model: model.to_owned(),
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request's prompt tokens, and how many of them the prefix cache held.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PromptUsage {
    pub prompt: u64,
    pub cached: u64,
}

pub(crate) fn usage(prompt: PromptUsage, completion: u64, reasoning: u64) -> Value {
    json!({
        "prompt_tokens": prompt.prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.prompt + completion,
        "prompt_tokens_details": {"cached_tokens": prompt.cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    })
}

/// The `chat.completion` object of a non-streaming answer.
pub(crate) fn completion(env: &Envelope, generation: &Generation, prompt: PromptUsage) -> Value {
    let mut message = json!({"role": "assistant", "content": generation.content_text()});
    if let Some(reasoning) = generation.reasoning_text() {
        message["reasoning_content"] = json!(reasoning);
    }
    if !generation.tool_calls.is_empty() {
        let calls: Vec<Value> = generation
            .tool_calls
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                })
            })
            .collect();
        message["tool_calls"] = json!(calls);
    }
    json!({
        "id": env.id,
        "object": "chat.completion",
        "created": env.created,
        "model": env.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": generation.finish.as_str(),
            "stop_reason": generation.stop_reason,
        }],
        "usage": usage(
            prompt,
            generation.completion_tokens(),
            generation.reasoning_tokens(),
        ),
    })
}

/// What a chunk carries in its `usage` field.
pub(crate) enum ChunkUsage {
    /// Usage was not asked for: no field at all.
    Absent,
    /// Usage comes in a final chunk of its own: `null` until then.
    Null,
    /// Usage so far, on every chunk.
    Running(Value),
}

/// A choice carrying one delta.
pub(crate) fn delta_choice(delta: Value) -> Value {
    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null})
}

/// The choice that ends a stream.
pub(crate) fn finish_choice(generation: &Generation) -> Value {
    json!({
        "index": 0,
        "delta": {},
        "logprobs": null,
        "finish_reason": generation.finish.as_str(),
        "stop_reason": generation.stop_reason,
    })
}

/// A `chat.completion.chunk` with one choice.
pub(crate) fn chunk(env: &Envelope, choice: Value, usage: &ChunkUsage) -> Value {
    let mut chunk = json!({
        "id": env.id,
        "object": "chat.completion.chunk",
        "created": env.created,
        "model": env.model,
        "choices": [choice],
    });
    match usage {
        ChunkUsage::Absent => {}
        ChunkUsage::Null => chunk["usage"] = Value::Null,
        ChunkUsage::Running(u) => chunk["usage"] = u.clone(),
    }
    chunk
}

/// The final chunk of `stream_options.include_usage`: no choices, just usage.
pub(crate) fn usage_chunk(env: &Envelope, usage: Value) -> Value {
    json!({
        "id": env.id,
        "object": "chat.completion.chunk",
        "created": env.created,
        "model": env.model,
        "choices": [],
        "usage": usage,
    })
}

/// One server-sent event.
pub(crate) fn sse(event: &Value) -> Bytes {
    Bytes::from(format!("data: {event}\n\n"))
}

/// An OpenAI-shaped error body.
pub(crate) fn error(message: &str, kind: &str, param: Option<&str>, code: u16) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_usage_field_follows_the_request() {
        let env = Envelope::new("m");
        let choice = || delta_choice(json!({"content": "x"}));
        assert!(chunk(&env, choice(), &ChunkUsage::Absent)
            .get("usage")
            .is_none());
        assert_eq!(
            chunk(&env, choice(), &ChunkUsage::Null)["usage"],
            Value::Null
        );
        let prompt = PromptUsage {
            prompt: 3,
            cached: 2,
        };
        let running = ChunkUsage::Running(usage(prompt, 2, 1));
        let usage = &chunk(&env, choice(), &running)["usage"];
        assert_eq!(usage["total_tokens"], 5);
        assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 2);
        assert!(env.id.starts_with("chatcmpl-"));
    }

    #[test]
    fn events_are_framed() {
        assert_eq!(&sse(&json!({"a": 1}))[..], b"data: {\"a\":1}\n\n");
        let e = error("no", "BadRequestError", None, 400);
        assert_eq!(e["error"]["code"], 400);
        assert_eq!(e["error"]["param"], Value::Null);
    }
}
