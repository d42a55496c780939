//! Unit tests: request validation (each refusal names its field) and stream edge cases the
//! golden transcripts do not reach.

use serde_json::{json, Value};

use super::*;
use crate::translate::sse::SseFramer;

fn param(body: Value) -> String {
    let err = MessagesRequest::parse(body.to_string().as_bytes()).unwrap_err();
    assert!(err.message.ends_with('.'), "{}", err.message);
    err.param.unwrap_or_default()
}

fn with(extra: Value) -> Value {
    let mut body = json!({"model": "m", "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn user(content: Value) -> Value {
    with(json!({"messages": [{"role": "user", "content": content}]}))
}

#[test]
fn top_level_fields_are_checked() {
    assert_eq!(
        MessagesRequest::parse(b"[]").unwrap_err().code,
        "invalid_json"
    );
    assert_eq!(param(json!({"max_tokens": 1, "messages": []})), "model");
    assert_eq!(param(with(json!({"model": 3}))), "model");
    assert_eq!(param(with(json!({"max_tokens": null}))), "max_tokens");
    assert_eq!(param(with(json!({"max_tokens": 0}))), "max_tokens");
    assert_eq!(param(with(json!({"max_tokens": -5}))), "max_tokens");
    assert_eq!(param(with(json!({"max_tokens": 1.5}))), "max_tokens");
    assert_eq!(param(with(json!({"max_tokens": 1u64 << 40}))), "max_tokens");
    assert_eq!(param(with(json!({"messages": []}))), "messages");
    assert_eq!(param(with(json!({"messages": {}}))), "messages");
    assert_eq!(param(with(json!({"stream": "true"}))), "stream");
    assert_eq!(
        param(with(json!({"stop_sequences": "x"}))),
        "stop_sequences"
    );
    assert_eq!(
        param(with(json!({"stop_sequences": ["a", 1]}))),
        "stop_sequences[1]"
    );
    assert_eq!(param(with(json!({"temperature": "hot"}))), "temperature");
    assert_eq!(param(with(json!({"top_k": -1}))), "top_k");
    assert_eq!(param(with(json!({"system": 1}))), "system");
    assert_eq!(
        param(with(json!({"system": [{"type": "image"}]}))),
        "system[0].type"
    );
    assert_eq!(
        param(with(json!({"metadata": {"user_id": 5}}))),
        "metadata.user_id"
    );
    assert_eq!(
        param(with(json!({"thinking": {"type": "enabled"}}))),
        "thinking.budget_tokens"
    );
    assert_eq!(
        param(with(json!({"thinking": {"type": "on"}}))),
        "thinking.type"
    );
}

#[test]
fn messages_and_blocks_are_checked() {
    let dangling_call = json!({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]});
    assert_eq!(param(with(dangling_call)), "messages[1].content");
    assert_eq!(
        param(with(
            json!({"messages": [{"role": "system", "content": "a"}]})
        )),
        "messages[0].role"
    );
    assert_eq!(
        param(with(json!({"messages": [{"content": "a"}]}))),
        "messages[0].role"
    );
    assert_eq!(param(with(json!({"messages": ["a"]}))), "messages[0]");
    assert_eq!(param(user(Value::Null)), "messages[0].content");
    assert_eq!(param(user(json!(5))), "messages[0].content");
    assert_eq!(
        param(user(json!([{"text": "a"}]))),
        "messages[0].content[0].type"
    );
    assert_eq!(
        param(user(json!([{"type": "text"}]))),
        "messages[0].content[0].text"
    );
    let doc = json!([{"type": "document", "source": {"type": "text", "data": "x"}}]);
    let err = MessagesRequest::parse(user(doc).to_string().as_bytes()).unwrap_err();
    assert_eq!(err.param.as_deref(), Some("messages[0].content[0].type"));
    assert!(err.message.contains("not supported"));
    assert_eq!(
        param(user(json!([{"type": "web_search_tool_result"}]))),
        "messages[0].content[0].type"
    );
    let image = |source: Value| user(json!([{"type": "image", "source": source}]));
    assert_eq!(
        param(image(json!({"type": "base64", "data": "x"}))),
        "messages[0].content[0].source.media_type"
    );
    assert_eq!(
        param(image(json!({"type": "url"}))),
        "messages[0].content[0].source.url"
    );
    assert_eq!(
        param(image(json!({"type": "file", "file_id": "f"}))),
        "messages[0].content[0].source.type"
    );
    assert_eq!(
        param(user(
            json!([{"type": "tool_use", "id": "a", "name": "b", "input": {}}])
        )),
        "messages[0].content[0].type"
    );
    assert_eq!(
        param(user(json!([{"type": "tool_result"}]))),
        "messages[0].content[0].tool_use_id"
    );
    let bad_result =
        json!([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "document"}]}]);
    assert_eq!(
        param(user(bad_result)),
        "messages[0].content[0].content[0].type"
    );
    let history = |block: Value| {
        with(json!({"messages": [{"role": "user", "content": "a"},
            {"role": "assistant", "content": [block]}, {"role": "user", "content": "b"}]}))
    };
    assert_eq!(
        param(history(
            json!({"type": "tool_use", "name": "f", "input": {}})
        )),
        "messages[1].content[0].id"
    );
    assert_eq!(
        param(history(
            json!({"type": "tool_use", "id": "t", "name": "f", "input": 1})
        )),
        "messages[1].content[0].input"
    );
    assert_eq!(
        param(history(json!({"type": "tool_result", "tool_use_id": "t"}))),
        "messages[1].content[0].type"
    );
}

