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

use std::borrow::Cow;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::{PromptRules, Tokenizer};

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
pub const RENDERED_JSON: [&str; 3] = ["tools", "functions", "documents"];

/// Top-level fields whose values a chat template may render as text.
pub const TEMPLATE_VARIABLES: [&str; 2] = ["chat_template_kwargs", "chat_template_args"];

/// What a prompt holds, as far as its count goes: messages, media parts, and text measured
/// in tokens (with a tokenizer) or UTF-8 bytes (without). The model's rules turn it into
/// tokens; without a tokenizer nothing in it depends on the model, so a request's tally is
/// taken once, when its body is parsed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    messages: u64,
    media: u64,
    text: u64,
}

impl Tally {
    /// The prompt's tokens under `rules`, whose tokenizer (if any) measured the text.
    pub fn tokens(&self, rules: &PromptRules) -> u64 {
        u64::from(rules.per_request)
            .saturating_add(self.messages.saturating_mul(u64::from(rules.per_message)))
            .saturating_add(self.media.saturating_mul(u64::from(rules.max_image_tokens)))
            .saturating_add(self.text)
    }
}

/// How text is measured: the model's tokenizer, or a token per UTF-8 byte.
#[derive(Clone, Copy)]
pub enum Measure<'t> {
    Bytes,
    Tokens(&'t Tokenizer),
}

impl<'t> Measure<'t> {
    pub fn of(rules: &'t PromptRules) -> Self {
        rules
            .tokenizer
            .as_ref()
            .map_or(Measure::Bytes, Measure::Tokens)
    }

    fn text(self, text: &str) -> u64 {
        match self {
            Measure::Bytes => text.len() as u64,
            Measure::Tokens(t) => t.count(text),
        }
    }
}

/// The top-level fields of a Chat Completions body that a template renders, as written
/// (`None` when absent). The request parser borrows them from the body it parsed.
#[derive(Default)]
pub struct RawPrompt<'a> {
    pub messages: Option<&'a RawValue>,
    /// `RENDERED_JSON`, in that order.
    pub rendered_json: [Option<&'a RawValue>; 3],
    /// `TEMPLATE_VARIABLES`, in that order.
    pub template_variables: [Option<&'a RawValue>; 2],
}

impl RawPrompt<'_> {
    /// The tally of these fields, read from their text without building a tree. Fails only
    /// on text serde_json reads but cannot decode: a lone UTF-16 surrogate in a string, a
    /// number out of range.
    pub fn tally(&self, measure: Measure) -> Result<Tally, serde_json::Error> {
        let mut t = Tallier::new(measure);
        if let Some(m) = self.messages {
            t.walk(
                &mut serde_json::Deserializer::from_str(m.get()),
                Place::Messages,
            )?;
        }
        for raw in self.rendered_json.iter().flatten() {
            if raw.get() != "null" {
                t.json(&serde_json::from_str::<Value>(raw.get())?);
            }
        }
        for raw in self.template_variables.iter().flatten() {
            t.walk(
                &mut serde_json::Deserializer::from_str(raw.get()),
                Place::Value,
            )?;
        }
        Ok(t.tally)
    }
}

/// Counts one request's prompt under a model's rules, from its body as a tree.
pub struct Counter<'r> {
    rules: &'r PromptRules,
}

impl<'r> Counter<'r> {
    pub fn new(rules: &'r PromptRules) -> Self {
        Counter { rules }
    }

    /// The prompt tokens of a Chat Completions body (see the module doc).
    pub fn body(self, body: &Map<String, Value>) -> u64 {
        let mut t = Tallier::new(Measure::of(self.rules));
        // A `Value` always deserializes: the walks below cannot fail.
        if let Some(messages) = body.get("messages") {
            let _ = t.walk(messages, Place::Messages);
        }
        for field in RENDERED_JSON {
            match body.get(field) {
                None | Some(Value::Null) => {}
                Some(v) => t.json(v),
            }
        }
        for field in TEMPLATE_VARIABLES {
            if let Some(v) = body.get(field) {
                let _ = t.walk(v, Place::Value);
            }
        }
        t.tally.tokens(self.rules)
    }
}

/// Walks the fields of a body, adding what they hold to a tally.
struct Tallier<'t> {
    measure: Measure<'t>,
    tally: Tally,
}

impl<'t> Tallier<'t> {
    fn new(measure: Measure<'t>) -> Self {
        Tallier {
            measure,
            tally: Tally::default(),
        }
    }

    fn walk<'de, D: Deserializer<'de>>(&mut self, value: D, place: Place) -> Result<(), D::Error> {
        Walk::new(self, place).deserialize(value).map(drop)
    }

    fn add(&mut self, n: u64) {
        self.tally.text = self.tally.text.saturating_add(n);
    }

    fn text(&mut self, text: &str) {
        self.add(self.measure.text(text));
    }

    /// A number as the template renders it: as serde_json formats it.
    fn number(&mut self, n: serde_json::Number) {
        self.text(&n.to_string());
    }

    /// A value a template renders as JSON.
    fn json(&mut self, value: &Value) {
        self.text(&indented(value));
    }

