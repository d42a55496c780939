//! OpenAI Chat Completions requests: validate what routing needs, keep every other field as is.
//!
//! The body is not rebuilt: the fields tollgate reads are borrowed from it where they lie, and
//! the replica's body is the client's bytes with those few values replaced, so engine
//! extensions (`top_k`, `chat_template_args`, …) and key order reach the replica untouched.

use std::ops::Range;

use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::media::MediaPart;
use super::prompt::{Measure, RawPrompt, Tally};
use super::{PromptBody, RequestError};
use crate::config::PromptRules;

mod messages;
mod parts;

use messages::messages_media;

/// A validated chat completion request.
#[derive(Debug)]
pub struct ChatRequest {
    pub model: String,
    pub stream: bool,
    /// The client asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The body as the client sent it (shared with the buffer it was read into).
    raw: Bytes,
    /// Where the values tollgate may replace lie in `raw` (`null` ones included).
    model_at: Range<usize>,
    stream_options_at: Option<Range<usize>>,
    max_tokens: Option<Cap>,
    max_completion_tokens: Option<Cap>,
    /// The budget clamp: the output cap to send instead of the client's.
    lowered_cap: Option<u64>,
    /// Choices asked for (`n`), each generated up to the output cap.
    pub choices: u32,
    /// The parts that are not text, for the media check.
    pub media: Vec<MediaPart>,
    /// The prompt as a token per byte counts it (see `prompt`), taken as the body is parsed.
    tally: Tally,
}

/// The most choices one request may ask for, as the OpenAI API allows.
pub const MAX_CHOICES: u32 = 128;

/// A client-set output cap field: where its value lies, and the value unless it is `null`.
#[derive(Debug, Clone)]
struct Cap {
    at: Range<usize>,
    value: Option<u64>,
}

/// The top-level fields tollgate reads. Every field is taken as written, `null` included (see
/// `raw`), so that its place in the body is known; all others are skipped.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    model: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    n: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    chat_template: Option<&'a RawValue>,
    // What a template renders besides the messages (`prompt::RENDERED_JSON`,
    // `prompt::TEMPLATE_VARIABLES`), for the prompt's count.
    #[serde(borrow, default, deserialize_with = "raw")]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    functions: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    documents: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    chat_template_kwargs: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    chat_template_args: Option<&'a RawValue>,
}

impl<'a> Fields<'a> {
    /// The fields a chat template renders.
    fn prompt(&self) -> RawPrompt<'a> {
        RawPrompt {
            messages: self.messages,
            rendered_json: [self.tools, self.functions, self.documents],
            template_variables: [self.chat_template_kwargs, self.chat_template_args],
        }
    }
}

#[derive(Deserialize)]
struct StreamOptions<'a> {
    #[serde(borrow, default)]
    include_usage: Option<&'a RawValue>,
}

/// A present field as its JSON text, `null` too (serde would make `null` a `None`).
fn raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn first_byte(v: &RawValue) -> u8 {
    v.get().as_bytes().first().copied().unwrap_or(b' ')
}

fn is_null(v: &RawValue) -> bool {
    v.get() == "null"
}

/// Objects only: anything else is `None`, as a lookup in it would find nothing.
fn object<'a, T: Deserialize<'a>>(v: &'a RawValue) -> Result<Option<T>, RequestError> {
    if first_byte(v) != b'{' {
        return Ok(None);
    }
    serde_json::from_str(v.get())
        .map(Some)
        .map_err(RequestError::invalid_json)
}

fn array(v: &RawValue) -> Result<Option<Vec<&RawValue>>, RequestError> {
    if first_byte(v) != b'[' {
        return Ok(None);
    }
    serde_json::from_str(v.get())
        .map(Some)
        .map_err(RequestError::invalid_json)
}

impl ChatRequest {
    pub fn parse(bytes: &[u8]) -> Result<Self, RequestError> {
        Self::parse_body(Bytes::copy_from_slice(bytes))
    }

