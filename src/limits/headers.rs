//! Rate-limit headers in both dialects, from the key's windows as the next request sees them.

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
/// values: the names are constants, and a number both dialects share is rendered once.
pub fn rate_headers(view: &RateView, now_ms: i64) -> OwnFields {
    // Most keys have no limits: no allocation for them.
    let mut out = Vec::new();
    for (values, names) in [(view.requests, &REQUESTS), (view.tokens, &TOKENS)] {
        let Some((limit, remaining, reset)) = values else {
            continue;
        };
        let limit = HeaderValue::from(limit);
        let remaining = HeaderValue::from(remaining);
        let [openai_limit, openai_remaining, openai_reset, limit_name, remaining_name, reset_name] =
            names.clone();
        out.reserve(6);
        out.push((openai_limit, limit.clone()));
        out.push((openai_remaining, remaining.clone()));
        out.push((openai_reset, duration(reset)));
        out.push((limit_name, limit));
        out.push((remaining_name, remaining));
        out.push((reset_name, rfc3339(now_ms + reset as i64 * 1000)));
    }
    out
}

/// `59s`, `1m0s`: the form OpenAI uses for resets.
fn duration(secs: u64) -> HeaderValue {
    let mut text = Text::default();
    if secs >= 60 {
        text.number(secs / 60);
        text.push(b'm');
    }
    text.number(secs % 60);
    text.push(b's');
    text.value()
}

/// `2026-11-18T11:07:40Z`, as `to_rfc3339_opts(SecondsFormat::Secs, true)` writes it for
/// the years 0 to 9999 (chrono's own rendering outside them).
fn rfc3339(ms: i64) -> HeaderValue {
    let Some(t) = DateTime::from_timestamp_millis(ms) else {
        return HeaderValue::from_static("");
    };
    let year = t.year();
    if !(0..=9999).contains(&year) {
        let text = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        return HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(""));
    }
    let mut text = Text::default();
    text.digits(year as u32, 4);
    text.push(b'-');
    text.digits(t.month(), 2);
    text.push(b'-');
    text.digits(t.day(), 2);
    text.push(b'T');
    text.digits(t.hour(), 2);
    text.push(b':');
    text.digits(t.minute(), 2);
    text.push(b':');
    text.digits(t.second(), 2);
    text.push(b'Z');
    text.value()
}

/// A short ASCII field value written on the stack.
#[derive(Default)]
struct Text {
    buf: [u8; 32],
    len: usize,
}

impl Text {
    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn number(&mut self, n: u64) {
        let mut digits = itoa::Buffer::new();
        for &b in digits.format(n).as_bytes() {
            self.push(b);
        }
    }

    /// `n` in exactly `width` digits, zero-padded.
    fn digits(&mut self, mut n: u32, width: usize) {
        for i in (0..width).rev() {
            self.buf[self.len + i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        self.len += width;
    }

    fn value(&self) -> HeaderValue {
        // Digits and ASCII letters only: always a valid field value.
        HeaderValue::from_bytes(&self.buf[..self.len]).unwrap_or(HeaderValue::from_static(""))
    }
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
            assert_eq!(rfc3339(ms), chrono.as_str(), "{ms}");
        }
    }
}
