//! Byte scans over JSON text, for the hot path where parsing every stream chunk would cost
//! more than the chunk is worth. They find; they never validate.

/// Position of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    memchr::memmem::find(haystack, needle)
}

/// Where the value of the first `"key":` starts (whitespace around the colon skipped).
/// `key` is given with its quotes, e.g. `b"\"usage\""`.
pub fn value_start(json: &[u8], key: &[u8]) -> Option<usize> {
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

fn leading_ws(s: &[u8]) -> usize {
    s.iter().take_while(|c| c.is_ascii_whitespace()).count()
}

/// Whether the first `"key":` holds a non-empty string.
pub fn has_nonempty_string(json: &[u8], key: &[u8]) -> bool {
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
pub fn is_empty_array(json: &[u8], key: &[u8]) -> bool {
    value_start(json, key).is_some_and(|i| {
        json[i] == b'[' && json.get(i + 1 + leading_ws(&json[i + 1..])) == Some(&b']')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_found_through_whitespace() {
        let j = br#"{"a" : [ ], "b":"x", "c":""}"#;
        assert!(is_empty_array(j, b"\"a\""));
        assert!(has_nonempty_string(j, b"\"b\""));
        assert!(!has_nonempty_string(j, b"\"c\""));
        assert_eq!(value_start(br#"{"usage":null}"#, b"\"usage\""), Some(9));
        assert_eq!(value_start(b"\"usage\"", b"\"usage\""), None);
        assert_eq!(find(b"", b"x"), None);
    }
}
