//! The count_tokens estimate: no tokenizer, a deterministic formula.
//!
//! ```text
//! tokens = 3                                    (priming the reply)
//!        + Σ messages (the system prompt counts as one):
//!              4 + ⌈text bytes / 4⌉ + 1,600 × images
//!        + Σ tools: 8 + ⌈JSON bytes of name, description and input_schema / 4⌉
//! ```
//!
//! Text is every string the replica will read: text blocks, tool names and compact input
//! JSON of `tool_use`, tool result text. UTF-8 bytes rather than characters: four bytes a
//! token is close for English and code, and a CJK character (3 bytes) then counts as ¾ of a
//! token instead of ¼, nearer the truth. 1,600 is what Anthropic bills an image of about
//! 1.15 megapixels, the size they resize to; smaller images cost less, so this errs high.
//! Thinking blocks are dropped before the replica, so they do not count.

use super::content::{Block, ResultPart};
use super::request::MessagesRequest;

const REPLY_PRIMING: u64 = 3;
const PER_MESSAGE: u64 = 4;
const PER_TOOL: u64 = 8;
const PER_IMAGE: u64 = 1_600;
const BYTES_PER_TOKEN: u64 = 4;

impl MessagesRequest {
    /// The estimated prompt tokens of this request (see the module doc for the formula).
    pub fn estimate_input_tokens(&self) -> u32 {
        let mut total = REPLY_PRIMING;
        if !self.system.is_empty() {
            let bytes: usize = self.system.iter().map(String::len).sum();
            total += PER_MESSAGE + tokens(bytes);
        }
        for message in &self.messages {
            let mut bytes = 0usize;
            let mut images = 0u64;
            for block in &message.blocks {
                match block {
                    Block::Text(t) => bytes += t.len(),
                    Block::Image(_) => images += 1,
                    Block::ToolUse { name, input, .. } => {
                        bytes += name.len() + input.to_string().len();
                    }
                    Block::ToolResult { parts, .. } => {
                        for part in parts {
                            match part {
                                ResultPart::Text(t) => bytes += t.len(),
                                ResultPart::Image(_) => images += 1,
                            }
                        }
                    }
                }
            }
            total += PER_MESSAGE + tokens(bytes) + PER_IMAGE * images;
        }
        for tool in &self.tools {
            let bytes = tool.name.len()
                + tool.description.as_ref().map_or(0, String::len)
                + tool.input_schema.to_string().len();
            total += PER_TOOL + tokens(bytes);
        }
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

fn tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(BYTES_PER_TOKEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn estimate(body: &str) -> u32 {
        MessagesRequest::parse(body.as_bytes())
            .unwrap()
            .estimate_input_tokens()
    }

    #[test]
    fn formula_is_followed_exactly() {
        // 3 + (4 + ⌈5/4⌉)
        assert_eq!(
            estimate(
                r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"hello"}]}"#
            ),
            9
        );
        // 3 + system (4 + ⌈8/4⌉) + user (4 + ⌈2/4⌉ + 1600)
        let body = r#"{"model":"m","max_tokens":1,"system":"be brief",
            "messages":[{"role":"user","content":[{"type":"text","text":"hi"},
            {"type":"image","source":{"type":"url","url":"https://e.x/a.png"}}]}]}"#;
        assert_eq!(estimate(body), 3 + 6 + 1605);
        // A tool: 8 + ⌈(1 + 0 + 17)/4⌉ for name "t" and {"type":"object"}.
        let body = r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"hello"}],
            "tools":[{"name":"t","input_schema":{"type":"object"}}]}"#;
        assert_eq!(estimate(body), 9 + 13);
    }

    #[test]
    fn thinking_is_not_counted_and_the_result_is_stable() {
        let plain = r#"{"model":"m","max_tokens":1,"messages":[
            {"role":"user","content":"q"},{"role":"assistant","content":"a"},
            {"role":"user","content":"q"}]}"#;
        let with_thinking = r#"{"model":"m","max_tokens":1,"messages":[
            {"role":"user","content":"q"},{"role":"assistant","content":[
            {"type":"thinking","thinking":"long long long","signature":"s"},
            {"type":"text","text":"a"}]},{"role":"user","content":"q"}]}"#;
        assert_eq!(estimate(plain), estimate(with_thinking));
        assert_eq!(estimate(plain), estimate(plain));
    }
}
