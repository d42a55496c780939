//! The Anthropic stream state machine under arbitrary upstream payloads: no panic, and the
//! output always keeps the event grammar (one message_start first, blocks opened and closed
//! in order with indexes 0, 1, 2…, deltas only inside the open block, message_delta then
//! message_stop at a normal end, a lone error after a failure, nothing after either).
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use tollgate::translate::anthropic::{AnswerPlan, StreamTranslator};
use tollgate::translate::sse::SseFramer;

#[derive(Arbitrary, Debug)]
enum Payload {
    Raw(String),
    Done,
    Chunk {
        reasoning: Option<String>,
        reasoning_new_name: bool,
        content: Option<String>,
        tools: Vec<Tool>,
        finish: Option<u8>,
        stop_reason: Option<String>,
        usage: Option<(u16, u16, u16)>,
        no_choices: bool,
        second_choice: bool,
    },
    Error {
        message: String,
        code: Option<u16>,
        bare: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Tool {
    index: Option<u8>,
    id: Option<String>,
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    stops: Vec<String>,
    payloads: Vec<Payload>,
    fail_at_end: Option<(String, String)>,
    finish_twice: bool,
    /// The request enabled thinking.
    thinking: bool,
}

fn render(payload: &Payload) -> String {
    match payload {
        Payload::Raw(s) => s.clone(),
        Payload::Done => "[DONE]".into(),
        Payload::Error {
            message,
            code,
            bare,
        } => {
            let error = json!({"object": "error", "message": message, "code": code});
            if *bare {
                error.to_string()
            } else {
                json!({"error": error}).to_string()
            }
        }
        Payload::Chunk {
            reasoning,
            reasoning_new_name,
            content,
            tools,
            finish,
            stop_reason,
            usage,
            no_choices,
            second_choice,
        } => {
            let mut delta = json!({"content": content});
            let key = if *reasoning_new_name {
                "reasoning"
            } else {
                "reasoning_content"
            };
            delta[key] = json!(reasoning);
            if !tools.is_empty() {
                let calls: Vec<Value> = tools
                    .iter()
                    .map(|t| {
                        json!({"index": t.index, "id": t.id, "type": "function",
                        "function": {"name": t.name, "arguments": t.arguments}})
                    })
                    .collect();
                delta["tool_calls"] = json!(calls);
            }
            let finish = finish.map(|f| {
                ["stop", "length", "tool_calls", "content_filter", "abort"][f as usize % 5]
            });
            let mut choices = vec![json!({"index": 0, "delta": delta, "logprobs": null,
                "finish_reason": finish, "stop_reason": stop_reason})];
            if *second_choice {
                choices.insert(0, json!({"index": 1, "delta": {"content": "other"}}));
            }
            if *no_choices {
                choices.clear();
            }
            let usage = usage.map(|(p, c, cached)| {
                json!({"prompt_tokens": p, "completion_tokens": c,
                "prompt_tokens_details": {"cached_tokens": cached}})
            });
            json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
                "model": "m", "choices": choices, "usage": usage})
            .to_string()
        }
    }
}

fn check(out: &[u8]) {
    let mut framer = SseFramer::new();
    framer.push(out);
    let mut events = Vec::new();
    while let Some(e) = framer.next_event().expect("output frames") {
        let data: Value = serde_json::from_str(&e.data).expect("event data is JSON");
        let name = e.event.expect("every event is named");
        assert_eq!(data["type"], name.as_str());
        events.push((name, data));
    }
    assert!(framer.finish().expect("output frames").is_none());
    let starts = events.iter().filter(|(n, _)| n == "message_start").count();
    assert!(starts <= 1);
    if starts == 1 {
        assert_eq!(events[0].0, "message_start");
    }
    let mut open: Option<u64> = None;
    let mut next = 0u64;
    let mut ended = false;
    for (name, data) in &events {
        assert!(!ended, "nothing after message_stop or error");
        let index = data["index"].as_u64();
        match name.as_str() {
            "message_start" => {}
            "content_block_start" => {
                assert_eq!(open, None);
                assert_eq!(index, Some(next));
                open = index;
                next += 1;
            }
            "content_block_delta" => assert!(open.is_some() && index == open),
            "content_block_stop" => {
                assert!(open.is_some() && index == open);
                open = None;
            }
            "message_delta" => {
                assert_eq!(open, None);
                assert!(data["delta"]["stop_reason"].is_string());
            }
            "message_stop" | "error" => ended = true,
            other => panic!("unexpected event {other}"),
        }
    }
    let last = events.last().map(|(n, _)| n.as_str());
    assert!(matches!(last, Some("error") | Some("message_stop")));
    if last == Some("message_stop") {
        assert_eq!(starts, 1);
        assert_eq!(events[events.len() - 2].0, "message_delta");
    } else {
        assert_eq!(events.iter().filter(|(n, _)| n == "error").count(), 1);
    }
}

fuzz_target!(|input: Input| {
    let mut translator = StreamTranslator::new(AnswerPlan {
        stop_sequences: input.stops,
        input_estimate: 5,
        thinking: input.thinking,
        ..AnswerPlan::new("msg_fuzz", "m")
    });
    let mut out = Vec::new();
    for payload in &input.payloads {
        translator.on_data(&render(payload), &mut out);
    }
    match &input.fail_at_end {
        Some((kind, message)) => translator.fail(kind, message, &mut out),
        None => translator.finish(&mut out),
    }
    if input.finish_twice {
        translator.finish(&mut out);
        translator.fail("api_error", "again", &mut out);
    }
    assert!(translator.is_done());
    check(&out);
});
