//! A prompt as the KV cache sees it: fixed-size blocks of tokens, each named by a hash chained
//! over every token before it, so two prompts share a block's name exactly when they share
//! everything up to its end (vLLM's prefix caching keys blocks the same way).
//!
//! The sim has no tokenizer. Its tokens are the same units `request::prompt_tokens` counts:
//! the tool definitions in 4-byte pieces (first, where chat templates render them), then per
//! message 4 role-marker tokens, its text in 4-character pieces and 85 tokens per image. The
//! count therefore always matches the prompt tokens the replica reports.

use std::hash::{DefaultHasher, Hasher};

use serde_json::Value;

/// Tokens per image, as `request::prompt_tokens` counts them.
const IMAGE_TOKENS: usize = 85;
/// Role-marker tokens per message.
const MESSAGE_OVERHEAD: usize = 4;
/// Characters or bytes per text token.
const TOKEN_CHARS: usize = 4;

/// The chained hashes of every full block of the prompt; a partial last block has none.
pub(crate) fn block_hashes(
    messages: &[Value],
    tools: Option<&Value>,
    block_tokens: usize,
) -> Vec<u64> {
    let mut chain = Chain::new(block_tokens.max(1));
    if let Some(tools @ Value::Array(list)) = tools {
        if !list.is_empty() {
            for piece in tools.to_string().as_bytes().chunks(TOKEN_CHARS) {
                chain.token(piece);
            }
        }
    }
    for message in messages {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        for i in 0..MESSAGE_OVERHEAD {
            chain.token(&[role.as_bytes(), &[0xfe, i as u8]].concat());
        }
        let mut text = String::new();
        let mut images = Vec::new();
        match message.get("content") {
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(parts)) => {
                for part in parts {
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""))
                        }
                        Some("image_url") => images.push(
                            part.pointer("/image_url/url")
                                .and_then(Value::as_str)
                                .unwrap_or(""),
                        ),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(TOKEN_CHARS) {
            let piece: String = piece.iter().collect();
            chain.token(piece.as_bytes());
        }
        for url in images {
            for i in 0..IMAGE_TOKENS {
                chain.token(&[url.as_bytes(), &[0xfd], &(i as u32).to_le_bytes()].concat());
            }
        }
    }
    chain.blocks
}

/// Hashes tokens into blocks, each block's hash seeded with the one before it.
struct Chain {
    block_tokens: usize,
    in_block: usize,
    hasher: DefaultHasher,
    blocks: Vec<u64>,
}

impl Chain {
    fn new(block_tokens: usize) -> Chain {
        Chain {
            block_tokens,
            in_block: 0,
            // `DefaultHasher::new` has fixed keys: the same prompt names the same blocks in
            // every replica and every run.
            hasher: DefaultHasher::new(),
            blocks: Vec::new(),
        }
    }

    fn token(&mut self, bytes: &[u8]) {
        // Length-prefixed, so that token boundaries are part of the name.
        self.hasher.write_usize(bytes.len());
        self.hasher.write(bytes);
        self.in_block += 1;
        if self.in_block == self.block_tokens {
            let hash = self.hasher.finish();
            self.blocks.push(hash);
            self.hasher = DefaultHasher::new();
            self.hasher.write_u64(hash);
            self.in_block = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::request::prompt_tokens;
    use serde_json::json;

    /// Tokens walked: with one-token blocks, one hash each.
    fn count(messages: &[Value], tools: Option<&Value>) -> u64 {
        block_hashes(messages, tools, 1).len() as u64
    }

    #[test]
    fn tokens_match_the_reported_prompt_count() {
        let tools = json!([{"type": "function", "function": {"name": "lookup"}}]);
        let messages = [
            json!({"role": "system", "content": "You are terse. Ünïcödé counts by character."}),
            json!({"role": "user", "content": [
                {"type": "text", "text": "What is"},
                {"type": "text", "text": " this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
            ]}),
            json!({"role": "assistant", "content": null}),
        ];
        assert_eq!(count(&messages, None), prompt_tokens(&messages, None));
        assert_eq!(
            count(&messages, Some(&tools)),
            prompt_tokens(&messages, Some(&tools))
        );
    }

    #[test]
    fn blocks_are_shared_exactly_up_to_the_first_difference() {
        let system = json!({"role": "system", "content": "s".repeat(200)});
        let a = [
            system.clone(),
            json!({"role": "user", "content": "first question ".repeat(20)}),
        ];
        let b = [
            system,
            json!({"role": "user", "content": "other question ".repeat(20)}),
        ];
        let (a, b) = (block_hashes(&a, None, 16), block_hashes(&b, None, 16));
        // 4 + 50 tokens of system prompt, then 4 role tokens: the first 3 blocks (48 tokens)
        // hold only the system prompt; the 4th mixes in the user turn's text.
        assert_eq!((a.len(), b.len()), (8, 8));
        assert_eq!(a[..3], b[..3]);
        assert!(a[3..].iter().zip(&b[3..]).all(|(x, y)| x != y));
        // A longer history keeps every block of the shorter one.
        let history = [json!({"role": "user", "content": "x".repeat(100)})];
        let longer = [
            history[0].clone(),
            json!({"role": "assistant", "content": "y".repeat(100)}),
        ];
        let (short, long) = (
            block_hashes(&history, None, 16),
            block_hashes(&longer, None, 16),
        );
        assert_eq!(long[..short.len()], short[..]);
    }
}