    /// Arguments as sent, or as the JSON an engine may parse them into and render again,
    /// whichever is longer.
    fn arguments(&mut self, text: &str) {
        let as_sent = self.measure.text(text);
        let rendered = match serde_json::from_str::<Value>(text) {
            Ok(v @ (Value::Object(_) | Value::Array(_))) => self.measure.text(&indented(&v)),
            _ => 0,
        };
        self.add(as_sent.max(rendered));
    }
}

/// Where a value sits in the body, which decides how it counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The `messages` field: an array of messages, else nothing.
    Messages,
    /// One message: its fields, bar `type`; `content` and `tool_calls` as below.
    Message,
    /// A message's `content`: an array of parts, else a value.
    Content,
    /// One content part: a media part reserves the model's maximum; a plain text part is
    /// joined with the others; any other counts as a value.
    Part,
    /// A message's `tool_calls`: an array of calls, else a value.
    ToolCalls,
    /// One tool call: its fields bar `type`, its `function` as below.
    Call,
    /// A call's `function`: `arguments` as sent or rendered, the rest as values.
    Function,
    /// Every string and number, recursively; object keys and `type` values are not text.
    Value,
}

/// What a value turned out to be, for the content array that holds it.
enum Seen<'de> {
    Counted,
    /// A plain text part's text, counted when joined with its neighbours.
    Text(Piece<'de>),
}

/// A text kept for joining: its measure without a tokenizer, else the text itself.
enum Piece<'de> {
    Bytes(u64),
    Text(Cow<'de, str>),
}

/// The text parts of one content array, which engines join with a newline.
struct Joined<'de> {
    parts: u64,
    bytes: u64,
    texts: Vec<Cow<'de, str>>,
}

impl<'de> Joined<'de> {
    fn new() -> Self {
        Joined {
            parts: 0,
            bytes: 0,
            texts: Vec::new(),
        }
    }

    fn push(&mut self, piece: Piece<'de>) {
        self.parts += 1;
        match piece {
            Piece::Bytes(n) => self.bytes = self.bytes.saturating_add(n),
            Piece::Text(t) => self.texts.push(t),
        }
    }

    fn measure(self, measure: Measure) -> u64 {
        match (measure, self.texts.as_slice()) {
            (Measure::Bytes, _) => match self.parts {
                0 => 0,
                n => self.bytes.saturating_add(n - 1),
            },
            (_, []) => 0,
            (m, [one]) => m.text(one),
            (m, many) => m.text(&many.join("\n")),
        }
    }
}

/// A member name, as far as counting tells names apart.
enum Name {
    Type,
    Content,
    ToolCalls,
    Function,
    Arguments,
    Text,
    Media,
    Other,
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Name;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Name, E> {
                Ok(match name {
                    "type" => Name::Type,
                    "content" => Name::Content,
                    "tool_calls" => Name::ToolCalls,
                    "function" => Name::Function,
                    "arguments" => Name::Arguments,
                    "text" => Name::Text,
                    _ if MEDIA.contains(&name) => Name::Media,
                    _ => Name::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// One value at one place, walked once.
struct Walk<'a, 't, 'de> {
    t: &'a mut Tallier<'t>,
    place: Place,
    _de: PhantomData<&'de ()>,
}

impl<'a, 't, 'de> Walk<'a, 't, 'de> {
    fn new(t: &'a mut Tallier<'t>, place: Place) -> Self {
        Walk {
            t,
            place,
            _de: PhantomData,
        }
    }

    fn at(&mut self, place: Place) -> Walk<'_, 't, 'de> {
        Walk::new(self.t, place)
    }

    /// A string anywhere but as a part's `text`.
    fn string(self, text: &str) -> Seen<'de> {
        if self.place != Place::Messages {
            self.t.text(text);
        }
        Seen::Counted
    }

    fn number(self, n: serde_json::Number) -> Seen<'de> {
        if self.place != Place::Messages {
            self.t.number(n);
        }
        Seen::Counted
    }

