//! What happens to the replica's response body on its way to the client: relayed event by
//! event (usage chunk removed when the client did not ask, model renamed), translated event by
//! event, or collected and rendered whole. Every path feeds `Observed` for accounting.

use bytes::{Bytes, BytesMut};
use prometheus::Histogram;

use super::observe::Observed;
use crate::translate::anthropic::{self, StreamTranslator};
use crate::translate::sse::{self, EventRef, SseFramer};
use crate::translate::{problem, replica_error, scan, ResponsePlan};
use crate::vocab::{Dialect, Problem};

/// A replica answer larger than this is not collected (a chat completion is kilobytes; this
/// only bounds memory against a misbehaving replica).
const MAX_COLLECTED_BYTES: usize = 32 * 1024 * 1024;

/// Room beyond a chunk's length for what relaying it adds (a `data: ` the replica wrote
/// without its space, say).
const EVENT_SLACK: usize = 16;

pub(super) struct Transcoder {
    mode: Mode,
    pub observed: Observed,
    /// What the chunks taken since the last `take_output` produced for the client. Empty,
    /// without capacity, between writes: a stream that waits for its next token holds no
    /// output buffer.
    out: Vec<u8>,
}

enum Mode {
    /// An OpenAI stream for an OpenAI client, event by event.
    OpenAiStream {
        framer: SseFramer,
        strip_usage: bool,
        rename: Option<Rename>,
    },
    /// Collected whole, then rendered.
    Collect { buf: BytesMut, then: Collected },
    /// An OpenAI stream turned into Anthropic events as each upstream event completes.
    AnthropicStream {
        framer: SseFramer,
        translator: Box<StreamTranslator>,
    },
}

enum Collected {
    OpenAiMessage {
        rename: Option<Rename>,
    },
    AnthropicMessage(anthropic::AnswerPlan),
    /// A replica's error answer, rewritten in the client's dialect.
    ReplicaError {
        status: u16,
        dialect: Dialect,
    },
}

impl Transcoder {
    pub fn new(
        plan: &ResponsePlan,
        status: u16,
        sse: bool,
        inter_token: Option<Histogram>,
    ) -> Self {
        let mode = match plan {
            _ if status >= 400 => Mode::Collect {
                buf: BytesMut::new(),
                then: Collected::ReplicaError {
                    status,
                    dialect: match plan {
                        ResponsePlan::OpenAi { .. } => Dialect::OpenAi,
                        ResponsePlan::Anthropic(_) => Dialect::Anthropic,
                    },
                },
            },
            ResponsePlan::OpenAi {
                wants_usage,
                rename,
            } if sse => Mode::OpenAiStream {
                framer: SseFramer::new(),
                strip_usage: !wants_usage,
                rename: rename.as_ref().map(Rename::new),
            },
            ResponsePlan::OpenAi { rename, .. } => Mode::Collect {
                buf: BytesMut::new(),
                then: Collected::OpenAiMessage {
                    rename: rename.as_ref().map(Rename::new),
                },
            },
            ResponsePlan::Anthropic(answer) if sse => Mode::AnthropicStream {
                framer: SseFramer::new(),
                translator: Box::new(StreamTranslator::new(answer.clone())),
            },
            ResponsePlan::Anthropic(answer) => Mode::Collect {
                buf: BytesMut::new(),
                then: Collected::AnthropicMessage(answer.clone()),
            },
        };
        Transcoder {
            mode,
            observed: Observed::new(inter_token),
            out: Vec::new(),
        }
    }

    /// Whether the response header goes out before the body (so the status is final early).
    pub fn streams(&self) -> bool {
        !matches!(self.mode, Mode::Collect { .. })
    }

