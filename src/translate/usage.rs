//! The one usage normalizer: token counts as every engine reports them, in one shape.
//!
//! Engines differ: cached tokens under `prompt_tokens_details.cached_tokens` (or absent),
//! reasoning tokens under `completion_tokens_details.reasoning_tokens` (or absent), usage on
//! every stream chunk (running totals) or only on the last. Cached is a subset of input and
//! reasoning a subset of output: nothing is ever added twice.

use super::scan;
use crate::vocab::Usage;

/// The most tokens of one kind a reported usage is taken to have.
const MAX_TOKENS: u64 = u32::MAX as u64;

/// OpenAI's `usage` object, every field optional as engines omit some.
#[derive(Debug, Default)]
pub struct OpenAiUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Default)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default)]
struct CompletionDetails {
    reasoning_tokens: Option<u64>,
}

impl From<&OpenAiUsage> for Usage {
    fn from(u: &OpenAiUsage) -> Self {
        let input = u.prompt_tokens.unwrap_or(0);
        let output = u.completion_tokens.unwrap_or(0);
        let cached = u
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        let reasoning = u
            .completion_tokens_details
            .as_ref()
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0);
        // A subset can never exceed its whole; clamp rather than trust a confused engine.
        // No request uses four billion tokens: larger counts are capped there, so costs and
        // the ledger's sums stay far from overflowing.
        let (input, output) = (input.min(MAX_TOKENS), output.min(MAX_TOKENS));
        Usage {
            input,
            cached_input: cached.min(input),
            output,
            reasoning: reasoning.min(output),
        }
    }
}

/// The usage in an OpenAI JSON body or chunk, if it carries a non-null one. Only the object's
/// own `usage` member counts; it alone is parsed, the rest of the body is stepped over.
pub fn usage_of(json: &[u8]) -> Option<Usage> {
    // Engines write `usage` after the choices: the last one found by the substring search is
    // read, and what follows it checked, without walking the generated text. Most stream chunks carry no usage object at all, or
    // `"usage":null` (OpenAI's streams with `include_usage` put it on every chunk), and are
    // rejected by that search alone.
    let last = scan::last_object_member(json, &scan::USAGE)?;
    let usage = match read_usage(&json[last..]) {
        Some((usage, len)) if scan::ends_top_level(json, last + len) => usage,
        // Nested, or followed by members the check after it does not read, or refused:
        // the walk from the start decides.
        _ => {
            let at = scan::top_level_value(json, b"usage")?;
            if json[at] != b'{' {
                return None;
            }
            read_usage(&json[at..])?.0
        }
    };
    Some(Usage::from(&usage))
}

/// The `usage` object that `json` starts with, and its length, read as serde would read it
/// into `OpenAiUsage` (a count that is not an unsigned integer or `null`, a details field
/// that is not an object or `null`, or a field given twice refuses it), without building a
/// parser for a few numbers.
fn read_usage(json: &[u8]) -> Option<(OpenAiUsage, usize)> {
    let mut usage = OpenAiUsage::default();
    let mut seen = [false; 4];
    let len = scan::each_member(json, |name, value| {
        let field = match name {
            b"prompt_tokens" => 0,
            b"completion_tokens" => 1,
            b"prompt_tokens_details" => 2,
            b"completion_tokens_details" => 3,
            _ => return Some(()),
        };
        if std::mem::replace(&mut seen[field], true) {
            return None;
        }
        match field {
            0 => usage.prompt_tokens = count(value)?,
            1 => usage.completion_tokens = count(value)?,
            2 => {
                usage.prompt_tokens_details = detail(value, b"cached_tokens")?
                    .map(|cached_tokens| PromptDetails { cached_tokens })
            }
            _ => {
                usage.completion_tokens_details = detail(value, b"reasoning_tokens")?
                    .map(|reasoning_tokens| CompletionDetails { reasoning_tokens })
            }
        }
        Some(())
    })?;
    Some((usage, len))
}

