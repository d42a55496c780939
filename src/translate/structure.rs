//! The shape every request body must have before any parser reads it: at most `MAX_DEPTH`
//! levels of nested arrays and objects, anywhere in the body.
//!
//! One pass over the bytes, with no recursion, so a body nested 100,000 deep costs a
//! counter, not a stack. It runs before the dialect's parser because not every part of a
//! body is parsed: the chat surface forwards unknown fields as the client wrote them, and a
//! replica's own parser may recurse on them. The scan finds structure; it does not validate
//! JSON, which the parser after it does.

use super::RequestError;
use crate::vocab::echo;

/// The deepest nesting of arrays and objects a body may have, its own object counted.
/// serde_json refuses deeper values on its own (its recursion limit is 128), so no body
/// that passes here is refused by a parser for its depth.
pub const MAX_DEPTH: usize = 127;

/// Checks `bytes` against the limits above; the error names the top-level field the
/// offending value is in.
pub fn check(bytes: &[u8]) -> Result<(), RequestError> {
    let mut depth = 0usize;
    // The top-level field the scan is in: the last string at depth 1.
    let mut top_field: Option<&[u8]> = None;
    let mut i = 0;
    while let Some(&c) = bytes.get(i) {
        match c {
            b'"' => {
                let Some(end) = string_end(bytes, i) else {
                    return Ok(()); // Unterminated: the parser reports it.
                };
                if depth == 1 {
                    top_field = Some(&bytes[i + 1..end - 1]);
                }
                i = end;
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(too_deep(top_field));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

fn too_deep(field: Option<&[u8]>) -> RequestError {
    let field = field.map(key_text);
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

/// A key as an error message may repeat it: unescaped, and cut when long (`echo`).
fn key_text(raw: &[u8]) -> String {
    let text = if raw.contains(&b'\\') {
        let mut quoted = Vec::with_capacity(raw.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(raw);
        quoted.push(b'"');
        serde_json::from_slice::<String>(&quoted).ok()
    } else {
        None
    };
    let text = text.unwrap_or_else(|| String::from_utf8_lossy(raw).into_owned());
    echo(&text).into_owned()
}

/// The index just past the string that opens at `at` (a quote); `None` if it never closes.
pub(super) fn string_end(json: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', json.get(i..)?)?;
        if json[i] == b'"' {
            return Some(i + 1);
        }
        // A backslash escapes the next byte, whatever it is.
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
    fn a_body_at_the_limit_parses() {
        let body = nested(MAX_DEPTH);
        assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_DEPTH + 1)).is_err());
    }
}
