//! The reservation's guarantee, as a property: for any prompt (words, one-letter words, CJK,
//! code, emoji, arbitrary text, images), the prompt tokens tollgate reserves are never fewer
//! than a real byte-level BPE tokenizer counts for the prompt a chat template renders; with
//! that tokenizer configured, never fewer either, and never more than the bound. Both
//! surfaces count the same for the same conversation.

#[path = "support/tiny_tokenizer.rs"]
mod tiny_tokenizer;

use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::{json, Value};
use tollgate::config::{self, PromptRules, Tokenizer};
use tollgate::translate::openai::ChatRequest;
use tollgate::translate::prompt::Counter;
use tollgate::translate::ModelRequest;
use tollgate::vocab::Endpoint;

const MAX_IMAGE_TOKENS: u32 = 1000;

/// The tokenizer, trained once and written where tollgate loads it from.
fn tokenizer() -> &'static (tempfile::TempDir, Tokenizer, tokenizers::Tokenizer) {
    static TOKENIZER: OnceLock<(tempfile::TempDir, Tokenizer, tokenizers::Tokenizer)> =
        OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_tokenizer::write(dir.path());
        let ours = Tokenizer::load(&path).unwrap();
        let theirs = tokenizers::Tokenizer::from_file(&path).unwrap();
        (dir, ours, theirs)
    })
}

fn rules(tokenizer: Option<Tokenizer>) -> PromptRules {
    PromptRules {
        max_image_tokens: MAX_IMAGE_TOKENS,
        tokenizer,
        ..PromptRules::default()
    }
}

#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    /// An image the engine turns into this many tokens (at most the model's maximum).
    Image(u32),
}

fn text() -> impl Strategy<Value = String> {
    let words = prop::sample::select(vec![
        "a",
        "I",
        "x",
        "the",
        "token",
        "café",
        "naïve",
        "Zürich",
        "🙂",
        "🚀🔥",
        "日本",
        "東京都",
        "汉字",
        "测试",
        "fn",
        "{",
        "}",
        "();",
        "=>",
        "\"",
        "\\n",
        "\t",
        "  ",
        "\n",
        "0",
        "42",
        "3.14",
        "<|end|>",
        "<",
        "|",
    ]);
    prop_oneof![
        prop::collection::vec(words, 0..200).prop_map(|w| w.join(" ")),
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..300)
            .prop_map(|w| w.join(" ")),
        "\\PC{0,300}",
        "[\\u{3040}-\\u{30ff}\\u{4e00}-\\u{9fff}]{0,200}",
        "[\\u{1f300}-\\u{1faff}]{0,100}",
        "[a-z_(){};=<>\\[\\]\"' \\n\\t0-9.,:]{0,400}",
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => text().prop_map(Piece::Text),
        1 => (0..=MAX_IMAGE_TOKENS).prop_map(Piece::Image),
    ]
}

fn conversation() -> impl Strategy<Value = Vec<(&'static str, Vec<Piece>)>> {
    let role = prop::sample::select(vec!["system", "user", "assistant", "user"]);
    prop::collection::vec((role, prop::collection::vec(piece(), 1..4)), 1..6)
}

/// The Chat Completions body of a conversation.
fn chat_body(conversation: &[(&str, Vec<Piece>)]) -> Value {
    let messages: Vec<Value> = conversation
        .iter()
        .map(|(role, pieces)| {
            let parts: Vec<Value> = pieces
                .iter()
                .map(|p| match p {
                    Piece::Text(t) => json!({"type": "text", "text": t}),
                    Piece::Image(_) => json!({"type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}}),
                })
                .collect();
            json!({"role": role, "content": parts})
        })
        .collect();
    json!({"model": "m", "messages": messages})
}

/// What a chat template makes of it, tokenized as the engine does: special tokens around
/// each message and for each image token, text parts joined by a newline.
fn rendered_tokens(conversation: &[(&str, Vec<Piece>)]) -> u64 {
    let mut prompt = String::from("<|begin|>");
    for (role, pieces) in conversation {
        prompt.push_str("<|start|>");
        prompt.push_str(role);
        prompt.push('\n');
        let mut texts = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => texts.push(t.as_str()),
                Piece::Image(n) => prompt.push_str(&"<|image|>".repeat(*n as usize)),
            }
        }
        prompt.push_str(&texts.join("\n"));
        prompt.push_str("<|end|>");
    }
    prompt.push_str("<|start|>assistant\n");
    let encoding = tokenizer().2.encode(prompt.as_str(), false).unwrap();
    encoding.len() as u64
}

