//! Rate-limit headers in both dialects, from the key's windows as the next request sees them.

use chrono::{DateTime, SecondsFormat, Utc};

use super::RateView;

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (OpenAI; reset as a duration) and
/// `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` (reset as RFC 3339).
pub fn rate_headers(view: &RateView, now_ms: i64) -> Vec<(&'static str, String)> {
    // Most keys have no limits: no allocation for them.
    let mut out = Vec::new();
    let kinds = [
        (
            view.requests,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
            [
                "anthropic-ratelimit-requests-limit",
                "anthropic-ratelimit-requests-remaining",
                "anthropic-ratelimit-requests-reset",
            ],
        ),
        (
            view.tokens,
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
            [
                "anthropic-ratelimit-tokens-limit",
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-tokens-reset",
            ],
        ),
    ];
    for (values, openai, anthropic) in kinds {
        let Some((limit, remaining, reset)) = values else {
            continue;
        };
        out.reserve(6);
        out.push((openai[0], limit.to_string()));
        out.push((openai[1], remaining.to_string()));
        out.push((openai[2], duration(reset)));
        out.push((anthropic[0], limit.to_string()));
        out.push((anthropic[1], remaining.to_string()));
        out.push((anthropic[2], rfc3339(now_ms + reset as i64 * 1000)));
    }
    out
}

/// `59s`, `1m0s`: the form OpenAI uses for resets.
fn duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        _ => format!("{}m{}s", secs / 60, secs % 60),
    }
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_dialects_carry_the_same_numbers() {
        let view = RateView {
            requests: Some((60, 59, 60)),
            tokens: None,
        };
        let h = rate_headers(&view, 1_795_000_000_000);
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("x-ratelimit-limit-requests"), Some("60"));
        assert_eq!(get("x-ratelimit-remaining-requests"), Some("59"));
        assert_eq!(get("x-ratelimit-reset-requests"), Some("1m0s"));
        assert_eq!(get("anthropic-ratelimit-requests-remaining"), Some("59"));
        assert_eq!(
            get("anthropic-ratelimit-requests-reset"),
            Some("2026-11-18T11:07:40Z")
        );
        assert_eq!(get("x-ratelimit-limit-tokens"), None);
    }
}