    /// The content type of what the client receives, when it differs from the replica's.
    pub fn content_type(&self) -> Option<&'static str> {
        match self.mode {
            Mode::OpenAiStream { .. } => None,
            Mode::AnthropicStream { .. } => Some("text/event-stream"),
            Mode::Collect { .. } => Some("application/json"),
        }
    }

    /// About `n` more bytes are coming before the next `take_output`: room for what they
    /// produce is made once, rather than the output growing (and being copied) piece by piece.
    pub fn expect(&mut self, n: usize) {
        match &mut self.mode {
            Mode::Collect { buf, .. } => buf.reserve(n.min(MAX_COLLECTED_BYTES)),
            // The slack is `on_chunk`'s, so that its own reserve finds the room there.
            Mode::OpenAiStream { .. } | Mode::AnthropicStream { .. } => {
                self.out.reserve(n + EVENT_SLACK)
            }
        }
    }

    /// Takes one upstream chunk. What it produces for the client is kept until
    /// `take_output`, so that chunks read together leave in one write.
    pub fn on_chunk(&mut self, chunk: &[u8]) -> Result<(), String> {
        let observed = &mut self.observed;
        let out = &mut self.out;
        match &mut self.mode {
            Mode::Collect { buf, then } => {
                if buf.len() + chunk.len() > MAX_COLLECTED_BYTES {
                    // Of an error, the start is enough: its message is cut far shorter.
                    if matches!(then, Collected::ReplicaError { .. }) {
                        let room = MAX_COLLECTED_BYTES - buf.len();
                        buf.extend_from_slice(&chunk[..room.min(chunk.len())]);
                        return Ok(());
                    }
                    return Err("the replica's answer is too large".into());
                }
                buf.extend_from_slice(chunk);
                Ok(())
            }
            Mode::OpenAiStream {
                framer,
                strip_usage,
                rename,
            } => {
                framer.push(chunk);
                out.reserve(chunk.len() + EVENT_SLACK);
                while let Some(event) = framer.next_event_ref().map_err(|e| e.to_string())? {
                    relay_openai_event(observed, &event, *strip_usage, rename.as_ref(), out);
                }
                Ok(())
            }
            Mode::AnthropicStream { framer, translator } => {
                framer.push(chunk);
                while let Some(event) = framer.next_event_ref().map_err(|e| e.to_string())? {
                    observed.event(event.data.as_bytes());
                    translator.on_data(event.data, out);
                }
                Ok(())
            }
        }
    }

    /// What the chunks taken since the last call produced for the client, if anything.
    pub fn take_output(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.out)))
    }

    /// The upstream body ended: the rest to send (for `Collect`, the whole body).
    pub fn on_end(&mut self) -> Result<Bytes, String> {
        let observed = &mut self.observed;
        observed.next_read();
        // Whatever the last chunks produced and was not taken yet goes first.
        let mut out = std::mem::take(&mut self.out);
        match &mut self.mode {
            Mode::OpenAiStream {
                framer,
                strip_usage,
                rename,
            } => {
                if let Some(event) = framer.finish_ref().map_err(|e| e.to_string())? {
                    relay_openai_event(observed, &event, *strip_usage, rename.as_ref(), &mut out);
                }
                Ok(Bytes::from(out))
            }
            Mode::Collect { buf, then } => {
                observed.body(buf);
                match then {
                    Collected::OpenAiMessage { rename } => Ok(match rename {
                        Some(r) => Bytes::from(r.apply(buf).unwrap_or_else(|| buf.to_vec())),
                        None => std::mem::take(buf).freeze(),
                    }),
                    Collected::AnthropicMessage(answer) => {
                        anthropic::message_from_openai(buf, answer)
                            .map(Bytes::from)
                            .map_err(|e| e.message)
                    }
                    Collected::ReplicaError { status, dialect } => {
                        Ok(Bytes::from(replica_error::body(*dialect, *status, buf)))
                    }
                }
            }
            Mode::AnthropicStream { framer, translator } => {
                if let Some(event) = framer.finish_ref().map_err(|e| e.to_string())? {
                    observed.event(event.data.as_bytes());
                    translator.on_data(event.data, &mut out);
                }
                translator.end_of_body(&mut out);
                Ok(Bytes::from(out))
            }
        }
    }

    /// The replica failed after the header went out: the event that ends the stream in the
    /// client's dialect, or `None` when the body can only be cut (not an event stream).
    pub fn on_fail(&mut self, p: &Problem) -> Option<Bytes> {
        match &mut self.mode {
            Mode::OpenAiStream { .. } => Some(problem::event(Dialect::OpenAi, p)),
            Mode::Collect { .. } => None,
            Mode::AnthropicStream { translator, .. } => {
                let mut out = Vec::new();
                translator.fail(problem::anthropic_type(p), &p.message, &mut out);
                Some(Bytes::from(out))
            }
        }
    }
}