#[test]
fn tools_and_tool_choice_are_checked() {
    assert_eq!(param(with(json!({"tools": {}}))), "tools");
    assert_eq!(
        param(with(json!({"tools": [{"input_schema": {}}]}))),
        "tools[0].name"
    );
    assert_eq!(
        param(with(json!({"tools": [{"name": "", "input_schema": {}}]}))),
        "tools[0].name"
    );
    assert_eq!(
        param(with(json!({"tools": [{"name": "f"}]}))),
        "tools[0].input_schema"
    );
    assert_eq!(
        param(with(
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})
        )),
        "tools[0].type"
    );
    assert_eq!(param(with(json!({"tool_choice": "auto"}))), "tool_choice");
    assert_eq!(
        param(with(json!({"tool_choice": {"type": "tool"}}))),
        "tool_choice.name"
    );
    assert_eq!(
        param(with(json!({"tool_choice": {"type": "some"}}))),
        "tool_choice.type"
    );
    let no_parallel = json!({"tool_choice": {"type": "auto", "disable_parallel_tool_use": 1}});
    assert_eq!(
        param(with(no_parallel)),
        "tool_choice.disable_parallel_tool_use"
    );
}

#[test]
fn count_tokens_bodies_need_no_max_tokens() {
    let body =
        br#"{"model":"m","stream":"ignored","messages":[{"role":"user","content":"hello"}]}"#;
    let req = parse_count_tokens(body).unwrap();
    assert_eq!((req.max_tokens, req.stream), (0, false));
    assert!(MessagesRequest::parse(body).is_err());
    assert!(parse_count_tokens(br#"{"model":"m","messages":[]}"#).is_err());
}

#[test]
fn tool_choice_needs_tools_and_thinking_follows_the_style() {
    let req = |extra: Value| MessagesRequest::parse(with(extra).to_string().as_bytes()).unwrap();
    let out = req(json!({"tool_choice": {"type": "any"}})).to_openai("u", ThinkingStyle::Ignore);
    assert!(out.get("tool_choice").is_none() && out.get("tools").is_none());
    let effort = |budget: u32| {
        req(json!({"thinking": {"type": "enabled", "budget_tokens": budget}}))
            .to_openai("u", ThinkingStyle::ReasoningEffort)["reasoning_effort"]
            .clone()
    };
    assert_eq!((effort(1024), effort(4095)), (json!("low"), json!("low")));
    assert_eq!(
        (effort(4096), effort(16383)),
        (json!("medium"), json!("medium"))
    );
    assert_eq!(effort(16384), json!("high"));
    let off = req(json!({"thinking": {"type": "disabled"}}));
    assert_eq!(
        off.to_openai("u", ThinkingStyle::ReasoningEffort)["reasoning_effort"],
        "low"
    );
    assert_eq!(
        off.to_openai("u", ThinkingStyle::ChatTemplateArgs)["chat_template_args"],
        json!({"enable_thinking": false})
    );
    let plain = req(json!({})).to_openai("u", ThinkingStyle::ChatTemplateKwargs);
    assert!(plain.get("chat_template_kwargs").is_none());
    assert_eq!(plain["stream"], false);
    assert!(plain.get("stream_options").is_none());
    let adaptive = req(json!({"thinking": {"type": "adaptive"}}));
    assert_eq!(
        adaptive.to_openai("u", ThinkingStyle::ChatTemplateKwargs)["chat_template_kwargs"],
        json!({"enable_thinking": true})
    );
    assert!(adaptive
        .to_openai("u", ThinkingStyle::Ignore)
        .get("reasoning_effort")
        .is_none());
}

/// Events of a translated stream as (name, JSON).
fn events(bytes: &[u8]) -> Vec<(String, Value)> {
    let mut framer = SseFramer::new();
    framer.push(bytes);
    let mut out = Vec::new();
    while let Some(e) = framer.next_event().unwrap() {
        out.push((e.event.unwrap(), serde_json::from_str(&e.data).unwrap()));
    }
    out
}

fn names(bytes: &[u8]) -> Vec<String> {
    events(bytes).into_iter().map(|(n, _)| n).collect()
}

#[test]
fn garbage_is_ignored_and_the_end_is_coherent() {
    let mut t = StreamTranslator::new(AnswerPlan {
        input_estimate: 7,
        ..AnswerPlan::new("msg_1", "m")
    });
    let mut out = Vec::new();
    for junk in ["", "not json", "[1,2]", "{\"choices\": 5}", "null"] {
        t.on_data(junk, &mut out);
    }
    assert!(out.is_empty());
    assert_eq!(t.ignored_chunks(), 5);
    t.finish(&mut out);
    t.finish(&mut out);
    t.fail("api_error", "late", &mut out);
    t.on_data(r#"{"choices":[{"delta":{"content":"x"}}]}"#, &mut out);
    assert_eq!(
        names(&out),
        ["message_start", "message_delta", "message_stop"]
    );
    let all = events(&out);
    assert_eq!(all[0].1["message"]["usage"]["input_tokens"], 7);
    assert_eq!(all[1].1["delta"]["stop_reason"], "end_turn");
    assert_eq!(
        all[1].1["usage"],
        json!({"input_tokens": 7, "output_tokens": 0,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
    );
    assert!(t.is_done() && t.usage().is_none());
}

#[test]
fn failures_before_and_after_content() {
    let mut t = StreamTranslator::new(AnswerPlan::new("msg_1", "m"));
    let mut out = Vec::new();
    t.fail("overloaded_error", "no capacity", &mut out);
    t.fail("api_error", "twice", &mut out);
    t.finish(&mut out);
    assert_eq!(
        events(&out),
        [(
            "error".to_string(),
            json!({"type": "error",
            "error": {"type": "overloaded_error", "message": "no capacity"}})
        )]
    );

    // vLLM's error object in place of a chunk, after some text.
    let mut t = StreamTranslator::new(AnswerPlan::new("msg_1", "m"));
    let mut out = Vec::new();
    t.on_data(
        r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
        &mut out,
    );
    t.on_data(r#"{"error":{"object":"error","message":"engine dead","type":"InternalServerError","param":null,"code":500}}"#, &mut out);
    t.on_data("[DONE]", &mut out);
    let all = events(&out);
    assert_eq!(
        names(&out),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(
        all[3].1["error"],
        json!({"type": "api_error", "message": "engine dead"})
    );

    let mut t = StreamTranslator::new(AnswerPlan::new("msg_1", "m"));
    let mut out = Vec::new();
    t.on_data(r#"{"object":"error","message":"bad","code":400}"#, &mut out);
    assert_eq!(events(&out)[0].1["error"]["type"], "invalid_request_error");
}

#[test]
fn tool_calls_without_ids_names_or_indexes() {
    let mut t = StreamTranslator::new(AnswerPlan::new("msg_abc", "m"));
    let mut out = Vec::new();
    for chunk in [
        r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\"a\""}}]}}]}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":":1}"}}]}}]}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"id":"call_2","function":{"name":"g","arguments":"{}"}}]}}]}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"late"}}]}}]}"#,
        r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
    ] {
        t.on_data(chunk, &mut out);
    }
    t.finish(&mut out);
    let all = events(&out);
    let starts: Vec<&Value> = all
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, v)| &v["content_block"])
        .collect();
    assert_eq!(
        starts[0],
        &json!({"type": "tool_use", "id": "toolu_abc_0", "name": "", "input": {}})
    );
    assert_eq!(
        starts[1],
        &json!({"type": "tool_use", "id": "call_2", "name": "g", "input": {}})
    );
    let pieces: Vec<&str> = all
        .iter()
        .filter_map(|(_, v)| v["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(pieces, ["{\"a\"", ":1}", "{}"]);
    assert_eq!(all.last().unwrap().0, "message_stop");
    assert_eq!(all[all.len() - 2].1["delta"]["stop_reason"], "tool_use");
}

