//! The parts of a prompt that are not text, as both dialects' parsers find them: what the
//! media stage checks against the model (its `input_modalities`, its `media_urls`).

/// What kind of input a part is, named as in a model's `input_modalities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    Image,
    Audio,
    Video,
    /// A document (OpenAI `file` parts). No model lists it: engines take no documents.
    File,
}

impl Modality {
    pub fn name(self) -> &'static str {
        match self {
            Modality::Image => "image",
            Modality::Audio => "audio",
            Modality::Video => "video",
            Modality::File => "file",
        }
    }
}

/// One non-text part of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPart {
    /// Where it is in the client's body, e.g. `messages[0].content[1]`.
    pub at: String,
    /// Its type as the client's dialect names it: `image_url`, `input_audio`, `image`…
    pub part_type: &'static str,
    pub modality: Modality,
    /// A URL the replica would fetch itself; `None` for data sent inline (base64, `data:`).
    pub url: Option<String>,
    /// Left out of the replica's request, not refused, when the model does not take its
    /// modality: an image a tool returned, on the Messages surface (see `upstream`).
    pub optional: bool,
}

/// `Some(url)` unless `url` carries its data inline (a `data:` URL, as engines read it,
/// whatever the case of the scheme and any leading blanks).
pub fn fetched_url(url: &str) -> Option<String> {
    let start = url.trim_start_matches(|c: char| c <= ' ');
    let inline = start
        .get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("data:"));
    (!inline).then(|| url.to_string())
}
