//! An error as a client reads it, in whichever dialect: decided once (in `error.rs`), then
//! rendered as a JSON body or a stream's last event by `translate::errors`. Also how much of
//! the client's own input a message may repeat.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: u16,
    /// OpenAI's `error.type`.
    pub kind: &'static str,
    /// A stable, low-cardinality code: OpenAI's `error.code` and the metric label.
    pub code: &'static str,
    /// OpenAI's `error.param`: the request field at fault.
    pub param: Option<String>,
    /// What went wrong and how to fix it. Never contains a secret.
    pub message: String,
}

/// The most bytes of a client's own input (a model name, a path, a value) an error message
/// repeats. Enough to recognise it; a message never grows with what the client sent.
pub const ECHO_MAX_BYTES: usize = 256;

/// `s` as an error message may repeat it: whole when it is at most `ECHO_MAX_BYTES`, else
/// its start, cut at a character boundary, followed by `…` and how long it was.
pub fn echo(s: &str) -> Cow<'_, str> {
    if s.len() <= ECHO_MAX_BYTES {
        return Cow::Borrowed(s);
    }
    let mut end = ECHO_MAX_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes)", &s[..end], s.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_input_is_cut_at_a_character_boundary() {
        assert_eq!(echo("gpt-4o"), "gpt-4o");
        let exact = "a".repeat(ECHO_MAX_BYTES);
        assert_eq!(echo(&exact), exact);
        // 'é' is two bytes: byte 256 falls inside the 128th.
        let long = format!("x{}", "é".repeat(200));
        let cut = echo(&long);
        assert_eq!(cut, format!("x{}… (401 bytes)", "é".repeat(127)));
        assert!(cut.len() < ECHO_MAX_BYTES + 20);
    }
}
