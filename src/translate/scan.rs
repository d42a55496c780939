//! Byte scans over JSON text, for the hot path where parsing every stream chunk would cost
//! more than the chunk is worth. They find; they never validate.

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// A member name to look for, with its quotes (`b"\"usage\""`), and its substring searcher
/// built once. Building a searcher costs more than running it over a stream chunk of a few
/// hundred bytes, and every chunk is searched for several names.
pub struct Key {
    finder: Finder<'static>,
}

impl Key {
    pub fn new(quoted: &'static [u8]) -> Self {
        Key {
            finder: Finder::new(quoted),
        }
    }

    fn len(&self) -> usize {
        self.finder.needle().len()
    }
}

/// The names the relay looks for in every stream chunk.
pub static USAGE: LazyLock<Key> = LazyLock::new(|| Key::new(b"\"usage\""));
pub static CHOICES: LazyLock<Key> = LazyLock::new(|| Key::new(b"\"choices\""));
pub static MODEL: LazyLock<Key> = LazyLock::new(|| Key::new(b"\"model\""));
pub static CONTENT: LazyLock<Key> = LazyLock::new(|| Key::new(b"\"content\""));
pub static REASONING_CONTENT: LazyLock<Key> = LazyLock::new(|| Key::new(b"\"reasoning_content\""));
pub static REASONING: LazyLock<Key> = LazyLock::new(|| Key::new(b"\"reasoning\""));
pub static ARGUMENTS: LazyLock<Key> = LazyLock::new(|| Key::new(b"\"arguments\""));

/// Position of `key` in `haystack`.
pub fn find(haystack: &[u8], key: &Key) -> Option<usize> {
    if key.len() == 0 {
        return None;
    }
    key.finder.find(haystack)
}

/// Where the value of the first `"key":` starts (whitespace around the colon skipped).
pub fn value_start(json: &[u8], key: &Key) -> Option<usize> {
    let mut from = 0;
    while let Some(pos) = find(&json[from..], key) {
        let mut i = from + pos + key.len();
        i += leading_ws(&json[i..]);
        if json.get(i) == Some(&b':') {
            i += 1;
            return Some(i + leading_ws(&json[i..]));
        }
        from += pos + key.len();
    }
    None
}

/// Where the value of the top-level member `"key"` of the object `json` starts. Only the
/// object's own members are looked at: nested values and strings are stepped over, not parsed,
/// so text that merely looks like the member (in a message's content, in a nested object) is
/// never taken for it. `None` when there is no such member, or `json` is not an object as far
/// as the walk gets. `key` is given without quotes and must not need escaping.
pub fn top_level_value(json: &[u8], key: &[u8]) -> Option<usize> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(json, i);
        if json.get(i) != Some(&b'"') {
            return None;
        }
        let name_end = string_end(json, i)?;
        let name = &json[i + 1..name_end - 1];
        i = skip_ws(json, name_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(json, i + 1);
        if name == key {
            return (i < json.len()).then_some(i);
        }
        i = skip_ws(json, value_end(json, i)?);
        match json.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

/// Calls `member` with the name (as written, without its quotes) and the value text of each
/// member of the object that `json` starts with, in order, and returns the index just past
/// the object. `None` when the object is malformed as far as the walk sees, or when `member`
/// returns `None`.
pub fn each_member(
    json: &[u8],
    mut member: impl FnMut(&[u8], &[u8]) -> Option<()>,
) -> Option<usize> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(json, i + 1);
    if json.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        if json.get(i) != Some(&b'"') {
            return None;
        }
        let name_end = string_end(json, i)?;
        let name = &json[i + 1..name_end - 1];
        i = skip_ws(json, name_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(json, i + 1);
        let end = value_end(json, start)?;
        member(name, &json[start..end])?;
        i = skip_ws(json, end);
        match json.get(i) {
            Some(b',') => i = skip_ws(json, i + 1),
            Some(b'}') => return Some(i + 1),
            _ => return None,
        }
    }
}

