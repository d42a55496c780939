//! The prompt's reservation holds for any text: an upper bound of its tokens (exact with the
//! model's tokenizer), images at the model's maximum on both surfaces. The simulated replica
//! is told to count one token per word, as real tokenizers do for short words, where four
//! bytes a token would have been a quarter of that.

use serde_json::{json, Value};

use crate::common::*;
use crate::tiny_tokenizer;

/// The standard config with the test model at $10 / $30 per million tokens, taking images,
/// and `key_extra` for team-a.
fn priced(sim: &SimReplica, key_extra: &str) -> String {
    config_with(sim, key_extra).replace(
        "price = { input_per_mtok = 0.5, cached_input_per_mtok = 0.1, output_per_mtok = 1.5 }",
        "price = { input_per_mtok = 10, output_per_mtok = 30 }\ninput_modalities = [\"text\", \"image\"]\nmax_image_tokens = 1000",
    )
}

/// `n` one-letter words with `max_tokens: 1`; the replica counts a token per word.
fn words(n: usize) -> Value {
    json!({"model": MODEL, "max_tokens": 1,
        "messages": [{"role": "user", "content": vec!["a"; n].join(" ")}],
        "sim": {"prompt_tokens": n, "ttft_ms": 300}})
}

fn spent(key: &Value) -> f64 {
    key["budget"]["spent_usd"].as_f64().expect("spend")
}