fn counted(body: &Value, rules: &PromptRules) -> u64 {
    Counter::new(rules).body(body.as_object().unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_reservation_is_never_below_the_tokenizer(conversation in conversation()) {
        let body = chat_body(&conversation);
        let real = rendered_tokens(&conversation);
        let bound = counted(&body, &rules(None));
        let exact = counted(&body, &rules(Some(tokenizer().1.clone())));
        prop_assert!(bound >= real, "bound {} < {} tokens", bound, real);
        prop_assert!(exact >= real, "tokenizer count {} < {} tokens", exact, real);
        prop_assert!(exact <= bound, "tokenizer count {} > bound {}", exact, bound);
        // The same body through the request parser counts the same.
        let parsed = ChatRequest::parse(body.to_string().as_bytes()).unwrap();
        prop_assert_eq!(parsed.prompt_tokens(&rules(None)), bound);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_text_counts_what_the_tokenizer_encodes(text in text()) {
        let (_, ours, theirs) = tokenizer();
        let encoded = theirs.encode(text.as_str(), false).unwrap().len() as u64;
        prop_assert_eq!(ours.count(&text), encoded);
    }
}

/// A model for the Messages surface, its rules the ones above.
fn model() -> std::sync::Arc<config::Model> {
    let text = format!(
        "[[pools]]\nname = \"p\"\nreplicas = [\"127.0.0.1:9\"]\n\n[[models]]\nslug = \"m\"\npool = \"p\"\ninput_modalities = [\"text\", \"image\"]\nmax_image_tokens = {MAX_IMAGE_TOKENS}\n\n[[keys]]\nid = \"k\"\nsha256 = \"{}\"\nmodels = [\"*\"]\n",
        "0".repeat(64)
    );
    config::parse(&text).unwrap().models[0].clone()
}

/// An Anthropic conversation: system text first, then alternating turns whose user turns
/// may carry images and tool results.
fn messages_body(conversation: &[(&str, Vec<Piece>)]) -> Value {
    let mut system = Vec::new();
    let mut messages = Vec::new();
    for (i, (role, pieces)) in conversation.iter().enumerate() {
        let role = match *role {
            "system" => {
                system.extend(pieces.iter().filter_map(|p| match p {
                    Piece::Text(t) => Some(t.clone()),
                    Piece::Image(_) => None,
                }));
                continue;
            }
            r => r,
        };
        let mut blocks: Vec<Value> = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => blocks.push(json!({"type": "text", "text": t})),
                Piece::Image(_) if role == "user" => blocks.push(json!({"type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}})),
                Piece::Image(_) => blocks.push(json!({"type": "tool_use", "id": format!("t{i}"),
                    "name": "look", "input": {"q": i, "why": "to see"}})),
            }
        }
        if role == "user" && i % 2 == 0 {
            blocks.push(
                json!({"type": "tool_result", "tool_use_id": format!("t{i}"),
                "content": [{"type": "text", "text": "seen"},
                    {"type": "image", "source": {"type": "url", "url": "https://e.x/a.png"}}]}),
            );
        }
        messages.push(json!({"role": role, "content": blocks}));
    }
    if messages.is_empty() {
        messages.push(json!({"role": "user", "content": "hi"}));
    }
    json!({"model": "m", "max_tokens": 5, "system": system.join("\n"), "messages": messages,
        "tools": [{"name": "look", "description": "Looks", "input_schema": {"type": "object"}}]})
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn both_surfaces_count_a_conversation_the_same(conversation in conversation()) {
        let model = model();
        let body = messages_body(&conversation);
        let Ok(mut request) = ModelRequest::parse(Endpoint::Messages, body.to_string().as_bytes()) else {
            // Turn orders the Messages API refuses are not this test's concern.
            return Ok(());
        };
        let on_messages = request.prompt_tokens(&model);
        let ModelRequest::Messages(r) = &request else { unreachable!() };
        let translated = r.to_openai(&model.upstream_model, model.reasoning_switch);
        let chat = ChatRequest::parse(translated.to_string().as_bytes()).unwrap();
        prop_assert_eq!(chat.prompt_tokens(&model.prompt), on_messages);
    }
}