/// Where the object held by the last `"key":` member of `json` that holds one starts. Found
/// by the substring search alone, so a member that engines write last (as `usage`) is found
/// without walking the rest of the text; whether it is one of the top-level object's own,
/// `ends_top_level` says once its end is known. (memchr's forward search runs on SIMD;
/// its reverse one goes a byte at a time, and cost a stream 8 % more instructions.)
pub fn last_object_member(json: &[u8], key: &Key) -> Option<usize> {
    // The object opens after its name, so only the text before the last `{` is searched: a
    // stream chunk's last brace opens its delta, well before the `"usage":null` at its end.
    // A name without a brace is not cut in two there, so the names found are those found
    // in the whole text up to there.
    let names = match key.finder.needle().contains(&b'{') {
        false => memchr::memrchr(b'{', json)?,
        true => json.len(),
    };
    let mut last = None;
    let mut from = 0;
    while let Some(pos) = find(&json[from..names], key) {
        let at = from + pos;
        from = at + key.len();
        // A quote after an odd run of backslashes is inside a string.
        let backslashes = json[..at].iter().rev().take_while(|&&c| c == b'\\').count();
        if backslashes % 2 == 1 {
            continue;
        }
        let i = skip_ws(json, from);
        if json.get(i) != Some(&b':') {
            continue;
        }
        let i = skip_ws(json, i + 1);
        if json.get(i) == Some(&b'{') {
            last = Some(i);
        }
    }
    last
}

/// Whether a member value that ends just before `end` is followed only by further members
/// of its object, the object's end, and the end of the text: so that its object is the
/// top-level one.
pub fn ends_top_level(json: &[u8], end: usize) -> bool {
    let mut i = end;
    loop {
        i = skip_ws(json, i);
        match json.get(i) {
            Some(b'}') => return skip_ws(json, i + 1) == json.len(),
            Some(b',') => {
                i = skip_ws(json, i + 1);
                if json.get(i) != Some(&b'"') {
                    return false;
                }
                let Some(name_end) = string_end(json, i) else {
                    return false;
                };
                i = skip_ws(json, name_end);
                if json.get(i) != Some(&b':') {
                    return false;
                }
                let Some(value_end) = value_end(json, skip_ws(json, i + 1)) else {
                    return false;
                };
                i = value_end;
            }
            _ => return false,
        }
    }
}

/// The index just past the string that opens at `at` (a quote).
fn string_end(json: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', &json[i..])?;
        if json[i] == b'"' {
            return Some(i + 1);
        }
        // A backslash escapes the next byte, whatever it is.
        i += 2;
        if i > json.len() {
            return None;
        }
    }
}