    /// A content part's members: which keys it has decides how it counts.
    fn part<A: MapAccess<'de>>(self, mut map: A) -> Result<Seen<'de>, A::Error> {
        let (mut fields, mut media) = (0usize, false);
        let mut text: Option<Piece<'de>> = None;
        // What the part counts if it turns out to be neither media nor plain text.
        let mut other = Tallier::new(self.t.measure);
        while let Some(name) = map.next_key::<Name>()? {
            fields += 1;
            match name {
                Name::Media => {
                    media = true;
                    map.next_value::<IgnoredAny>()?;
                }
                _ if media => {
                    map.next_value::<IgnoredAny>()?;
                }
                Name::Type => {
                    map.next_value::<IgnoredAny>()?;
                }
                Name::Text => match map.next_value_seed(Text(self.t.measure))? {
                    TextOr::Text(piece) => text = Some(piece),
                    TextOr::Counted(n) => other.add(n),
                },
                _ => map
                    .next_value_seed(Walk::new(&mut other, Place::Value))
                    .map(drop)?,
            }
        }
        if media {
            self.t.tally.media = self.t.tally.media.saturating_add(1);
            return Ok(Seen::Counted);
        }
        match text {
            Some(piece) if fields <= 2 => return Ok(Seen::Text(piece)),
            Some(Piece::Bytes(n)) => other.add(n),
            Some(Piece::Text(t)) => other.text(&t),
            None => {}
        }
        self.t.add(other.tally.text);
        Ok(Seen::Counted)
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_, '_, 'de> {
    type Value = Seen<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Seen<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_, '_, 'de> {
    type Value = Seen<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Seen<'de>, E> {
        Ok(Seen::Counted)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Seen<'de>, E> {
        Ok(Seen::Counted)
    }

    fn visit_u64<E>(self, n: u64) -> Result<Seen<'de>, E> {
        Ok(self.number(n.into()))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Seen<'de>, E> {
        Ok(self.number(n.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Seen<'de>, E> {
        let n =
            serde_json::Number::from_f64(n).ok_or_else(|| E::custom("a number out of range"))?;
        Ok(self.number(n))
    }

    fn visit_str<E>(self, text: &str) -> Result<Seen<'de>, E> {
        Ok(self.string(text))
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Seen<'de>, A::Error> {
        match self.place {
            Place::Messages => {
                while seq.next_element_seed(self.at(Place::Message))?.is_some() {
                    self.t.tally.messages = self.t.tally.messages.saturating_add(1);
                }
            }
            Place::Content => {
                let mut joined = Joined::new();
                while let Some(seen) = seq.next_element_seed(self.at(Place::Part))? {
                    if let Seen::Text(piece) = seen {
                        joined.push(piece);
                    }
                }
                let n = joined.measure(self.t.measure);
                self.t.add(n);
            }
            Place::ToolCalls => while seq.next_element_seed(self.at(Place::Call))?.is_some() {},
            _ => while seq.next_element_seed(self.at(Place::Value))?.is_some() {},
        }
        Ok(Seen::Counted)
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Seen<'de>, A::Error> {
        match self.place {
            // A `messages` that is not an array holds no messages.
            Place::Messages => {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(Seen::Counted);
            }
            Place::Part => return self.part(map),
            _ => {}
        }
        while let Some(name) = map.next_key::<Name>()? {
            let place = match (self.place, name) {
                (_, Name::Type) => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                (Place::Message, Name::Content) => Place::Content,
                (Place::Message, Name::ToolCalls) => Place::ToolCalls,
                (Place::Call, Name::Function) => Place::Function,
                (Place::Function, Name::Arguments) => {
                    match map.next_value::<Value>()? {
                        Value::String(s) => self.t.arguments(&s),
                        v => self.t.json(&v),
                    }
                    continue;
                }
                _ => Place::Value,
            };
            map.next_value_seed(self.at(place))?;
        }
        Ok(Seen::Counted)
    }
}

/// A content part's `text`: kept for joining if it is a string, counted as a value if not.
struct Text<'t>(Measure<'t>);

enum TextOr<'de> {
    Text(Piece<'de>),
    Counted(u64),
}

impl<'de> DeserializeSeed<'de> for Text<'_> {
    type Value = TextOr<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<TextOr<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Text<'_> {
    type Value = TextOr<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<TextOr<'de>, E> {
        Ok(TextOr::Text(match self.0 {
            Measure::Bytes => Piece::Bytes(text.len() as u64),
            Measure::Tokens(_) => Piece::Text(Cow::Borrowed(text)),
        }))
    }

    fn visit_str<E>(self, text: &str) -> Result<TextOr<'de>, E> {
        Ok(TextOr::Text(match self.0 {
            Measure::Bytes => Piece::Bytes(text.len() as u64),
            Measure::Tokens(_) => Piece::Text(Cow::Owned(text.to_string())),
        }))
    }

    // Anything else counts as the value it is.
    fn visit_unit<E>(self) -> Result<TextOr<'de>, E> {
        Ok(TextOr::Counted(0))
    }

    fn visit_bool<E>(self, _: bool) -> Result<TextOr<'de>, E> {
        Ok(TextOr::Counted(0))
    }

    fn visit_u64<E>(self, n: u64) -> Result<TextOr<'de>, E> {
        Ok(TextOr::Counted(self.0.text(&n.to_string())))
    }

    fn visit_i64<E>(self, n: i64) -> Result<TextOr<'de>, E> {
        Ok(TextOr::Counted(self.0.text(&n.to_string())))
    }

    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<TextOr<'de>, E> {
        let n =
            serde_json::Number::from_f64(n).ok_or_else(|| E::custom("a number out of range"))?;
        Ok(TextOr::Counted(self.0.text(&n.to_string())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<TextOr<'de>, A::Error> {
        let mut t = Tallier::new(self.0);
        Walk::new(&mut t, Place::Value).visit_seq(seq)?;
        Ok(TextOr::Counted(t.tally.text))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TextOr<'de>, A::Error> {
        let mut t = Tallier::new(self.0);
        Walk::new(&mut t, Place::Value).visit_map(map)?;
        Ok(TextOr::Counted(t.tally.text))
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
mod tests;
