//! Translation hot paths: the Anthropic stream state machine (events/s), request and
//! response mapping at three sizes (bytes/s), and the SSE framer against the naive
//! `split("\n\n")` most proxies start with; the body structure check against the parse it
//! precedes; and counting a prompt for its reservation, with and without a tokenizer.
//!
//! `cargo bench --bench translate` (about a minute and a half). Inputs are built here, in
//! vLLM's shapes, so the numbers do not depend on files.

use std::time::Duration;

#[path = "../tests/support/tiny_tokenizer.rs"]
mod tiny_tokenizer;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Value};
use tollgate::config::{PromptRules, Tokenizer};
use tollgate::translate::anthropic::{
    message_from_openai, AnswerPlan, MessagesRequest, StreamTranslator, ThinkingStyle,
};
use tollgate::translate::openai::ChatRequest;
use tollgate::translate::sse::SseFramer;
use tollgate::translate::structure;

const CHUNK_ID: &str = "chatcmpl-8f3b2c1d9e4a4f6b8c7d2e1f0a9b8c7d";

fn chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id": CHUNK_ID, "object": "chat.completion.chunk", "created": 1_735_689_600,
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    .to_string()
}

fn usage_chunk(prompt: u64, completion: u64) -> String {
    json!({"id": CHUNK_ID, "object": "chat.completion.chunk", "created": 1_735_689_600,
        "model": "Qwen/Qwen2.5-7B-Instruct", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "prompt_tokens_details": null}})
    .to_string()
}

/// The `data:` payloads of a 1,000-token text answer.
fn text_stream() -> Vec<String> {
    let words = [
        " the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".",
    ];
    let mut payloads = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    payloads.extend((0..1000).map(|i| chunk(json!({"content": words[i % words.len()]}), None)));
    payloads.push(chunk(json!({"content": ""}), Some("stop")));
    payloads.push(usage_chunk(120, 1000));
    payloads.push("[DONE]".into());
    payloads
}

/// A short preamble, then one tool call whose arguments arrive in 400 pieces.
fn tool_stream() -> Vec<String> {
    let mut payloads = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    payloads.extend((0..20).map(|_| chunk(json!({"content": " checking"}), None)));
    payloads.push(chunk(
        json!({"tool_calls": [{"id": "chatcmpl-tool-1", "type": "function", "index": 0,
            "function": {"name": "write_file"}}]}),
        None,
    ));
    payloads.push(chunk(
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"content\": \""}}]}),
        None,
    ));
    payloads.extend((0..400).map(|_| {
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "line of text\\n"}}]}),
            None,
        )
    }));
    payloads.push(chunk(
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"}"}}]}),
        None,
    ));
    payloads.push(chunk(json!({"content": ""}), Some("tool_calls")));
    payloads.push(usage_chunk(300, 430));
    payloads.push("[DONE]".into());
    payloads
}

fn stream_translator(c: &mut Criterion) {
    let mut group = c.benchmark_group("stream_translator");
    for (name, payloads) in [
        ("text_1000_tokens", text_stream()),
        ("tool_call_400_pieces", tool_stream()),
    ] {
        group.throughput(Throughput::Elements(payloads.len() as u64));
        group.bench_function(name, |b| {
            let mut out = Vec::with_capacity(256 * 1024);
            b.iter(|| {
                out.clear();
                let mut t = StreamTranslator::new(AnswerPlan {
                    input_estimate: 100,
                    ..AnswerPlan::new("msg_bench", "claude-sonnet-4-5")
                });
                for p in &payloads {
                    t.on_data(p, &mut out);
                }
                t.finish(&mut out);
                black_box(out.len())
            });
        });
    }
    group.finish();
}

/// A conversation of `turns` exchanges with `text` bytes a message, tools and a tool round.
fn request_body(turns: usize, text: usize) -> Vec<u8> {
    let words = "lorem ipsum dolor sit amet ".repeat(text / 27 + 1);
    let body_text = &words[..text];
    let mut messages = Vec::new();
    for i in 0..turns {
        messages.push(json!({"role": "user", "content": body_text}));
        messages.push(json!({"role": "assistant", "content": [
            {"type": "text", "text": body_text},
            {"type": "tool_use", "id": format!("toolu_{i}"), "name": "search", "input": {"q": "x"}}]}));
        messages.push(json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": format!("toolu_{i}"), "content": body_text}]}));
        messages.push(json!({"role": "assistant", "content": body_text}));
    }
    messages.push(json!({"role": "user", "content": "Go on."}));
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 4096, "stream": true,
        "system": "You are a helpful assistant.",
        "tools": [{"name": "search", "description": "Search the web.",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}],
        "messages": messages});
    serde_json::to_vec(&body).unwrap_or_default()
}

fn completion_body(text: usize) -> Vec<u8> {
    let content = "lorem ipsum dolor sit amet ".repeat(text / 27 + 1);
    serde_json::to_vec(&json!({"id": CHUNK_ID, "object": "chat.completion", "created": 1_735_689_600,
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "choices": [{"index": 0, "message": {"role": "assistant", "reasoning_content": null,
            "content": &content[..text], "tool_calls": [{"id": "chatcmpl-tool-1", "type": "function",
            "function": {"name": "search", "arguments": "{\"q\": \"rust sse\"}"}}]},
            "logprobs": null, "finish_reason": "tool_calls", "stop_reason": null}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 64}}}))
    .unwrap_or_default()
}