#[test]
fn fields_that_would_override_the_output_cap_are_not_passed_through() {
    let body = with(json!({"max_completion_tokens": 32000, "n": 4, "best_of": 4, "seed": 7}));
    let out = MessagesRequest::parse(body.to_string().as_bytes())
        .unwrap()
        .to_openai("u", ThinkingStyle::Ignore);
    assert_eq!(out["max_tokens"], 16);
    for owned in ["max_completion_tokens", "n", "best_of"] {
        assert!(out.get(owned).is_none(), "{owned} reached the replica");
    }
    // Other engine extensions still pass through.
    assert_eq!(out["seed"], 7);
}

#[test]
fn whitespace_between_argument_pieces_does_not_cut_the_call() {
    let mut t = StreamTranslator::new(AnswerPlan::new("msg_1", "m"));
    let mut out = Vec::new();
    for chunk in [
        r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"f","arguments":"{\"a\""}}]}}]}"#,
        r#"{"choices":[{"delta":{"content":"\n"}}]}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}"#,
        r#"{"choices":[{"delta":{"content":"\n\n"}}]}"#,
        r#"{"choices":[{"delta":{"content":"Done."}}]}"#,
        r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
    ] {
        t.on_data(chunk, &mut out);
    }
    t.finish(&mut out);
    let all = events(&out);
    let pieces: Vec<&str> = all
        .iter()
        .filter_map(|(_, v)| v["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(pieces.concat(), "{\"a\":1}");
    let texts: Vec<&str> = all
        .iter()
        .filter_map(|(_, v)| v["delta"]["text"].as_str())
        .collect();
    // The held whitespace leads the text that followed it.
    assert_eq!(texts, ["\n\n\nDone."]);
    let starts: Vec<&str> = all
        .iter()
        .filter_map(|(_, v)| v["content_block"]["type"].as_str())
        .collect();
    assert_eq!(starts, ["tool_use", "text"]);
}

#[test]
fn reasoning_streams_as_thinking_only_when_enabled() {
    let chunks = [
        r#"{"choices":[{"delta":{"reasoning_content":"Hmm."}}]}"#,
        r#"{"choices":[{"delta":{"content":"4"}}]}"#,
        r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
    ];
    let run = |plan: AnswerPlan| {
        let mut t = StreamTranslator::new(plan);
        let mut out = Vec::new();
        for chunk in chunks {
            t.on_data(chunk, &mut out);
        }
        t.finish(&mut out);
        events(&out)
    };
    let hidden = run(AnswerPlan::new("msg_1", "m"));
    let starts: Vec<&Value> = hidden
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, v)| &v["content_block"])
        .collect();
    assert_eq!(starts, [&json!({"type": "text", "text": ""})]);
    assert_eq!(hidden[2].1["index"], 0);
    // The hidden reasoning still counts as output.
    let delta = hidden.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["usage"]["output_tokens"], 2);

    let shown = run(AnswerPlan {
        thinking: true,
        ..AnswerPlan::new("msg_1", "m")
    });
    let kinds: Vec<&str> = shown
        .iter()
        .filter_map(|(_, v)| v["content_block"]["type"].as_str())
        .collect();
    assert_eq!(kinds, ["thinking", "text"]);
}

#[test]
fn consecutive_turns_merge_and_a_final_assistant_message_is_continued() {
    let body = with(json!({"messages": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": [{"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"}]}));
    let out = MessagesRequest::parse(body.to_string().as_bytes())
        .unwrap()
        .to_openai("u", ThinkingStyle::Ignore);
    assert_eq!(
        out["messages"],
        json!([{"role": "user", "content": "a\nb"},
            {"role": "assistant", "content": "c\nd"},
            {"role": "user", "content": "e"}])
    );
    assert!(out.get("continue_final_message").is_none());
    assert!(out.get("add_generation_prompt").is_none());

    let prefill = with(json!({"messages": [
        {"role": "user", "content": "List three colours as JSON."},
        {"role": "assistant", "content": "{\"colours\": ["}]}));
    let out = MessagesRequest::parse(prefill.to_string().as_bytes())
        .unwrap()
        .to_openai("u", ThinkingStyle::Ignore);
    assert_eq!(out["messages"][1]["content"], "{\"colours\": [");
    assert_eq!(out["continue_final_message"], true);
    assert_eq!(out["add_generation_prompt"], false);
}
