//! The messages of a chat request: each one checked (an object with a string `role`) and
//! its content parts' media gathered, in one pass over the array.

use serde::de::value::MapAccessDeserializer;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::parts::{part_media, Part};
use super::{array, first_byte, object, raw};
use crate::translate::media::MediaPart;
use crate::translate::RequestError;

/// A message's `role`, checked, and its content, for its media parts.
#[derive(Deserialize)]
pub(super) struct Message<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    role: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// Checks each message of `messages` (an array) and gathers its media parts, in one pass
/// over them; `None` when there is none. Messages this pass cannot read (a number out of
/// range or a lone surrogate where a message should be) are checked again by
/// `messages_media_apart`, which names the element as the parse always did.
pub(super) fn messages_media(messages: &RawValue) -> Result<Option<Vec<MediaPart>>, RequestError> {
    let mut de = serde_json::Deserializer::from_str(messages.get());
    match de.deserialize_seq(MessagesVisitor) {
        Ok(Ok(media)) => Ok(media),
        Ok(Err(e)) => Err(e),
        Err(_) => messages_media_apart(messages),
    }
}

/// The same as `messages_media`, each message read again from its own text.
fn messages_media_apart(messages: &RawValue) -> Result<Option<Vec<MediaPart>>, RequestError> {
    let list = array(messages)?.unwrap_or_default();
    if list.is_empty() {
        return Ok(None);
    }
    let mut media = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let message = object::<Message>(m)?;
        check_message(i, message.as_ref(), &mut media)?;
    }
    Ok(Some(media))
}

/// Message `i` (`None`: not an object) has a role, and its content parts' media are fine.
fn check_message(
    i: usize,
    message: Option<&Message>,
    media: &mut Vec<MediaPart>,
) -> Result<(), RequestError> {
    let Some(message) = message else {
        return Err(RequestError::wrong_type(
            &format!("messages[{i}]"),
            "an object",
        ));
    };
    match message.role {
        Some(r) if first_byte(r) == b'"' => {}
        Some(_) => {
            return Err(RequestError::wrong_type(
                &format!("messages[{i}].role"),
                "a string",
            ))
        }
        None => {
            return Err(RequestError::missing(
                &format!("messages[{i}].role"),
                "Each message needs a role such as \"user\".",
            ))
        }
    }
    if let Some(parts) = message.content.map(array).transpose()?.flatten() {
        for (j, p) in parts.into_iter().enumerate() {
            let Some(part) = object::<Part>(p)? else {
                continue;
            };
            part_media(&part, &format!("messages[{i}].content[{j}]"), media)?;
        }
    }
    Ok(())
}

/// Reads `messages`, checking each message as it comes; the first refusal ends the checks
/// (the rest of the array is stepped over).
struct MessagesVisitor;

impl<'de> Visitor<'de> for MessagesVisitor {
    type Value = Result<Option<Vec<MediaPart>>, RequestError>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut media = Vec::new();
        let mut i = 0;
        while let Some(element) = seq.next_element::<Element>()? {
            let message = match &element {
                Element::Message(m) => Some(m),
                Element::Other => None,
            };
            if let Err(e) = check_message(i, message, &mut media) {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                return Ok(Err(e));
            }
            i += 1;
        }
        Ok(Ok((i > 0).then_some(media)))
    }
}

/// An element of `messages`: a message, or any value that is not an object.
enum Element<'a> {
    Message(Message<'a>),
    Other,
}

impl<'de> Deserialize<'de> for Element<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Element<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Element<'de>, A::Error> {
                Message::deserialize(MapAccessDeserializer::new(map)).map(Element::Message)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Element::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Element<'de>, E> {
                Ok(Element::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Element<'de>, E> {
                Ok(Element::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Element<'de>, E> {
                Ok(Element::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Element<'de>, E> {
                Ok(Element::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Element<'de>, E> {
                Ok(Element::Other)
            }
            fn visit_unit<E>(self) -> Result<Element<'de>, E> {
                Ok(Element::Other)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_pass_and_the_pass_per_message_agree() {
        let lists = [
            r#"[]"#,
            r#"[{"role":"user","content":"hi"}]"#,
            r#"[{"role":"user"},{"content":"x"}]"#,
            r#"[{"role":7}]"#,
            r#"[{"role":"user"},"text",{"role":"user"}]"#,
            r#"[null]"#,
            r#"[[1,{"a":2}],{"role":"user"}]"#,
            r#"[true]"#,
            r#"[{"role":"user"},-3]"#,
            r#"[{"role":"user"},2.5]"#,
            // Beyond what the one pass reads: the pass per message names the element.
            r#"[1e400]"#,
            r#"[{"role":"user"},"\ud800"]"#,
            r#"[{"role":"user","\ud800":1}]"#,
            r#"[{"role":null},1e400]"#,
            r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://x/a.png"}},"t",{"type":"text","text":"b"}]}]"#,
            r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"ftp://x"}}]}]"#,
            r#"[{"role":"user","content":[{"type":"mystery"}]},{"role":"user"}]"#,
        ];
        for list in lists {
            let raw: &RawValue = serde_json::from_str(list).unwrap();
            let one = messages_media(raw).map(|m| m.map(|m| format!("{m:?}")));
            let apart = messages_media_apart(raw).map(|m| m.map(|m| format!("{m:?}")));
            assert_eq!(one, apart, "{list}");
        }
        let raw: &RawValue = serde_json::from_str(r#"[{"role":"user"},"x"]"#).unwrap();
        let e = messages_media(raw).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[1]"));
        let raw: &RawValue = serde_json::from_str(r#"[1e400]"#).unwrap();
        let e = messages_media(raw).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0]"));
    }
}
