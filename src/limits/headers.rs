//! Rate-limit headers in both dialects, from the key's windows as the next request sees them.

use bytes::Bytes;
use chrono::{DateTime, Datelike, Timelike};
use http::header::{HeaderName, HeaderValue};

use super::RateView;
use crate::vocab::OwnFields;

/// The names of one window's fields: OpenAI's limit, remaining and reset, then Anthropic's.
type Names = [HeaderName; 6];

const REQUESTS: Names = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
    HeaderName::from_static("anthropic-ratelimit-requests-limit"),
    HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
    HeaderName::from_static("anthropic-ratelimit-requests-reset"),
];

const TOKENS: Names = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
    HeaderName::from_static("anthropic-ratelimit-tokens-limit"),
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
    HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
];

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (OpenAI; reset as a duration) and
/// `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` (reset as RFC 3339).
///
/// Every response of a limited key carries them, so they are built straight into header
/// values: the names are constants, a number both dialects share is rendered once, resets
/// within the window's minute are constants too, and the rest is written into one buffer that
/// every value shares. A value of its own was an allocation, and another when the response
/// header cloned it: sixteen of them per response of a key with rpm and tpm.
pub fn rate_headers(view: &RateView, now_ms: i64) -> OwnFields {
    let windows = [(view.requests, &REQUESTS), (view.tokens, &TOKENS)];
    // Most keys have no limits: no allocation for them.
    let count = windows.iter().filter(|(v, _)| v.is_some()).count();
    if count == 0 {
        return Vec::new();
    }
    // Per window: limit, remaining and the RFC 3339 reset, with their ends in `buf`.
    let mut buf = Vec::with_capacity(count * WINDOW_TEXT);
    let mut ends = [[0usize; 3]; 2];
    for (i, (values, _)) in windows.iter().enumerate() {
        let Some((limit, remaining, reset)) = *values else {
            continue;
        };
        let mut digits = itoa::Buffer::new();
        buf.extend_from_slice(digits.format(limit).as_bytes());
        ends[i][0] = buf.len();
        buf.extend_from_slice(digits.format(remaining).as_bytes());
        ends[i][1] = buf.len();
        rfc3339(&mut buf, now_ms.saturating_add(reset as i64 * 1000));
        ends[i][2] = buf.len();
    }
    let shared = Bytes::from(buf);
    let mut out = Vec::with_capacity(count * 6);
    let mut start = 0;
    for (i, (values, names)) in windows.into_iter().enumerate() {
        let Some((_, _, reset)) = values else {
            continue;
        };
        let [limit, remaining, date] = ends[i].map(|end| {
            let value = value(shared.slice(start..end));
            start = end;
            value
        });
        let [openai_limit, openai_remaining, openai_reset, limit_name, remaining_name, reset_name] =
            names.clone();
        out.push((openai_limit, limit.clone()));
        out.push((openai_remaining, remaining.clone()));
        out.push((openai_reset, duration(reset)));
        out.push((limit_name, limit));
        out.push((remaining_name, remaining));
        out.push((reset_name, date));
    }
    out
}

/// Bytes one window's shared values take at most: two 20-digit numbers and a date.
const WINDOW_TEXT: usize = 2 * 20 + 20;

/// Digits, letters and date punctuation only: always a valid field value.
fn value(text: Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(text).unwrap_or(HeaderValue::from_static(""))
}

/// OpenAI's resets for the seconds a window's reset can be (0 to 60), as constants.
const RESETS: [&str; 61] = [
    "0s", "1s", "2s", "3s", "4s", "5s", "6s", "7s", "8s", "9s", "10s", "11s", "12s", "13s", "14s",
    "15s", "16s", "17s", "18s", "19s", "20s", "21s", "22s", "23s", "24s", "25s", "26s", "27s",
    "28s", "29s", "30s", "31s", "32s", "33s", "34s", "35s", "36s", "37s", "38s", "39s", "40s",
    "41s", "42s", "43s", "44s", "45s", "46s", "47s", "48s", "49s", "50s", "51s", "52s", "53s",
    "54s", "55s", "56s", "57s", "58s", "59s", "1m0s",
];

/// `59s`, `1m0s`: the form OpenAI uses for resets.
fn duration(secs: u64) -> HeaderValue {
    if let Some(text) = RESETS.get(secs as usize) {
        return HeaderValue::from_static(text);
    }
    let mut text = Vec::with_capacity(24);
    let mut digits = itoa::Buffer::new();
    text.extend_from_slice(digits.format(secs / 60).as_bytes());
    text.push(b'm');
    text.extend_from_slice(digits.format(secs % 60).as_bytes());
    text.push(b's');
    value(Bytes::from(text))
}

/// Appends `2026-11-18T11:07:40Z`, as `to_rfc3339_opts(SecondsFormat::Secs, true)` writes it
/// for the years 0 to 9999 (chrono's own rendering outside them, nothing past its range).
fn rfc3339(out: &mut Vec<u8>, ms: i64) {
    let Some(t) = DateTime::from_timestamp_millis(ms) else {
        return;
    };
    let year = t.year();
    if !(0..=9999).contains(&year) {
        let text = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        out.extend_from_slice(text.as_bytes());
        return;
    }
    let mut text = [0u8; 20];
    for (at, n, width) in [
        (0, year as u32, 4),
        (5, t.month(), 2),
        (8, t.day(), 2),
        (11, t.hour(), 2),
        (14, t.minute(), 2),
        (17, t.second(), 2),
    ] {
        let mut n = n;
        for i in (0..width).rev() {
            text[at + i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    for (at, b) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'Z'),
    ] {
        text[at] = b;
    }
    out.extend_from_slice(&text);
}

#[cfg(test)]
mod tests {
    use chrono::{SecondsFormat, Utc};

    use super::*;

    #[test]
    fn both_dialects_carry_the_same_numbers() {
        let view = RateView {
            requests: Some((60, 59, 60)),
            tokens: None,
        };
        let h = rate_headers(&view, 1_795_000_000_000);
        let get = |n: &str| {
            h.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_str().unwrap_or("?"))
        };
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

    #[test]
    fn resets_read_as_before() {
        for (secs, text) in [
            (0, "0s"),
            (59, "59s"),
            (60, "1m0s"),
            (61, "1m1s"),
            (3725, "62m5s"),
        ] {
            assert_eq!(duration(secs), text);
        }
        for secs in 0..200u64 {
            let text = match secs {
                0..=59 => format!("{secs}s"),
                _ => format!("{}m{}s", secs / 60, secs % 60),
            };
            assert_eq!(duration(secs), text.as_str(), "{secs}");
        }
        for ms in [
            -1000,
            0,
            999,
            1_795_000_000_000,
            951_782_400_000,
            253_402_300_799_000,
            253_402_300_800_000,
        ] {
            let chrono = DateTime::<Utc>::from_timestamp_millis(ms)
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
                .unwrap_or_default();
            let mut text = Vec::new();
            rfc3339(&mut text, ms);
            assert_eq!(text, chrono.as_bytes(), "{ms}");
        }
    }
}
