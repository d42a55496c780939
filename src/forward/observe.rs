//! What the relay sees of a replica's answer on its way through: the reported usage, how much
//! output was relayed (the estimate when usage never comes), time to first token and the gaps
//! between tokens. Cheap byte scans; a chunk is parsed only when it carries usage.

use prometheus::Histogram;
use tokio::time::Instant;

use crate::translate::scan;
use crate::translate::usage;
use crate::vocab::Usage;

pub struct Observed {
    /// The last usage the replica reported (running totals replace, never add).
    pub usage: Option<Usage>,
    /// Output tokens as estimated from what was relayed, for when usage never comes: one
    /// per stream event that carried output, as engines stream them; for a whole answer,
    /// its generated text (`usage::estimate_output`).
    pub output_estimate: u64,
    pub first_token: Option<Instant>,
    last_token: Option<Instant>,
    inter_token: Option<Histogram>,
    /// When the bytes being observed were read, once a token among them asked: the tokens
    /// of one read arrived together, so they share one reading of the clock rather than
    /// taking one each. Cleared by `next_read`.
    read_at: Option<Instant>,
}

impl Observed {
    pub fn new(inter_token: Option<Histogram>) -> Self {
        Observed {
            usage: None,
            output_estimate: 0,
            first_token: None,
            last_token: None,
            inter_token,
            read_at: None,
        }
    }

    /// What follows came in another read from the replica.
    pub fn next_read(&mut self) {
        self.read_at = None;
    }

    /// One upstream SSE `data:` payload; returns whether it reported usage.
    pub fn event(&mut self, data: &[u8]) -> bool {
        let usage = usage::usage_of(data);
        if usage.is_some() {
            self.usage = usage;
        }
        if carries_output(data) {
            let now = *self.read_at.get_or_insert_with(Instant::now);
            self.output_estimate += 1;
            if self.first_token.is_none() {
                self.first_token = Some(now);
            }
            if let (Some(last), Some(h)) = (self.last_token, &self.inter_token) {
                // Tokens of one read share its clock reading: their gap is nothing, and
                // needs no subtraction of the two.
                let gap = match last == now {
                    true => 0.0,
                    false => now.duration_since(last).as_secs_f64(),
                };
                h.observe(gap);
            }
            self.last_token = Some(now);
        }
        usage.is_some()
    }

    /// A whole (non-streamed) JSON answer.
    pub fn body(&mut self, json: &[u8]) {
        self.usage = usage::usage_of(json);
        if self.usage.is_none() {
            self.output_estimate = usage::estimate_output(json);
        }
    }
}

/// Whether a chunk carries generated output: a non-empty `content`, `reasoning_content`,
/// `reasoning` or tool-call `arguments` string.
pub fn carries_output(data: &[u8]) -> bool {
    [
        &scan::CONTENT,
        &scan::REASONING_CONTENT,
        &scan::REASONING,
        &scan::ARGUMENTS,
    ]
    .into_iter()
    .any(|key| scan::has_nonempty_string(data, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_recognised_in_every_delta_kind() {
        assert!(carries_output(
            br#"{"choices":[{"delta":{"content":"Hi"}}]}"#
        ));
        assert!(carries_output(
            br#"{"choices":[{"delta":{"reasoning_content": "hm"}}]}"#
        ));
        assert!(carries_output(
            br#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\""}}]}}]}"#
        ));
        assert!(!carries_output(
            br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(!carries_output(
            br#"{"choices":[{"delta":{"content":null}}]}"#
        ));
        assert!(!carries_output(
            br#"{"choices":[],"usage":{"prompt_tokens":3}}"#
        ));
    }

    #[test]
    fn running_usage_replaces_rather_than_adds() {
        let mut o = Observed::new(None);
        o.event(br#"{"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#);
        o.event(br#"{"choices":[{"delta":{"content":"b"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#);
        assert_eq!(o.usage.unwrap().output, 2);
        assert_eq!(o.usage.unwrap().input, 5);
        assert_eq!(o.output_estimate, 2);
    }

    #[test]
    fn look_alikes_neither_report_usage_nor_count_as_output() {
        let mut o = Observed::new(None);
        // A usage object inside the content, escaped, and a nested one beside a null.
        assert!(!o.event(br#"{"choices":[{"delta":{"content":"\"usage\":{\"prompt_tokens\":9}"}}],"usage":null}"#));
        assert!(!o.event(
            br#"{"choices":[{"delta":{"content":"","usage":{"prompt_tokens":9}}}],"usage":null}"#
        ));
        assert_eq!((o.usage, o.output_estimate), (None, 1));
        // The key of the content inside another string is not the content.
        assert!(!carries_output(
            br#"{"choices":[{"delta":{"role":"x \"content\": \"y\"","content":""}}]}"#
        ));
        assert!(o.event(br#"{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#));
        assert_eq!(o.usage.map(|u| (u.input, u.output)), Some((4, 2)));
        assert_eq!(o.output_estimate, 1);
    }
}
