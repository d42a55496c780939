//! The shape every request body must have before any parser reads it: at most `MAX_DEPTH`
//! levels of nested arrays and objects, and no object with the same key twice, anywhere in
//! the body.
//!
//! One pass over the bytes, with no recursion, so a body nested 100,000 deep costs a
//! counter, not a stack. It runs before the dialect's parser because not every part of a
//! body is parsed: the chat surface forwards unknown fields as the client wrote them, and a
//! replica's own parser may recurse on them. A repeated key is refused because parsers
//! disagree on which value counts (serde_json's `Value` keeps the last, others the first):
//! tollgate could check one content part type or URL while the replica reads another. The
//! scan finds structure; it does not validate JSON, which the parser after it does.

use std::borrow::Cow;

use super::RequestError;
use crate::vocab::echo;

/// The deepest nesting of arrays and objects a body may have, its own object counted.
/// serde_json refuses deeper values on its own (its recursion limit is 128), so no body
/// that passes here is refused by a parser for its depth.
pub const MAX_DEPTH: usize = 127;

/// Objects with at most this many keys are checked pair by pair; larger ones are sorted.
const PAIRWISE_KEYS: usize = 16;

/// An open array or object, and where in it the scan is.
struct Frame<'a> {
    object: bool,
    /// Objects: the next string is a key (just after `{` or `,`).
    expect_key: bool,
    /// Objects: the last key read, its text between the quotes.
    key: &'a [u8],
    /// Arrays: the element's index.
    index: usize,
    /// Objects: where this object's keys start in the shared list.
    keys_from: usize,
}