/// The index just past the value that starts at `at`.
fn value_end(json: &[u8], at: usize) -> Option<usize> {
    match json.get(at)? {
        b'"' => string_end(json, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while let Some(&c) = json.get(i) {
                match c {
                    b'"' => {
                        i = string_end(json, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let rest = &json[at..];
            let len = rest
                .iter()
                .position(|&c| matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace())
                .unwrap_or(rest.len());
            Some(at + len)
        }
    }
}

fn skip_ws(json: &[u8], at: usize) -> usize {
    at + json.get(at..).map_or(0, leading_ws)
}

fn leading_ws(s: &[u8]) -> usize {
    s.iter().take_while(|c| c.is_ascii_whitespace()).count()
}

/// Whether the first `"key":` holds a non-empty string.
pub fn has_nonempty_string(json: &[u8], key: &Key) -> bool {
    let mut from = 0;
    while let Some(start) = value_start(&json[from..], key) {
        let i = from + start;
        if json.get(i) == Some(&b'"') && json.get(i + 1).is_some_and(|&c| c != b'"') {
            return true;
        }
        from = i;
    }
    false
}

/// Whether the first `"key":` holds an empty array.
pub fn is_empty_array(json: &[u8], key: &Key) -> bool {
    value_start(json, key).is_some_and(|i| {
        json.get(i) == Some(&b'[') && json.get(i + 1 + leading_ws(&json[i + 1..])) == Some(&b']')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_at_the_very_end_holds_no_array() {
        assert!(!is_empty_array(br#"{"choices":"#, &CHOICES));
        assert!(!is_empty_array(br#"{"choices": "#, &CHOICES));
    }

    #[test]
    fn values_are_found_through_whitespace() {
        let j = br#"{"a" : [ ], "b":"x", "c":""}"#;
        assert!(is_empty_array(j, &Key::new(b"\"a\"")));
        assert!(has_nonempty_string(j, &Key::new(b"\"b\"")));
        assert!(!has_nonempty_string(j, &Key::new(b"\"c\"")));
        assert_eq!(value_start(br#"{"usage":null}"#, &USAGE), Some(9));
        assert_eq!(value_start(b"\"usage\"", &USAGE), None);
        assert_eq!(find(b"", &Key::new(b"x")), None);
        assert_eq!(find(b"abc", &Key::new(b"")), None);
    }

    #[test]
    fn only_the_objects_own_members_are_found() {
        fn top(j: &str) -> Option<&str> {
            top_level_value(j.as_bytes(), b"usage").map(|i| &j[i..])
        }
        assert_eq!(top(r#"{"usage":{"a":1}}"#), Some(r#"{"a":1}}"#));
        assert_eq!(top(r#" { "id" : "x" , "usage" : 7 } "#), Some("7 } "));
        // Look-alikes inside strings and nested values are stepped over.
        let tricky = r#"{"choices":[{"message":{"content":"say \"usage\": {\"prompt_tokens\": 9}","usage":{"x":1}}}],"note":"\\","usage":{"prompt_tokens":3}}"#;
        assert_eq!(top(tricky), Some(r#"{"prompt_tokens":3}}"#));
        assert_eq!(top(r#"{"choices":[],"model":"m"}"#), None);
        assert_eq!(
            top(r#"{"a":[1,{"usage":2}],"b":true,"c":null,"d":-1.5e3}"#),
            None
        );
        // Not an object, or broken before the member: nothing.
        for broken in [
            "",
            "[1]",
            r#"{"a":"unterminated"#,
            r#"{"a" 1,"usage":2}"#,
            r#"{"a":{"b":1,"usage":2}"#,
            r#"{"a":1 "usage":2}"#,
            r#"{"usage":"#,
            r#"{"a":"\"#,
        ] {
            assert_eq!(top(broken), None, "{broken}");
        }
    }

    #[test]
    fn the_object_member_is_searched_for_before_the_last_brace_only() {
        let last = |j: &str| last_object_member(j.as_bytes(), &USAGE);
        assert_eq!(
            last(r#"{"choices":[{"delta":{"content":"a"}}],"usage":null}"#),
            None
        );
        assert_eq!(
            last(r#"{"choices":[],"usage":{"prompt_tokens":1}}"#),
            Some(22)
        );
        // The last one, nested or not: `ends_top_level` tells.
        assert_eq!(last(r#"{"usage" : {"a":1},"x":{"usage":{}}}"#), Some(32));
        // Keys inside strings, escaped quotes, a nested usage after a null one.
        assert_eq!(last(r#"{"c":"\"usage\":{","usage":null}"#), None);
        assert_eq!(last(r#"{"c":"x\\","usage":{}}"#), Some(19));
        assert_eq!(last(r#"{"a":{"usage":null},"usage" :{}}"#), Some(29));
        assert_eq!(last(r#"{"usage":{"#), Some(9));
        assert_eq!(last(r#""usage":"#), None);
        assert_eq!(last(""), None);
        // A name with a brace in it is searched for in the whole text.
        let braced = Key::new(b"\"{\"");
        assert_eq!(last_object_member(br#"{"{":{}}"#, &braced), Some(5));
    }

    #[test]
    fn the_object_member_is_the_one_a_search_of_the_whole_text_finds() {
        // The search over the whole text, as it was before it stopped at the last brace.
        fn whole(json: &[u8]) -> Option<usize> {
            let mut last = None;
            let mut from = 0;
            while let Some(pos) = find(&json[from..], &USAGE) {
                let at = from + pos;
                from = at + USAGE.len();
                let backslashes = json[..at].iter().rev().take_while(|&&c| c == b'\\').count();
                let i = skip_ws(json, from);
                if backslashes % 2 == 0 && json.get(i) == Some(&b':') {
                    let i = skip_ws(json, i + 1);
                    if json.get(i) == Some(&b'{') {
                        last = Some(i);
                    }
                }
            }
            last
        }
        // Every text of up to five pieces that matter.
        let pieces: [&[u8]; 9] = [
            b"\"usage\"",
            b"\"",
            b"usage",
            b"\\",
            b":",
            b" ",
            b"{",
            b"}",
            b"null",
        ];
        let mut texts = vec![Vec::new()];
        for _ in 0..5 {
            texts = texts
                .iter()
                .flat_map(|t| pieces.iter().map(move |p| [t.as_slice(), p].concat()))
                .collect();
            for t in &texts {
                let shown = String::from_utf8_lossy(t);
                assert_eq!(last_object_member(t, &USAGE), whole(t), "{shown}");
            }
        }
    }
}