    /// `parse`, keeping the body it is given rather than a copy.
    pub fn parse_body(body: Bytes) -> Result<Self, RequestError> {
        let bytes = &body[..];
        // Before any parsing: unknown fields are forwarded unparsed.
        super::structure::check(bytes)?;
        let starts_object = bytes
            .iter()
            .find(|c| !c.is_ascii_whitespace())
            .is_some_and(|&c| c == b'{');
        let fields: Fields = serde_json::from_slice(bytes).map_err(RequestError::invalid_json)?;
        if !starts_object {
            return Err(RequestError::invalid_json("the top level is not an object"));
        }
        if fields.chat_template.is_some_and(|t| !is_null(t)) {
            return Err(RequestError::client_template());
        }
        // Every value borrowed from `bytes`: its place in them.
        let base = bytes.as_ptr() as usize;
        // serde_json borrows every `&RawValue` from `bytes`; checked all the same, as the ranges
        // are used to slice the body later.
        let at = |v: &RawValue| -> Result<Range<usize>, RequestError> {
            let start = (v.get().as_ptr() as usize).wrapping_sub(base);
            let range = start..start.saturating_add(v.get().len());
            match bytes.get(range.clone()) {
                Some(text) if text == v.get().as_bytes() => Ok(range),
                _ => Err(RequestError::invalid_json("a value could not be located")),
            }
        };
        let model_raw = match fields.model {
            Some(m) if first_byte(m) == b'"' => m,
            Some(_) => return Err(RequestError::wrong_type("model", "a string")),
            None => {
                return Err(RequestError::missing(
                    "model",
                    "Name the model to use; GET /v1/models lists them.",
                ))
            }
        };
        let model: String =
            serde_json::from_str(model_raw.get()).map_err(RequestError::invalid_json)?;
        if model.is_empty() {
            return Err(RequestError::missing(
                "model",
                "Name the model to use; GET /v1/models lists them.",
            ));
        }
        let no_messages = || {
            RequestError::missing(
                "messages",
                "Send at least one message, e.g. [{\"role\": \"user\", \"content\": \"Hi\"}].",
            )
        };
        let messages = match fields.messages {
            Some(m) if first_byte(m) == b'[' => m,
            Some(_) => return Err(RequestError::wrong_type("messages", "an array of messages")),
            None => return Err(no_messages()),
        };
        let media = match messages_media(messages) {
            Ok(Some(media)) => media,
            Ok(None) => return Err(no_messages()),
            Err(e) => return Err(e),
        };

        let stream = match fields.stream {
            None => false,
            Some(v) if is_null(v) => false,
            Some(v) => match v.get() {
                "true" => true,
                "false" => false,
                _ => return Err(RequestError::wrong_type("stream", "a boolean")),
            },
        };
        let cap = |field: &str, v: Option<&RawValue>| -> Result<Option<Cap>, RequestError> {
            let Some(v) = v else { return Ok(None) };
            let value = if is_null(v) {
                None
            } else {
                let n = v
                    .get()
                    .parse::<u64>()
                    .ok()
                    .filter(|_| v.get().bytes().all(|c| c.is_ascii_digit()));
                let n = n.ok_or_else(|| RequestError::wrong_type(field, "a positive integer"))?;
                // Engines read 0 as "no cap" and would generate past any reservation.
                if n == 0 {
                    return Err(RequestError::invalid_value(
                        field,
                        "the output cap must be at least 1 token; leave it out for the model's default.",
                    ));
                }
                Some(n)
            };
            Ok(Some(Cap { at: at(v)?, value }))
        };
        let choices = match fields.n {
            None => 1,
            Some(v) if is_null(v) => 1,
            Some(v) => v
                .get()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_CHOICES).contains(n))
                .ok_or_else(|| {
                    RequestError::invalid_value(
                        "n",
                        &format!("n is how many choices to generate: an integer from 1 to {MAX_CHOICES}."),
                    )
                })?,
        };
        let max_tokens = cap("max_tokens", fields.max_tokens)?;
        let max_completion_tokens = cap("max_completion_tokens", fields.max_completion_tokens)?;
        let mut include_usage = false;
        if let Some(o) = fields.stream_options {
            if !is_null(o) {
                let Some(options) = object::<StreamOptions>(o)? else {
                    return Err(RequestError::wrong_type("stream_options", "an object"));
                };
                include_usage = options.include_usage.is_some_and(|v| v.get() == "true");
            }
        }
        // Last: every field it reads has been checked above.
        let tally = fields
            .prompt()
            .tally(Measure::Bytes)
            .map_err(RequestError::invalid_json)?;
        Ok(ChatRequest {
            model,
            stream,
            include_usage,
            model_at: at(model_raw)?,
            stream_options_at: fields.stream_options.map(at).transpose()?,
            max_tokens,
            max_completion_tokens,
            lowered_cap: None,
            choices,
            media,
            tally,
            raw: body.clone(),
        })
    }

    /// Whether the client set both cap fields: engines differ in which one they obey, so
    /// the replica must get the reserved cap in both.
    pub fn sets_both_caps(&self) -> bool {
        [&self.max_completion_tokens, &self.max_tokens]
            .iter()
            .all(|c| c.as_ref().is_some_and(|c| c.value.is_some()))
    }

    /// The output cap the client set: `max_completion_tokens`, else `max_tokens`.
    pub fn max_output_tokens(&self) -> Option<u64> {
        if let Some(n) = self.lowered_cap {
            return Some(n);
        }
        [&self.max_completion_tokens, &self.max_tokens]
            .into_iter()
            .find_map(|c| c.as_ref().and_then(|c| c.value))
    }

    /// Sets the output cap the replica gets (the one reserved at admission): whichever cap
    /// fields the client used, else `max_tokens`.
    pub fn set_max_output_tokens(&mut self, n: u64) {
        self.lowered_cap = Some(n);
    }

    /// The prompt's tokens under a model's rules (see `prompt`): from the tally taken at
    /// parse, or, with a tokenizer, by reading the body again to tokenize its text.
    pub fn prompt_tokens(&self, rules: &PromptRules) -> u64 {
        match rules.tokenizer {
            None => self.tally.tokens(rules),
            Some(_) => prompt_tokens_of(&self.raw, rules).unwrap_or(self.tally.tokens(rules)),
        }
    }

    /// The prompt, owned, for counting it elsewhere (`PromptBody::tokens`).
    pub fn prompt_body(&self) -> PromptBody {
        PromptBody::Chat {
            body: self.raw.to_vec(),
            tally: self.tally,
        }
    }

    /// The body for the replica: the client's bytes with `model` set to what the replica
    /// serves, the output cap set at admission where it differs from the client's, and, when
    /// streaming, the usage chunk always requested (accounting needs it). When none of them
    /// changes a byte, the body is the client's own, uncopied.
    pub fn upstream_body(self, upstream_model: &str) -> Bytes {
        let usage_edit = self.stream && !self.include_usage;
        let same_model = is_quoted(&self.raw[self.model_at.clone()], upstream_model);
        if same_model && self.lowered_cap.is_none() && !usage_edit {
            return self.raw;
        }
        // Serialising a string or a map of `Value`s cannot fail.
        let mut edits: Vec<(Range<usize>, Vec<u8>)> = Vec::with_capacity(3);
        let mut added: Vec<u8> = Vec::new();
        if !same_model {
            edits.push((
                self.model_at.clone(),
                serde_json::to_vec(upstream_model).unwrap_or_default(),
            ));
        }
        if let Some(n) = self.lowered_cap {
            let set: Vec<Range<usize>> = [&self.max_completion_tokens, &self.max_tokens]
                .into_iter()
                .flatten()
                .filter(|c| c.value.is_some())
                .map(|c| c.at.clone())
                .collect();
            if set.is_empty() {
                match &self.max_tokens {
                    // `"max_tokens": null` is there: it takes the value.
                    Some(c) => edits.push((c.at.clone(), n.to_string().into_bytes())),
                    None => added.extend_from_slice(format!("\"max_tokens\":{n},").as_bytes()),
                }
            }
            edits.extend(set.into_iter().map(|at| (at, n.to_string().into_bytes())));
        }
        if usage_edit {
            let usage_on = br#"{"include_usage":true}"#.to_vec();
            match &self.stream_options_at {
                Some(at) => {
                    let options =
                        match serde_json::from_slice::<Map<String, Value>>(&self.raw[at.clone()]) {
                            Ok(mut o) => {
                                o.insert("include_usage".into(), Value::Bool(true));
                                serde_json::to_vec(&o).unwrap_or(usage_on)
                            }
                            // `null`
                            Err(_) => usage_on,
                        };
                    edits.push((at.clone(), options));
                }
                None => added.extend_from_slice(br#""stream_options":{"include_usage":true},"#),
            }
        }
        edits.sort_by_key(|(at, _)| at.start);
        let mut out = Vec::with_capacity(self.raw.len() + added.len() + upstream_model.len() + 16);
        let mut from = 0;
        if !added.is_empty() {
            // Right after the opening brace; the object has members (model, messages), so a
            // trailing comma is always followed by one.
            let brace = self.raw.iter().position(|&c| c == b'{').unwrap_or(0);
            out.extend_from_slice(&self.raw[..=brace]);
            out.extend_from_slice(&added);
            from = brace + 1;
        }
        for (at, value) in edits {
            out.extend_from_slice(&self.raw[from..at.start]);
            out.extend_from_slice(&value);
            from = at.end;
        }
        out.extend_from_slice(&self.raw[from..]);
        out.into()
    }
}