/// Checks `bytes` against the limits above; the error names where the offending value is.
pub fn check(bytes: &[u8]) -> Result<(), RequestError> {
    // Sized for a chat body's usual depth and keys, so that they are not grown as it is read.
    let mut frames: Vec<Frame> = Vec::with_capacity(8);
    // The keys of every open object, innermost last, unescaped where they had escapes.
    let mut keys: Vec<Cow<[u8]>> = Vec::with_capacity(16);
    let mut i = 0;
    while let Some(&c) = bytes.get(i) {
        match c {
            b'"' => {
                let Some((end, escaped)) = string_end(bytes, i) else {
                    return Ok(()); // Unterminated: the parser reports it.
                };
                if let Some(frame) = frames.last_mut().filter(|f| f.object && f.expect_key) {
                    let raw = &bytes[i + 1..end - 1];
                    frame.key = raw;
                    frame.expect_key = false;
                    keys.push(match escaped {
                        true => unescaped(raw),
                        false => Cow::Borrowed(raw),
                    });
                }
                i = end;
                continue;
            }
            b'{' | b'[' => {
                if frames.len() == MAX_DEPTH {
                    let field = frames.first().filter(|f| f.object).map(|f| key_text(f.key));
                    return Err(too_deep(field));
                }
                frames.push(Frame {
                    object: c == b'{',
                    expect_key: true,
                    key: b"",
                    index: 0,
                    keys_from: keys.len(),
                });
            }
            b'}' | b']' => {
                let Some(frame) = frames.last() else {
                    return Ok(());
                };
                if frame.object {
                    if let Some(key) = repeated(&mut keys[frame.keys_from..]) {
                        return Err(duplicate(&frames, &key));
                    }
                    keys.truncate(frame.keys_from);
                }
                frames.pop();
            }
            b',' => {
                if let Some(frame) = frames.last_mut() {
                    frame.expect_key = frame.object;
                    frame.index += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// A key that `keys` holds twice. Sorts `keys` when there are many.
fn repeated<'k>(keys: &mut [Cow<'k, [u8]>]) -> Option<Cow<'k, [u8]>> {
    if keys.len() <= PAIRWISE_KEYS {
        for (n, a) in keys.iter().enumerate() {
            if keys[n + 1..].contains(a) {
                return Some(a.clone());
            }
        }
        return None;
    }
    keys.sort_unstable();
    keys.windows(2).find(|w| w[0] == w[1]).map(|w| w[0].clone())
}

/// A key's text between its quotes, escapes resolved (`"\u0061"` is the key `a`).
fn unescaped(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.contains(&b'\\') {
        return Cow::Borrowed(raw);
    }
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    match serde_json::from_slice::<String>(&quoted) {
        Ok(s) => Cow::Owned(s.into_bytes()),
        // A bad escape: the parser refuses the body.
        Err(_) => Cow::Borrowed(raw),
    }
}

fn too_deep(field: Option<String>) -> RequestError {
    let place = match &field {
        Some(f) => format!(" (in '{f}')"),
        None => String::new(),
    };
    RequestError {
        message: format!(
            "The request body nests arrays and objects more than {MAX_DEPTH} levels deep{place}. \
             Flatten the value: no field of the API needs that depth."
        ),
        param: field,
        code: "json_too_deep",
    }
}

/// The innermost open object holds `key` twice.
fn duplicate(frames: &[Frame], key: &[u8]) -> RequestError {
    // The path of the object: each enclosing frame says where in it the scan is.
    let mut path = String::new();
    if let Some((_, outer)) = frames.split_last() {
        for f in outer {
            if f.object {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key_text(f.key));
            } else {
                path.push_str(&format!("[{}]", f.index));
            }
        }
    }
    let key = echo(&String::from_utf8_lossy(key)).into_owned();
    let (param, place) = if path.is_empty() {
        (key.clone(), "the request body".to_string())
    } else {
        (format!("{path}.{key}"), format!("'{path}'"))
    };
    RequestError {
        message: format!(
            "The key '{key}' appears more than once in {place}. Send each key once: \
             JSON parsers disagree on which of the values counts."
        ),
        param: Some(param),
        code: "duplicate_key",
    }
}

/// A key as an error message may repeat it: unescaped, and cut when long (`echo`).
fn key_text(raw: &[u8]) -> String {
    echo(&String::from_utf8_lossy(&unescaped(raw))).into_owned()
}

/// Bytes of a string looked at one by one before handing the rest to `memchr2`: keys and
/// most short values end within them, and for those the search's set-up costs more than
/// the bytes.
const SHORT_STRING: usize = 16;

/// The index just past the string that opens at `at` (a quote), and whether it holds an
/// escape; `None` if it never closes.
fn string_end(json: &[u8], at: usize) -> Option<(usize, bool)> {
    let mut i = at + 1;
    let mut escaped = false;
    loop {
        let rest = json.get(i..)?;
        let short = rest.len().min(SHORT_STRING);
        i += match rest[..short].iter().position(|&c| c == b'"' || c == b'\\') {
            Some(n) => n,
            None => short + memchr::memchr2(b'"', b'\\', &rest[short..])?,
        };
        if json[i] == b'"' {
            return Some((i + 1, escaped));
        }
        // A backslash escapes the next byte, whatever it is.
        escaped = true;
        i += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!(
            r#"{{"model":"m","x":{}1{}}}"#,
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        )
    }

    #[test]
    fn the_limit_holds_anywhere_and_names_the_field() {
        assert!(check(nested(MAX_DEPTH).as_bytes()).is_ok());
        let e = check(nested(MAX_DEPTH + 1).as_bytes()).unwrap_err();
        assert_eq!(e.code, "json_too_deep");
        assert_eq!(e.param.as_deref(), Some("x"));
        // 100,000 deep costs no stack.
        let e = check(nested(100_000).as_bytes()).unwrap_err();
        assert!(e.message.contains("in 'x'"), "{}", e.message);
    }

    #[test]
    fn brackets_in_strings_are_text() {
        let deep_text = format!(
            r#"{{"a":"{}\"{}","b":[]}}"#,
            "[".repeat(500),
            "{".repeat(500)
        );
        assert!(check(deep_text.as_bytes()).is_ok());
    }

    #[test]
    fn a_body_no_parser_accepts_is_left_to_the_parser() {
        for broken in ["", "]]]]", r#"{"a":"unterminated"#, r#"{"a":"\"#, "}{"] {
            assert!(check(broken.as_bytes()).is_ok(), "{broken}");
        }
    }

    #[test]
    fn a_repeated_key_is_refused_wherever_it_is() {
        let e = check(br#"{"model":"a","stream":true,"model":"b"}"#).unwrap_err();
        assert_eq!(e.code, "duplicate_key");
        assert_eq!(e.param.as_deref(), Some("model"));
        assert!(e.message.contains("'model'"), "{}", e.message);
        let e = check(
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"x"},{"type":"image_url","type":"text"}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[1].type"));
        // Escapes name the same key.
        let e = check(br#"{"x":{"a":1,"\u0061":2}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("x.a"));
        // Many keys are sorted, not compared pair by pair.
        let many: Vec<String> = (0..1000).map(|n| format!("\"k{n}\":{n}")).collect();
        let body = format!("{{{},\"k500\":0}}", many.join(","));
        assert_eq!(
            check(body.as_bytes()).unwrap_err().param.as_deref(),
            Some("k500")
        );
        assert!(check(format!("{{{}}}", many.join(",")).as_bytes()).is_ok());
    }

    #[test]
    fn the_same_key_in_different_objects_is_no_repeat() {
        let body = br#"{"a":{"k":1},"b":{"k":2},"c":[{"k":1},{"k":2}],"k":"a","v":["k","k"]}"#;
        assert!(check(body).is_ok());
        // A string value that follows a colon is not a key.
        assert!(check(br#"{"a":"a","b":"a"}"#).is_ok());
    }

    #[test]
    fn a_body_at_the_limit_parses() {
        let body = nested(MAX_DEPTH);
        assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_DEPTH + 1)).is_err());
    }
}