/// A count: `Some(None)` for `null`, `None` for anything but an unsigned JSON integer that
/// fits a `u64`.
fn count(value: &[u8]) -> Option<Option<u64>> {
    if value == b"null" {
        return Some(None);
    }
    let leading_zero = value.len() > 1 && value[0] == b'0';
    if value.is_empty() || leading_zero {
        return None;
    }
    // Digits folded as they come: the same refusals as checking them and then parsing
    // (`u64::from_str`), without the second pass and its UTF-8 check.
    value
        .iter()
        .try_fold(0u64, |n, &d| {
            if !d.is_ascii_digit() {
                return None;
            }
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .map(Some)
}

/// A details object's one count (`Some(None)` for `null` itself): `None` when it is not an
/// object, or its count is refused.
fn detail(value: &[u8], key: &[u8]) -> Option<Option<Option<u64>>> {
    if value == b"null" {
        return Some(None);
    }
    let mut found = None;
    let mut seen = false;
    scan::each_member(value, |name, v| {
        if name == key {
            if std::mem::replace(&mut seen, true) {
                return None;
            }
            found = count(v)?;
        }
        Some(())
    })?;
    Some(Some(found))
}

/// Output tokens of a whole `chat.completion` that reported no usage: the text it
/// generated (content, reasoning and tool call arguments of every choice) at four bytes a
/// token, the rate prompts are estimated at. 0 for a body that is not a completion.
pub fn estimate_output(json: &[u8]) -> u64 {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(json) else {
        return 0;
    };
    let text_len = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => s.len(),
        Some(serde_json::Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(serde_json::Value::as_str))
            .map(str::len)
            .sum(),
        _ => 0,
    };
    let mut bytes = 0;
    let choices = body.get("choices").and_then(serde_json::Value::as_array);
    for message in choices
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("message"))
    {
        bytes += text_len(message.get("content"));
        bytes += text_len(
            message
                .get("reasoning_content")
                .or(message.get("reasoning")),
        );
        let calls = message
            .get("tool_calls")
            .and_then(serde_json::Value::as_array);
        for call in calls.into_iter().flatten() {
            bytes += text_len(call.pointer("/function/arguments"));
        }
    }
    (bytes as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_without_usage_is_estimated_from_the_generated_text() {
        let body = br#"{"choices":[{"message":{"content":"12345678","reasoning_content":"abcd","tool_calls":[{"function":{"name":"f","arguments":"{\"a\":1}"}}]}},{"message":{"content":[{"type":"text","text":"xy"}]}}]}"#;
        // 8 + 4 + 7 + 2 bytes.
        assert_eq!(estimate_output(body), 6);
        assert_eq!(
            estimate_output(br#"{"choices":[{"message":{"content":null}}]}"#),
            0
        );
        assert_eq!(estimate_output(b"<html>"), 0);
    }

    #[test]
    fn engine_variants_normalise_without_double_counting() {
        let vllm = br#"{"usage":{"prompt_tokens":117,"completion_tokens":40,"total_tokens":157,"prompt_tokens_details":{"cached_tokens":64},"completion_tokens_details":{"reasoning_tokens":12}}}"#;
        assert_eq!(
            usage_of(vllm),
            Some(Usage {
                input: 117,
                cached_input: 64,
                output: 40,
                reasoning: 12
            })
        );
        let bare = br#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#;
        assert_eq!(
            usage_of(bare),
            Some(Usage {
                input: 10,
                cached_input: 0,
                output: 5,
                reasoning: 0
            })
        );
        let null_details = br#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":null,"completion_tokens_details":null}}"#;
        assert_eq!(usage_of(null_details).unwrap().cached_input, 0);
        let confused = br#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":50},"completion_tokens_details":{"reasoning_tokens":9}}}"#;
        let u = usage_of(confused).unwrap();
        assert_eq!((u.cached_input, u.reasoning), (10, 5));
        assert_eq!(u.uncached_input(), 0);
    }

    #[test]
    fn absurd_counts_are_capped_at_four_billion_tokens() {
        let body = br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":99999999999,"prompt_tokens_details":{"cached_tokens":18446744073709551615}}}"#;
        let u = usage_of(body).unwrap();
        let max = u64::from(u32::MAX);
        assert_eq!((u.input, u.cached_input, u.output), (max, max, max));
    }

    #[test]
    fn chunks_without_usage_are_skipped() {
        assert_eq!(
            usage_of(br#"{"choices":[{"delta":{"content":"hi"}}]}"#),
            None
        );
        assert_eq!(usage_of(br#"{"choices":[],"usage":null}"#), None);
        assert_eq!(usage_of(b"[DONE]"), None);
        assert_eq!(usage_of(b"{not json \"usage\""), None);
        assert_eq!(usage_of(br#"{"usage":{"prompt_tokens":"many"}}"#), None);
    }

    #[test]
    fn a_look_alike_in_the_content_is_not_the_usage() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"{\"usage\":{\"prompt_tokens\":999}}","usage":{"prompt_tokens":5}}}],"usage":{"prompt_tokens":10,"completion_tokens":4}}"#;
        assert_eq!(usage_of(body).map(|u| (u.input, u.output)), Some((10, 4)));
        let without =
            br#"{"choices":[{"message":{"content":"\"usage\": {\"prompt_tokens\": 999}"}}]}"#;
        assert_eq!(usage_of(without), None);
    }

    #[test]
    fn counts_that_are_not_unsigned_integers_refuse_the_usage() {
        let of = |usage: &str| usage_of(format!(r#"{{"usage":{usage}}}"#).as_bytes());
        for refused in [
            r#"{"prompt_tokens":5.0}"#,
            r#"{"prompt_tokens":-1}"#,
            r#"{"prompt_tokens":1e3}"#,
            r#"{"prompt_tokens":007}"#,
            r#"{"prompt_tokens":18446744073709551616}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            r#"{"prompt_tokens_details":7}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":"x"}}"#,
            r#"{"completion_tokens_details":[]}"#,
            r#"{"prompt_tokens":1,}"#,
        ] {
            assert_eq!(of(refused), None, "{refused}");
        }
        let u = of(
            r#" { "prompt_tokens" : 0 , "x" : {"prompt_tokens":9}, "completion_tokens":3, "prompt_tokens_details":{"cached_tokens":null,"audio_tokens":2}, "completion_tokens_details":{} } "#,
        );
        assert_eq!(
            u.map(|u| (u.input, u.output, u.cached_input)),
            Some((0, 3, 0))
        );
        assert_eq!(of("{}"), Some(Usage::default()));
    }

    #[test]
    fn the_usage_is_found_from_the_end_wherever_members_follow_it() {
        // vLLM writes members after `usage`.
        let vllm = br#"{"id":"c","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":7,"completion_tokens":2},"prompt_logprobs":null,"kv_transfer_params":{"a":[1,"}"]}}
"#;
        assert_eq!(usage_of(vllm).map(|u| (u.input, u.output)), Some((7, 2)));
        // A nested usage object after the top-level one is not it.
        let nested_last = br#"{"usage":{"prompt_tokens":3,"completion_tokens":1},"x":{"usage":{"prompt_tokens":99}}}"#;
        assert_eq!(usage_of(nested_last).map(|u| u.input), Some(3));
        // A key that ends in an escaped quote and `usage` is another key.
        let escaped = br#"{"x \"usage":{"prompt_tokens":99}}"#;
        assert_eq!(usage_of(escaped), None);
        let escaped_backslash = br#"{"x\\":1,"usage":{"prompt_tokens":4}}"#;
        assert_eq!(usage_of(escaped_backslash).map(|u| u.input), Some(4));
    }

    #[test]
    fn a_null_usage_before_or_beside_a_nested_one_does_not_hide_the_top_level_one() {
        // The first `"usage"` is nested and null; the top-level one still counts.
        let body = br#"{"choices":[{"delta":{"content":"a"},"usage":null}],"usage" : {"prompt_tokens":3,"completion_tokens":2}}"#;
        assert_eq!(usage_of(body).map(|u| (u.input, u.output)), Some((3, 2)));
        // A nested object and a null top-level one: no usage.
        let nested = br#"{"choices":[{"usage":{"prompt_tokens":9}}],"usage":null}"#;
        assert_eq!(usage_of(nested), None);
        // Every chunk of an OpenAI stream with include_usage.
        let chunk = br#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}"#;
        assert_eq!(usage_of(chunk), None);
    }
}