fn mapping(c: &mut Criterion) {
    let sizes = [
        ("small", 1, 64),
        ("medium", 10, 1024),
        ("large", 50, 16 * 1024),
    ];
    let mut group = c.benchmark_group("request_to_openai");
    for (name, turns, text) in sizes {
        let body = request_body(turns, text);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
            b.iter(|| {
                let request = MessagesRequest::parse(body).ok();
                let out = request.map(|r| {
                    r.to_openai(
                        "Qwen/Qwen2.5-7B-Instruct",
                        ThinkingStyle::ChatTemplateKwargs,
                    )
                });
                black_box(out.map(|v| serde_json::to_vec(&v).map(|b| b.len())))
            });
        });
    }
    group.finish();
    let mut group = c.benchmark_group("response_to_anthropic");
    for (name, text) in [
        ("small", 256),
        ("medium", 16 * 1024),
        ("large", 1024 * 1024),
    ] {
        let body = completion_body(text);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
            b.iter(|| {
                black_box(
                    message_from_openai(body, &AnswerPlan::new("msg_bench", "claude-sonnet-4-5"))
                        .map(|o| o.len()),
                )
            });
        });
    }
    group.finish();
}

/// The structure check (depth and repeated keys) that runs before every request is parsed,
/// against the whole parse that includes it, on both surfaces: its share of the parse is
/// what it adds.
fn body_structure(c: &mut Criterion) {
    let image = "iVBORw0KGgo".repeat(6 * 1024 * 1024 / 11);
    let with_image = serde_json::to_vec(&json!({"model": "m", "max_tokens": 16, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}}]}]}))
    .unwrap_or_default();
    let mut group = c.benchmark_group("body_structure");
    for (name, body) in [
        ("small", request_body(1, 64)),
        ("medium", request_body(10, 1024)),
        ("large", request_body(50, 16 * 1024)),
        ("image_6mb", with_image),
    ] {
        assert!(structure::check(&body).is_ok());
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("check", name), &body, |b, body| {
            b.iter(|| black_box(structure::check(body).is_ok()))
        });
        group.bench_with_input(
            BenchmarkId::new("messages_parse", name),
            &body,
            |b, body| b.iter(|| black_box(MessagesRequest::parse(body).is_ok())),
        );
        group.bench_with_input(BenchmarkId::new("chat_parse", name), &body, |b, body| {
            b.iter(|| black_box(ChatRequest::parse(body).is_ok()))
        });
    }
    group.finish();
}

/// The naive framer: a growing `String`, split on `"\n\n"`, `data: ` stripped.
fn naive_frames(pieces: &[&[u8]]) -> usize {
    let mut buf = String::new();
    let mut total = 0;
    for piece in pieces {
        buf.push_str(&String::from_utf8_lossy(piece));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if let Some(data) = event.trim_end().strip_prefix("data: ") {
                total += data.len();
            }
        }
    }
    total
}

fn framer_frames(pieces: &[&[u8]]) -> usize {
    let mut framer = SseFramer::new();
    let mut total = 0;
    for piece in pieces {
        framer.push(piece);
        while let Ok(Some(event)) = framer.next_event() {
            total += event.data.len();
        }
    }
    total
}

fn sse_framer(c: &mut Criterion) {
    let wire: Vec<u8> = text_stream()
        .iter()
        .flat_map(|p| format!("data: {p}\n\n").into_bytes())
        .collect();
    let mut group = c.benchmark_group("sse_framer");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    // 1,400 bytes: about one TCP segment; 16 KiB: one large read.
    for piece in [1400, 16 * 1024] {
        let pieces: Vec<&[u8]> = wire.chunks(piece).collect();
        assert_eq!(framer_frames(&pieces), naive_frames(&pieces));
        group.bench_with_input(BenchmarkId::new("framer", piece), &pieces, |b, p| {
            b.iter(|| black_box(framer_frames(p)));
        });
        group.bench_with_input(BenchmarkId::new("naive_split", piece), &pieces, |b, p| {
            b.iter(|| black_box(naive_frames(p)));
        });
    }
    group.finish();
}

/// Counting a chat request's prompt for its reservation: at a token a byte (no tokenizer)
/// and with a tokenizer (a byte-level BPE of 600 tokens trained at start; a real one of
/// 128k tokens splits text into fewer, longer tokens).
fn prompt_count(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let tokenizer =
        Tokenizer::load(&tiny_tokenizer::write(dir.path())).expect("the tokenizer loads");
    let bound = PromptRules::default();
    let exact = PromptRules {
        tokenizer: Some(tokenizer),
        ..PromptRules::default()
    };
    let mut group = c.benchmark_group("prompt_count");
    for (name, turns, text) in [
        ("small", 1, 200),
        ("medium", 4, 2_000),
        ("large", 16, 16_000),
    ] {
        let words = "The quick brown fox, fn main() { x += 42; } ".repeat(text / 44 + 1);
        let messages: Vec<Value> = (0..turns)
            .flat_map(|_| {
                [
                    json!({"role": "user", "content": &words[..text]}),
                    json!({"role": "assistant", "content": &words[..text]}),
                ]
            })
            .collect();
        let body = serde_json::to_vec(&json!({"model": "m", "messages": messages})).unwrap();
        let request = ChatRequest::parse(&body).expect("a valid body");
        group.throughput(Throughput::Bytes(body.len() as u64));
        for (how, rules) in [("bound", &bound), ("tokenizer", &exact)] {
            group.bench_with_input(BenchmarkId::new(how, name), &request, |b, r| {
                b.iter(|| black_box(r.prompt_tokens(rules)))
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = stream_translator, mapping, body_structure, sse_framer, prompt_count
}
criterion_main!(benches);
