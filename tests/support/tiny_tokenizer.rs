//! A small byte-level BPE `tokenizer.json`, trained in the test from text made here: no
//! download, the same kind of tokenizer as Llama 3's or Qwen's, only with a smaller
//! vocabulary. Its special tokens stand for a chat template's.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The special tokens a test's template renders around messages and for images.
pub const SPECIAL: &[&str] = &["<|begin|>", "<|start|>", "<|end|>", "<|image|>"];

/// Trains the tokenizer and writes it to `dir/tokenizer.json`.
pub fn write(dir: &Path) -> PathBuf {
    let path = dir.join("tokenizer.json");
    train()
        .save(&path, false)
        .expect("the tokenizer can be written");
    path
}

/// A byte-level BPE of a few hundred merges over English, code, CJK and emoji.
pub fn train() -> Tokenizer {
    let mut tokenizer = Tokenizer::new(BPE::default());
    // As Llama 3 and Qwen: no space added before the text.
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let special: Vec<AddedToken> = SPECIAL
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let mut trainer = TrainerWrapper::from(
        BpeTrainerBuilder::new()
            .vocab_size(600)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(special)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let corpus = corpus();
    tokenizer
        .train(&mut trainer, corpus.iter())
        .expect("the tokenizer trains");
    tokenizer
}

fn corpus() -> Vec<String> {
    let lines = [
        "The quick brown fox jumps over the lazy dog, and the dog sleeps on.",
        "fn main() { let x = vec![1, 2, 3]; println!(\"{:?}\", x.iter().sum::<i32>()); }",
        "def handler(event, context):\n    return {\"status\": 200, \"body\": event}",
        "日本語のテキストも少し含めます。東京は日本の首都です。",
        "汉字和中文句子也在这里，测试分词器。",
        "Emoji too 🙂🚀🔥 and accents: café, naïve, Zürich.",
        "{\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\"}}",
    ];
    (0..20)
        .flat_map(|i| lines.iter().map(move |l| format!("{l} {i}")))
        .collect()
}