/// Whether `raw` is `text` as JSON writes it: quoted, with nothing to escape.
fn is_quoted(raw: &[u8], text: &str) -> bool {
    raw.len() == text.len() + 2
        && raw.first() == Some(&b'"')
        && raw.last() == Some(&b'"')
        && &raw[1..raw.len() - 1] == text.as_bytes()
        && !text.bytes().any(|c| c == b'"' || c == b'\\' || c < 0x20)
}

/// The prompt's tokens of a chat body that `ChatRequest::parse` accepted, under `rules`;
/// `None` if it is not one. No token of a tokenizer is shorter than a byte, so when a
/// tokenizer's count cannot be had, the count at a token a byte bounds it.
pub fn prompt_tokens_of(body: &[u8], rules: &PromptRules) -> Option<u64> {
    let fields: Fields = serde_json::from_slice(body).ok()?;
    let tally = fields.prompt().tally(Measure::of(rules)).ok()?;
    Some(tally.tokens(rules))
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
    fn the_body_reaches_the_replica_as_sent_but_for_the_values_tollgate_sets() {
        // Spacing, key order, escapes and numbers no float can hold all survive.
        let body = r#" {"top_k": 5, "model" : "a", "messages":[{"role":"user","content":"h\u00e9"}],"x":{"model":"keep"},"seed":123456789012345678901234567890,"t":1.10}"#;
        let req = ChatRequest::parse(body.as_bytes()).unwrap();
        let out = String::from_utf8(req.upstream_body("org/served").to_vec()).unwrap();
        assert_eq!(
            out,
            r#" {"top_k": 5, "model" : "org/served", "messages":[{"role":"user","content":"h\u00e9"}],"x":{"model":"keep"},"seed":123456789012345678901234567890,"t":1.10}"#
        );
    }

    #[test]
    fn a_body_nothing_changes_is_forwarded_uncopied() {
        let body = Bytes::from_static(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#,
        );
        let out = ChatRequest::parse_body(body.clone())
            .unwrap()
            .upstream_body("m");
        assert_eq!(out, body);
        assert_eq!(out.as_ptr(), body.as_ptr());
        // The same name written with an escape is written plainly.
        let req = ChatRequest::parse(br#"{"model":"\u006d","messages":[{"role":"user"}]}"#);
        assert_eq!(
            &req.unwrap().upstream_body("m")[..],
            br#"{"model":"m","messages":[{"role":"user"}]}"#
        );
    }

    #[test]
    fn streams_always_ask_for_usage_and_a_clamp_sets_the_cap_the_client_used() {
        let up = |body: &str, clamp: Option<u64>| {
            let mut req = ChatRequest::parse(body.as_bytes()).unwrap();
            if let Some(n) = clamp {
                req.set_max_output_tokens(n);
            }
            let out: Value = serde_json::from_slice(&req.upstream_body("m")).unwrap();
            out
        };
        let m = r#""model":"m","messages":[{"role":"user"}]"#;
        let out = up(&format!(r#"{{{m},"stream":true}}"#), None);
        assert_eq!(out["stream_options"]["include_usage"], true);
        let out = up(
            &format!(r#"{{{m},"stream":true,"stream_options":{{"x":1}}}}"#),
            None,
        );
        assert_eq!(
            out["stream_options"],
            serde_json::json!({"x": 1, "include_usage": true})
        );
        let out = up(&format!(r#"{{{m},"max_tokens":null}}"#), Some(7));
        assert_eq!(out["max_tokens"], 7);
        let out = up(&format!(r#"{{{m},"max_completion_tokens":90}}"#), Some(7));
        assert_eq!(out["max_completion_tokens"], 7);
        assert!(out.get("max_tokens").is_none());
        let out = up(&format!(r#"{{{m}}}"#), Some(7));
        assert_eq!(out["max_tokens"], 7);
    }

    #[test]
    fn mangled_bodies_are_refused_or_forwarded_as_valid_json() {
        use rand::{Rng, SeedableRng};
        let seeds = [
            r#"{"model":"a","messages":[{"role":"user","content":[{"type":"text","text":"x\"y"}]}],"stream":true,"max_tokens":9}"#,
            r#" { "stream_options" : {"include_usage":false}, "model":"a","messages":[{"role":"u","tool_calls":[{"function":{"arguments":"{}"}}]}],"stream":true,"max_completion_tokens":null}"#,
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"{}[]\",:\\ 0123456789-.enultrfa";
        let mut accepted = 0;
        for i in 0..20_000 {
            let mut body = seeds[i % seeds.len()].as_bytes().to_vec();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..body.len());
                match rng.gen_range(0..3) {
                    0 => body[at] = alphabet[rng.gen_range(0..alphabet.len())],
                    1 => {
                        body.remove(at);
                    }
                    _ => body.insert(at, alphabet[rng.gen_range(0..alphabet.len())]),
                }
                if body.is_empty() {
                    body.push(b'{');
                }
            }
            let Ok(mut req) = ChatRequest::parse(&body) else {
                continue;
            };
            if i % 2 == 0 {
                req.set_max_output_tokens(3);
            }
            let out = req.upstream_body("served");
            let value: Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
                panic!(
                    "{e}: {} -> {}",
                    String::from_utf8_lossy(&body),
                    String::from_utf8_lossy(&out)
                )
            });
            assert_eq!(value["model"], "served");
            accepted += 1;
        }
        // Most mangled bodies are refused; enough must pass to exercise the rewrite.
        assert!(accepted > 1_000, "only {accepted} accepted");
    }

    #[test]
    fn a_repeated_field_is_refused_rather_than_guessed() {
        // Which `model` would the replica read? Refusing is the only safe answer.
        let e = err(r#"{"model":"a","model":"b","messages":[{"role":"user"}]}"#);
        assert_eq!(e.code, "duplicate_key");
        assert_eq!(e.param.as_deref(), Some("model"));
        // Unknown fields too: the replica's parser would pick one of them.
        let e = err(r#"{"model":"a","messages":[{"role":"user"}],"top_k":1,"top_k":50}"#);
        assert_eq!(e.param.as_deref(), Some("top_k"));
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