/// Observes one upstream event and re-emits it for an OpenAI client: the usage-only chunk is
/// dropped when the client did not ask for it, and the model carries the client's name.
fn relay_openai_event(
    observed: &mut Observed,
    event: &EventRef<'_>,
    strip_usage: bool,
    rename: Option<&Rename>,
    out: &mut Vec<u8>,
) {
    let bytes = event.data.as_bytes();
    let reports_usage = observed.event(bytes);
    // Only an event that reported usage can be the usage-only one: the others are not
    // searched for empty choices.
    if strip_usage && reports_usage && no_choices(bytes) {
        return;
    }
    match rename.and_then(|r| r.find(bytes).map(|at| (r, at))) {
        Some((r, at)) => {
            out.extend_from_slice(b"data: ");
            r.write(out, bytes, at);
            out.extend_from_slice(b"\n\n");
        }
        None => sse::write_data_event(out, event),
    }
}

/// Of an event that reported usage: whether it is the final chunk vLLM and SGLang send for
/// `include_usage`, with no choices, only usage.
fn no_choices(data: &[u8]) -> bool {
    scan::is_empty_array(data, &scan::CHOICES)
}

/// Replaces the top-level `"model": "<served name>"` with the client's model name.
struct Rename {
    from: Vec<u8>,
    to: Vec<u8>,
}

impl Rename {
    fn new((served, client): &(String, String)) -> Self {
        // JSON-quoted forms, so names with quotes or backslashes match as they are on the wire.
        let quote = |s: &str| serde_json::to_vec(s).unwrap_or_default();
        Rename {
            from: quote(served),
            to: quote(client),
        }
    }

    /// The JSON with its first `"model"` key's value renamed, or `None` when it is not there.
    fn apply(&self, json: &[u8]) -> Option<Vec<u8>> {
        let at = self.find(json)?;
        let mut out = Vec::with_capacity(json.len() + self.to.len());
        self.write(&mut out, json, at);
        Some(out)
    }

    /// Where the served name stands as the first `"model"` key's value.
    fn find(&self, json: &[u8]) -> Option<usize> {
        let at = scan::value_start(json, &scan::MODEL)?;
        json[at..].starts_with(&self.from).then_some(at)
    }

    /// Appends `json` with the served name at `at` (from `find`) replaced.
    fn write(&self, out: &mut Vec<u8>, json: &[u8], at: usize) {
        out.extend_from_slice(&json[..at]);
        out.extend_from_slice(&self.to);
        out.extend_from_slice(&json[at + self.from.len()..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_name_is_replaced_by_the_clients() {
        let r = Rename::new(&("served-model".into(), "org/model".into()));
        let out = r
            .apply(br#"{"id":"x","model": "served-model","choices":[]}"#)
            .unwrap();
        assert_eq!(
            out,
            br#"{"id":"x","model": "org/model","choices":[]}"#.to_vec()
        );
        assert!(r.apply(br#"{"model":"other"}"#).is_none());
    }

    #[test]
    fn only_the_usage_only_chunk_is_dropped() {
        let relayed = |data: &str| {
            let mut out = Vec::new();
            let event = EventRef {
                event: None,
                data,
                one_line: true,
            };
            relay_openai_event(&mut Observed::new(None), &event, true, None, &mut out);
            !out.is_empty()
        };
        assert!(!relayed(
            r#"{"choices": [], "usage": {"prompt_tokens": 1}}"#
        ));
        assert!(relayed(
            r#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}"#
        ));
        assert!(relayed(r#"{"choices":[],"usage":null}"#));
        assert!(relayed(r#"{"choices":[],"usage":{"prompt_tokens":"x"}}"#));
    }
}
