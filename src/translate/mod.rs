//! Wire formats: parsing and rewriting client requests. Pure: no I/O, clock or metrics.

pub mod anthropic;
pub mod media;
pub mod openai;
pub mod prefix;
pub mod problem;
pub mod prompt;
pub mod replica_error;
pub mod scan;
pub mod sse;
pub mod structure;
pub mod usage;

use bytes::Bytes;

use crate::config::Model;
use crate::vocab::{echo, Endpoint};

/// Why a request body was refused: always 400, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub message: String,
    /// The offending field, as OpenAI's `param`.
    pub param: Option<String>,
    pub code: &'static str,
}

impl RequestError {
    pub fn invalid_json(detail: impl std::fmt::Display) -> Self {
        // The parser's message can quote the body (`invalid type: string "…"`).
        let detail = detail.to_string();
        RequestError {
            message: format!(
                "The request body is not valid JSON ({}). Send a JSON object.",
                echo(&detail)
            ),
            param: None,
            code: "invalid_json",
        }
    }

    pub fn missing(field: &str, hint: &str) -> Self {
        RequestError {
            message: format!("Missing required parameter: '{field}'. {hint}"),
            param: Some(field.to_string()),
            code: "missing_required_parameter",
        }
    }

    /// A field of the right type whose value is refused; `reason` says how to fix it.
    pub fn invalid_value(field: &str, reason: &str) -> Self {
        RequestError {
            message: format!("Invalid value for '{field}': {reason}"),
            param: Some(field.to_string()),
            code: "invalid_value",
        }
    }

    /// A `chat_template` sent with the request: a template can repeat the prompt any number
    /// of times, so no count made before the replica renders it could bound it.
    pub fn client_template() -> Self {
        RequestError::invalid_value(
            "chat_template",
            "the model's own chat template is used; a template sent with the request could \
             make the prompt longer than any reservation. Leave it out, and pass template \
             variables in chat_template_kwargs.",
        )
    }

    pub fn wrong_type(field: &str, expected: &str) -> Self {
        RequestError {
            message: format!("Invalid type for '{field}': expected {expected}."),
            param: Some(field.to_string()),
            code: "invalid_type",
        }
    }
}

/// Decided from the client's request: how the replica's answer reaches the client.
#[derive(Debug, Clone)]
pub enum ResponsePlan {
    /// An OpenAI client of an OpenAI replica.
    OpenAi {
        /// The client asked for the usage chunk; tollgate always asks the replica for it
        /// and removes it when the client did not.
        wants_usage: bool,
        /// `(served name, client's name)` when they differ: answers carry the client's.
        rename: Option<(String, String)>,
    },
    /// An Anthropic Messages client: the OpenAI answer becomes an Anthropic one.
    Anthropic(anthropic::AnswerPlan),
}

/// A Model API request, understood: what routing needs, and how to build the replica's
/// request and translate its answer.
pub enum ModelRequest {
    Chat(openai::ChatRequest),
    Messages(anthropic::MessagesRequest),
}

impl ModelRequest {
    /// Parses a body sent to `endpoint`: a Messages request for `/v1/messages`, a chat
    /// completion otherwise.
    pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<ModelRequest, RequestError> {
        Ok(match endpoint {
            Endpoint::Messages => ModelRequest::Messages(anthropic::MessagesRequest::parse(bytes)?),
            _ => ModelRequest::Chat(openai::ChatRequest::parse(bytes)?),
        })
    }

    /// `parse`, keeping the body it is given (a chat request forwards it) rather than a copy.
    pub fn parse_body(endpoint: Endpoint, body: Bytes) -> Result<ModelRequest, RequestError> {
        Ok(match endpoint {
            Endpoint::Messages => ModelRequest::Messages(anthropic::MessagesRequest::parse(&body)?),
            _ => ModelRequest::Chat(openai::ChatRequest::parse_body(body)?),
        })
    }

    /// The parts of the prompt that are not text.
    pub fn media(&self) -> &[media::MediaPart] {
        match self {
            ModelRequest::Chat(r) => &r.media,
            ModelRequest::Messages(r) => &r.media,
        }
    }

    pub fn model(&self) -> &str {
        match self {
            ModelRequest::Chat(r) => &r.model,
            ModelRequest::Messages(r) => &r.model,
        }
    }

    pub fn stream(&self) -> bool {
        match self {
            ModelRequest::Chat(r) => r.stream,
            ModelRequest::Messages(r) => r.stream,
        }
    }

    /// The output cap the client set, if any.
    pub fn max_output_tokens(&self) -> Option<u64> {
        match self {
            ModelRequest::Chat(r) => r.max_output_tokens(),
            ModelRequest::Messages(r) => Some(u64::from(r.max_tokens)),
        }
    }

