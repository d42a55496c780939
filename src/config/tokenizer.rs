//! A model's Hugging Face `tokenizer.json`, loaded from disk with the config, and the rules
//! its prompts are counted by.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a model's prompts are counted for reservations (see `translate::prompt`).
#[derive(Debug, Clone)]
pub struct PromptRules {
    /// Tokens the chat template adds around each message.
    pub per_message: u32,
    /// Tokens the chat template adds once: begin-of-text, a default system prompt, the
    /// generation prompt.
    pub per_request: u32,
    /// Tokens reserved for each image (or other media part).
    pub max_image_tokens: u32,
    /// Counts text exactly; without one, a token per UTF-8 byte.
    pub tokenizer: Option<Tokenizer>,
}

pub const DEFAULT_PER_MESSAGE: u32 = 8;
pub const DEFAULT_PER_REQUEST: u32 = 64;
pub const DEFAULT_MAX_IMAGE_TOKENS: u32 = 4096;

/// The largest tokenizer file read: real ones are at most a few tens of MiB.
const MAX_FILE_BYTES: u64 = 256 << 20;

impl Default for PromptRules {
    fn default() -> Self {
        PromptRules {
            per_message: DEFAULT_PER_MESSAGE,
            per_request: DEFAULT_PER_REQUEST,
            max_image_tokens: DEFAULT_MAX_IMAGE_TOKENS,
            tokenizer: None,
        }
    }
}

/// A loaded tokenizer, read again on every load of the config. Encoding takes `&self`:
/// requests count in parallel without a lock.
#[derive(Clone)]
pub struct Tokenizer {
    path: PathBuf,
    inner: Arc<tokenizers::Tokenizer>,
}

impl Tokenizer {
    /// Reads and parses `path`; the error says why, for the config error that names it.
    pub fn load(path: &Path) -> Result<Tokenizer, String> {
        let cannot_read = |e: std::io::Error| format!("cannot read {path:?}: {e}");
        let mut text = Vec::new();
        // A path to a device or a pipe must not hang the load.
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut text))
            .map_err(cannot_read)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(format!(
                "{path:?} is larger than {} MiB, more than any tokenizer.json; name the model's tokenizer.json",
                MAX_FILE_BYTES >> 20
            ));
        }
        let inner = tokenizers::Tokenizer::from_bytes(&text).map_err(|e| {
            format!("{path:?} is not a Hugging Face tokenizer.json ({e}); use the tokenizer.json the model ships with")
        })?;
        Ok(Tokenizer {
            path: path.to_path_buf(),
            inner: Arc::new(inner),
        })
    }

    /// Tokens of `text` alone, without the special tokens a template adds. A text the
    /// tokenizer cannot encode counts a token per byte, which bounds it.
    pub fn count(&self, text: &str) -> u64 {
        self.pieces(text).unwrap_or(text.len() as u64)
    }

    /// `encode` up to the tokens, without the `Encoding` it would build from them (ids,
    /// strings, offsets, masks), of which only the number is needed here.
    fn pieces(&self, text: &str) -> tokenizers::Result<u64> {
        use tokenizers::{Model as _, OffsetReferential, OffsetType, PreTokenizer as _};
        let t = &*self.inner;
        let mut pieces = t
            .get_added_vocabulary()
            .extract_and_normalize(t.get_normalizer(), text);
        if let Some(pre) = t.get_pre_tokenizer() {
            pre.pre_tokenize(&mut pieces)?;
        }
        let model = t.get_model();
        pieces.tokenize(|normalized| model.tokenize(normalized.get()))?;
        Ok(pieces
            .get_splits(OffsetReferential::Original, OffsetType::None)
            .iter()
            .map(|(_, _, tokens)| tokens.as_ref().map_or(0, |t| t.len() as u64))
            .sum())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tokenizer({:?})", self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_tokenizer_is_refused_naming_it() {
        let e = Tokenizer::load(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert!(
            e.starts_with("cannot read \"/nonexistent/tokenizer.json\""),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, "{}").unwrap();
        let e = Tokenizer::load(&path).unwrap_err();
        assert!(e.contains("is not a Hugging Face tokenizer.json"), "{e}");
        // An endless file is cut off, not read until memory runs out.
        let e = Tokenizer::load(Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("is larger than 256 MiB"), "{e}");
    }
}
