//! Content parts of a chat message: which ones carry images, audio, video or files, and
//! the URLs a replica would fetch for them.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{first_byte, is_null, raw};
use crate::translate::media::{fetched_url, MediaPart, Modality};
use crate::translate::RequestError;
use crate::vocab::echo;

/// A content part: its type and every key that carries media. Engines infer a
/// part's type from these keys when `type` is missing (vLLM does), so each one present is
/// checked, whatever `type` says.
#[derive(Deserialize)]
pub(super) struct Part<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    image_url: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    image_embeds: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    input_audio: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    audio_url: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    audio_embeds: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    video_url: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    file: Option<&'a RawValue>,
}

/// Content part types: OpenAI's, and the media types vLLM and SGLang add. Any other is
/// refused, since an engine may fetch what an unknown part names.
const PART_TYPES: &[(&str, Option<Modality>)] = &[
    ("text", None),
    ("refusal", None),
    ("image_url", Some(Modality::Image)),
    ("image_embeds", Some(Modality::Image)),
    ("input_audio", Some(Modality::Audio)),
    ("audio_url", Some(Modality::Audio)),
    ("audio_embeds", Some(Modality::Audio)),
    ("video_url", Some(Modality::Video)),
    ("file", Some(Modality::File)),
];

impl<'a> Part<'a> {
    /// The media keys present: (key, its modality, whether it holds a URL, its value).
    fn media(&self) -> [(&'static str, Modality, bool, Option<&'a RawValue>); 7] {
        [
            ("image_url", Modality::Image, true, self.image_url),
            ("image_embeds", Modality::Image, false, self.image_embeds),
            ("input_audio", Modality::Audio, false, self.input_audio),
            ("audio_url", Modality::Audio, true, self.audio_url),
            ("audio_embeds", Modality::Audio, false, self.audio_embeds),
            ("video_url", Modality::Video, true, self.video_url),
            ("file", Modality::File, false, self.file),
        ]
    }
}

#[derive(Deserialize)]
struct MediaUrl<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    url: Option<&'a RawValue>,
}

/// The non-text inputs of part `p` at `at`, each once, into `out`.
pub(super) fn part_media(
    part: &Part,
    at: &str,
    out: &mut Vec<MediaPart>,
) -> Result<(), RequestError> {
    let named = match part.kind {
        None => None,
        Some(k) if is_null(k) => None,
        Some(k) => {
            let kind: Cow<str> = match serde_json::from_str(k.get()) {
                Ok(kind) => kind,
                Err(_) => return Err(RequestError::wrong_type(&format!("{at}.type"), "a string")),
            };
            match PART_TYPES.iter().find(|(name, _)| *name == kind) {
                Some(&(name, modality)) => modality.map(|m| (name, m)),
                None => {
                    let known: Vec<&str> = PART_TYPES.iter().map(|(n, _)| *n).collect();
                    return Err(RequestError::invalid_value(
                        &format!("{at}.type"),
                        &format!(
                            "unsupported content part type \"{}\"; use one of: {}.",
                            echo(&kind),
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
    };
    let mut found = false;
    for (key, modality, holds_url, value) in part.media() {
        let Some(value) = value else { continue };
        found |= named.is_some_and(|(name, _)| name == key);
        let url = if holds_url {
            media_url(value, &format!("{at}.{key}"))?
        } else {
            None
        };
        out.push(MediaPart {
            at: at.to_string(),
            part_type: key,
            modality,
            url,
            optional: false,
        });
    }
    if let (Some((name, modality)), false) = (named, found) {
        // A media type without its data: the engine refuses it, but not before the model
        // was checked for it.
        out.push(MediaPart {
            at: at.to_string(),
            part_type: name,
            modality,
            url: None,
            optional: false,
        });
    }
    Ok(())
}

/// The URL an `image_url` (`audio_url`, `video_url`) value names for the replica to fetch:
/// `{"url": …}` or, as some engines take it, the bare string.
fn media_url(value: &RawValue, at: &str) -> Result<Option<String>, RequestError> {
    let url = match first_byte(value) {
        b'"' => Some(value),
        b'{' => serde_json::from_str::<MediaUrl>(value.get())
            .map_err(RequestError::invalid_json)?
            .url
            .filter(|u| !is_null(u)),
        _ if is_null(value) => None,
        _ => return Err(RequestError::wrong_type(at, "an object with a \"url\"")),
    };
    let Some(url) = url else { return Ok(None) };
    // A data: URL is inline, however long: recognised without copying it.
    if url
        .get()
        .as_bytes()
        .get(1..6)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"data:"))
    {
        return Ok(None);
    }
    match serde_json::from_str::<Cow<str>>(url.get()) {
        Ok(u) => Ok(fetched_url(&u)),
        Err(_) => Err(RequestError::wrong_type(&format!("{at}.url"), "a string")),
    }
}

#[cfg(test)]
mod tests {
    use crate::translate::media::Modality;
    use crate::translate::openai::ChatRequest;

    #[test]
    fn media_parts_are_found_by_type_and_by_key() {
        let media = |content: &str| {
            let body =
                format!(r#"{{"model":"a","messages":[{{"role":"user","content":{content}}}]}}"#);
            ChatRequest::parse(body.as_bytes()).map(|r| r.media)
        };
        let found = media(
            r#"[{"type":"text","text":"x"},{"type":"image_url","image_url":{"url":"http://e.x/a.png"}},
               {"image_url":"http://e.x/b.png"},{"type":"image_url","image_url":{"url":"DATA:image/png;base64,AA"}},
               {"type":"input_audio","input_audio":{"data":"AA","format":"wav"}},{"type":"video_url"}]"#,
        )
        .unwrap();
        let seen: Vec<(&str, &str, Option<&str>)> = found
            .iter()
            .map(|m| (m.at.as_str(), m.part_type, m.url.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                (
                    "messages[0].content[1]",
                    "image_url",
                    Some("http://e.x/a.png")
                ),
                // No type: engines infer it from the key, and so does the check.
                (
                    "messages[0].content[2]",
                    "image_url",
                    Some("http://e.x/b.png")
                ),
                ("messages[0].content[3]", "image_url", None),
                ("messages[0].content[4]", "input_audio", None),
                ("messages[0].content[5]", "video_url", None),
            ]
        );
        // A text part carrying an image is still an image.
        let found = media(r#"[{"type":"text","text":"x","image_url":{"url":"http://e.x/c"}}]"#);
        assert_eq!(found.unwrap()[0].modality, Modality::Image);
        let e = media(r#"[{"type":"input_image","image_url":"http://e.x/"}]"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
        let e = media(r#"[{"type":"image_url","image_url":7}]"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].image_url"));
    }
}