#[tokio::test]
async fn a_prompt_of_short_words_cannot_take_spend_past_the_budget() {
    let sim = sim().await;
    let gw = Gateway::start(&priced(&sim, "budget = { usd = 0.01, period = \"total\" }"));
    // 460 tokens and 1 output token: $0.00463. Its reservation, 995 prompt tokens at one a
    // byte, fits the $0.01.
    assert_eq!(gw.chat(words(460)).await.status(), 200);
    gw.wait_key_idle("team-a", "the first request settles")
        .await;
    assert!((spent(&gw.key_state("team-a").await) - 0.00463).abs() < 1e-9);
    // 1,000 words would cost $0.01003 more: at about 4 bytes a token it looked like 504
    // tokens, and was admitted.
    let r = gw.chat(words(1000)).await;
    assert_eq!(r.status(), 402);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "budget_exceeded");
    let key = gw.key_state("team-a").await;
    assert!((spent(&key) - 0.00463).abs() < 1e-9, "{key}");
    assert_eq!(key["budget"]["reserved_usd"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_prompts_of_short_words_stay_within_the_budget() {
    let sim = sim().await;
    let gw = Gateway::start(&priced(&sim, "budget = { usd = 0.01, period = \"total\" }"));
    // Each reserves 275 prompt tokens and 1 output: $0.00278, so 3 fit; each costs $0.00103.
    let responses = futures_util::future::join_all((0..16).map(|_| gw.chat(words(100)))).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    let refused = responses.iter().filter(|r| r.status() == 402).count();
    assert_eq!((ok, refused), (3, 13));
    gw.wait_key_idle("team-a", "the admitted requests settle")
        .await;
    let key = gw.key_state("team-a").await;
    assert!(spent(&key) <= 0.01, "{key}");
    assert!((spent(&key) - 3.0 * 0.00103).abs() < 1e-9, "{key}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_cannot_be_passed_with_short_words() {
    let sim = sim().await;
    let gw = Gateway::start(&priced(&sim, "tpm = 1000"));
    // Each reserves 276 tokens (3 fit in 1,000) and uses 101.
    let responses = futures_util::future::join_all((0..16).map(|_| gw.chat(words(100)))).await;
    assert_eq!(responses.iter().filter(|r| r.status() == 200).count(), 3);
    gw.wait_key_idle("team-a", "the admitted requests settle")
        .await;
    let key = gw.key_state("team-a").await;
    assert_eq!(key["usage"]["tokens_last_minute"], 303, "{key}");
}

fn reserved(r: &reqwest::Response, tpm: u64) -> u64 {
    let remaining: u64 = r.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    tpm - remaining
}

#[tokio::test]
async fn an_image_reserves_the_model_maximum_on_both_surfaces() {
    let sim = sim().await;
    let gw = Gateway::start(&priced(&sim, "tpm = 1000000"));
    // 600 KB of base64: what the image becomes is up to the engine, never its size in text.
    let data = "iVBORw0KGgo".repeat(60_000);
    let chat = json!({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}")}}]}]});
    let r = gw.chat(chat).await;
    assert_eq!(r.status(), 200);
    let on_chat = reserved(&r, 1_000_000);
    let used: Value = r.json().await.unwrap();
    let used = used["usage"]["total_tokens"].as_u64().unwrap();
    // 64 per request, 8 for the message, "user", "what is this", the image, the output cap.
    assert_eq!(on_chat, 64 + 8 + 4 + 12 + 1000 + 10);
    gw.wait_key_idle("team-a", "the chat request settles").await;

    let messages = json!({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}]});
    let r = gw.messages(messages).await;
    assert_eq!(r.status(), 200);
    // The window also holds what the first request used.
    assert_eq!(reserved(&r, 1_000_000) - used, on_chat);
}

#[tokio::test]
async fn a_model_with_a_tokenizer_counts_prompts_exactly_plus_its_template() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_tokenizer::write(dir.path());
    let tokenizer = tokenizers::Tokenizer::from_file(&file).unwrap();
    let count = |text: &str| tokenizer.encode(text, false).unwrap().len() as u64;
    let config = priced(&sim, "tpm = 1000000").replace(
        "max_image_tokens = 1000",
        &format!("max_image_tokens = 1000\ntokenizer = {file:?}\ntemplate_overhead = {{ per_message = 5, per_request = 20 }}"),
    );
    let gw = Gateway::start(&config);
    let system = "You answer in one short sentence.";
    let text = "Wie heißt die Hauptstadt von Japan? 日本の首都は何ですか 🙂 fn main() {}";
    let count_tokens = |system: &str, text: &str| {
        client()
            .post(gw.url("/v1/messages/count_tokens"))
            .header("x-api-key", KEY)
            .json(&json!({"model": MODEL, "system": system,
                "messages": [{"role": "user", "content": text}]}))
            .send()
    };
    let r = count_tokens(system, text).await.unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    let exact = 20 + 2 * 5 + count("system") + count(system) + count("user") + count(text);
    assert_eq!(answer["input_tokens"], exact);
    // A long prompt is tokenized off the request's thread, to the same count.
    let long = format!("{text} ").repeat(1500);
    let r = count_tokens(system, &long).await.unwrap();
    let answer: Value = r.json().await.unwrap();
    let exact_long = exact - count(text) + count(&long);
    assert_eq!(answer["input_tokens"], exact_long);
    // A request reserves the same count, plus its output cap.
    let r = gw
        .chat(json!({"model": MODEL, "max_tokens": 7, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": text}]}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(reserved(&r, 1_000_000), exact + 7);
}

#[tokio::test]
async fn a_tokenizer_file_that_is_not_one_is_refused_naming_it() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokenizer.json");
    std::fs::write(&file, "{\"not\": \"a tokenizer\"}").unwrap();
    let config =
        priced(&sim, "").replace("max_image_tokens = 1000", &format!("tokenizer = {file:?}"));
    let e = Gateway::try_start(&config).err().expect("refused");
    assert!(e.contains("models[0].tokenizer"), "{e}");
    assert!(e.contains("is not a Hugging Face tokenizer.json"), "{e}");

    // A reload to it keeps the running config, which still serves.
    let gw = Gateway::start(&priced(&sim, ""));
    let running = std::fs::read_to_string(gw.config_path()).unwrap();
    let text = running.replace("max_image_tokens = 1000", &format!("tokenizer = {file:?}"));
    std::fs::write(gw.config_path(), text).unwrap();
    assert_eq!(gw.reload().await, 400);
    assert_eq!(gw.chat(ask(5)).await.status(), 200);
}

#[tokio::test]
async fn a_chat_template_sent_with_the_request_is_refused_on_both_surfaces() {
    let sim = sim().await;
    let gw = Gateway::start(&priced(&sim, ""));
    // Rendered by the replica, it would make 3 tokens a prompt of 3 million.
    let template = "{% for i in range(1000000) %}{{ messages[0].content }}{% endfor %}";
    let mut body = ask(5);
    body["chat_template"] = json!(template);
    let r = gw.chat(body).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "chat_template");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("chat_template_kwargs"));
    let r = gw
        .messages(
            json!({"model": MODEL, "max_tokens": 5, "chat_template": template,
            "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("chat_template"));
    assert_eq!(sim.stats().requests(), 0);
}