    /// Choices the replica generates, each up to the output cap.
    pub fn choices(&self) -> u64 {
        match self {
            ModelRequest::Chat(r) => u64::from(r.choices),
            ModelRequest::Messages(_) => 1,
        }
    }

    /// Sends the replica `cap` as its output cap, unless the request already carries exactly
    /// that one.
    pub fn cap_output(&mut self, cap: u64) {
        if self.max_output_tokens() != Some(cap) || self.sets_both_caps() {
            self.set_max_output_tokens(cap);
        }
    }

    /// Whether the replica would see two output caps that may differ (see `ChatRequest`).
    fn sets_both_caps(&self) -> bool {
        match self {
            ModelRequest::Chat(r) => r.sets_both_caps(),
            ModelRequest::Messages(_) => false,
        }
    }

    /// Sets the output cap the replica gets to `n` tokens.
    fn set_max_output_tokens(&mut self, n: u64) {
        match self {
            ModelRequest::Chat(r) => r.set_max_output_tokens(n),
            ModelRequest::Messages(r) => r.max_tokens = n.min(u64::from(u32::MAX)) as u32,
        }
    }

    /// The prompt's tokens as `model` counts them: exact with its tokenizer, else an upper
    /// bound; never fewer than its replica will count (see `prompt`). A Messages request is
    /// counted as the Chat Completions body its replica is sent.
    pub fn prompt_tokens(&mut self, model: &Model) -> u64 {
        match self {
            ModelRequest::Chat(r) => r.prompt_tokens(&model.prompt),
            ModelRequest::Messages(_) => self.prompt_body(model).tokens(&model.prompt),
        }
    }

    /// What `model` counts the prompt of (see `prompt_tokens`), owned, for a caller that
    /// counts it elsewhere (a tokenizer on a long prompt takes a while).
    pub fn prompt_body(&mut self, model: &Model) -> PromptBody {
        match self {
            ModelRequest::Chat(r) => r.prompt_body(),
            ModelRequest::Messages(r) => {
                r.tool_images = model.input_modalities.contains(&"image");
                PromptBody::Translated(r.prompt_body(model))
            }
        }
    }

    /// The OpenAI body for `model`'s replicas and the plan for its answer. `message_id`
    /// names an Anthropic answer (`msg_…`); it is chosen by the caller so this stays pure.
    /// `prompt_tokens` is what Anthropic answers report as input when the replica reports
    /// no usage.
    pub fn into_upstream(
        self,
        model: &Model,
        prompt_tokens: u64,
        message_id: impl FnOnce() -> String,
    ) -> (Bytes, ResponsePlan) {
        let upstream_model = model.upstream_model.as_str();
        match self {
            ModelRequest::Chat(r) => {
                let plan = ResponsePlan::OpenAi {
                    wants_usage: r.include_usage,
                    rename: (r.model != upstream_model)
                        .then(|| (upstream_model.to_string(), r.model.clone())),
                };
                (r.upstream_body(upstream_model), plan)
            }
            ModelRequest::Messages(mut r) => {
                // Images a tool returned reach only models that take images (see
                // `MessagesRequest::tool_images`).
                r.tool_images = model.input_modalities.contains(&"image");
                let body = r.to_openai(upstream_model, model.reasoning_switch);
                let plan = ResponsePlan::Anthropic(anthropic::AnswerPlan {
                    id: message_id(),
                    input_estimate: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
                    thinking: r.shows_thinking(),
                    stop_sequences: r.stop_sequences,
                    model: r.model,
                });
                // Serialising a `Value` cannot fail: keys are strings, numbers finite.
                (serde_json::to_vec(&body).unwrap_or_default().into(), plan)
            }
        }
    }
}

/// A request's prompt as its count reads it: a chat body as the client sent it, or a Messages
/// request's translation.
pub enum PromptBody {
    /// With its tally at a token a byte, taken when it was parsed.
    Chat {
        body: Vec<u8>,
        tally: prompt::Tally,
    },
    Translated(serde_json::Map<String, serde_json::Value>),
}

impl PromptBody {
    /// The prompt's tokens under `rules` (see `ModelRequest::prompt_tokens`).
    pub fn tokens(&self, rules: &crate::config::PromptRules) -> u64 {
        match self {
            PromptBody::Chat { body, tally } => match rules.tokenizer {
                None => tally.tokens(rules),
                Some(_) => openai::prompt_tokens_of(body, rules).unwrap_or(tally.tokens(rules)),
            },
            PromptBody::Translated(body) => prompt::Counter::new(rules).body(body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parser_message_quoting_a_huge_value_is_cut() {
        let detail = format!(
            "invalid type: string \"{}\", expected u32",
            "v".repeat(100_000)
        );
        let e = RequestError::invalid_json(detail);
        assert!(e.message.len() < 400, "{}", e.message.len());
        assert!(
            e.message
                .ends_with("… (100037 bytes)). Send a JSON object."),
            "{}",
            &e.message[250..]
        );
    }
}
