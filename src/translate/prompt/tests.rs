use super::*;
use serde_json::json;

fn rules() -> PromptRules {
    PromptRules {
        per_message: 8,
        per_request: 64,
        max_image_tokens: 1000,
        tokenizer: None,
    }
}

fn count(body: Value) -> u64 {
    Counter::new(&rules()).body(body.as_object().unwrap())
}

#[test]
fn one_token_per_byte_of_rendered_text_plus_the_template() {
    // 64 + 8 + "user" + "Hello"
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "Hello"}]});
    assert_eq!(count(body), 64 + 8 + 4 + 5);
    // A CJK character is 3 bytes, an emoji 4.
    let body = json!({"messages": [{"role": "user", "content": "日本🙂"}]});
    assert_eq!(count(body), 64 + 8 + 4 + 10);
}

#[test]
fn an_image_reserves_the_model_maximum_whatever_its_size() {
    let url = format!("data:image/png;base64,{}", "A".repeat(100_000));
    let body = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it"},
        {"type": "image_url", "image_url": {"url": url}}]}]});
    assert_eq!(count(body), 64 + 8 + 4 + 10 + 1000);
}

#[test]
fn tools_and_arguments_count_as_indented_json() {
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let body = json!({"messages": [{"role": "user", "content": ""}], "tools": tools});
    assert_eq!(count(body), 64 + 8 + 4 + indented(&tools).len() as u64);
    let body = json!({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}]});
    // "{\n    \"a\": 1\n}" is longer than the 7 bytes sent.
    assert_eq!(count(body), 64 + 8 + 9 + 2 + 1 + 14);
}

#[test]
fn the_parse_counts_what_the_tree_counts() {
    let body = json!({"model": "m", "messages": [
        {"role": "system", "type": "ignored", "content": {"text": "an object", "n": -2.5}},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "one\ntwo \u{e9}"},
            {"text": "keeps", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "extra", "note": 7},
            {"text": 12},
            "a bare string",
            {"type": "image_url", "note": "before the key", "image_url": {"url": "data:,"}}]},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":[1,2]}"}},
            {"id": "c2", "function": {"name": "g", "arguments": {"b": null}}},
            "odd"], "n": [1e3, -7, 0.25]}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "documents": null,
        "chat_template_kwargs": {"enable_thinking": true, "style": "terse", "n": 18446744073709551615u64},
        "temperature": 0.5});
    let tree = count(body.clone());
    let parsed = crate::translate::openai::ChatRequest::parse(body.to_string().as_bytes())
        .unwrap()
        .prompt_tokens(&rules());
    assert_eq!(parsed, tree);
    assert!(tree > 64 + 4 * 8 + 1000);
}

#[test]
fn text_serde_cannot_decode_is_refused_rather_than_counted_short() {
    use crate::translate::openai::ChatRequest;
    let parse = |body: &str| ChatRequest::parse(body.as_bytes()).map(|_| ());
    // A lone surrogate, and a number past f64, where a template renders them: the prompt
    // could not be counted.
    let e = parse(r#"{"model":"a","messages":[{"role":"user","content":"\ud800 and more"}]}"#);
    assert_eq!(e.unwrap_err().code, "invalid_json");
    let e = parse(r#"{"model":"a","messages":[{"role":"user","content":"x","n":1e999}]}"#);
    assert_eq!(e.unwrap_err().code, "invalid_json");
    // Elsewhere in the body they reach the replica untouched.
    assert!(parse(r#"{"model":"a","messages":[{"role":"user"}],"x":"\ud800","y":1e999}"#).is_ok());
}
