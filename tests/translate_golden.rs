//! Golden transcripts for the Anthropic ↔ OpenAI translation, both directions.
//!
//! `tests/golden/anthropic/` holds real-shaped exchanges (see its README): request
//! (Anthropic in, OpenAI out), response (OpenAI in, Anthropic out) and stream (vLLM SSE in,
//! Anthropic SSE out, compared event by event as JSON). Each stream is also fed through the
//! framer split at every byte position, at random positions, and with `\r\n` and `\r` line
//! ends, and must translate to the very same bytes.
//!
//! `TOLLGATE_BLESS=1 cargo test --test translate_golden` rewrites the expected files that
//! differ from the current output, then fails naming them, so that a bless run is never
//! taken for a passing one; review the diff, then run the tests again without it.

use std::path::PathBuf;

use serde_json::Value;
use tollgate::translate::anthropic::{
    message_from_openai, AnswerPlan, MessagesRequest, StreamTranslator, ThinkingStyle,
};
use tollgate::translate::sse::SseFramer;

fn golden(rel: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/anthropic"
    ))
    .join(rel)
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(golden(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn json(rel: &str) -> Value {
    serde_json::from_slice(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Whether `rel` exists and holds `value`: blessing leaves equal files as they are.
fn same_json(rel: &str, value: &Value) -> bool {
    std::fs::read(golden(rel))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| &v == value)
}

/// Whether this run rewrites expected files: only with `TOLLGATE_BLESS=1`.
fn blessing() -> bool {
    std::env::var_os("TOLLGATE_BLESS").is_some_and(|v| v == "1")
}

/// The expected files one test rewrote. `finish` fails the test when there are any, so a
/// run that changed the goldens cannot pass.
#[derive(Default)]
struct Blessed(Vec<String>);

impl Blessed {
    fn rewrite(&mut self, rel: &str, bytes: &[u8]) {
        std::fs::write(golden(rel), bytes).unwrap_or_else(|e| panic!("{rel}: {e}"));
        self.0.push(rel.to_string());
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "TOLLGATE_BLESS=1 rewrote {} golden file(s) that differed from the output: {}. \
             Review the diff, then run again without TOLLGATE_BLESS.",
            self.0.len(),
            self.0.join(", ")
        );
    }
}

fn pretty(value: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(value).unwrap();
    out.push(b'\n');
    out
}

#[test]
fn requests_map_to_openai() {
    let cases = [
        (
            "basic_stream",
            "Qwen/Qwen2.5-7B-Instruct",
            ThinkingStyle::ChatTemplateKwargs,
        ),
        (
            "images",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            ThinkingStyle::ChatTemplateKwargs,
        ),
        (
            "tool_round_trip",
            "Qwen/Qwen2.5-7B-Instruct",
            ThinkingStyle::Ignore,
        ),
        (
            "thinking_history",
            "Qwen/Qwen3-32B",
            ThinkingStyle::ChatTemplateKwargs,
        ),
        (
            "thinking_effort",
            "openai/gpt-oss-20b",
            ThinkingStyle::ReasoningEffort,
        ),
    ];
    let mut blessed = Blessed::default();
    for (name, upstream, style) in cases {
        let input = read(&format!("request/{name}.anthropic.json"));
        let request = MessagesRequest::parse(&input).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let actual = request.to_openai(upstream, style);
        let expected_file = format!("request/{name}.openai.json");
        if blessing() && !same_json(&expected_file, &actual) {
            blessed.rewrite(&expected_file, &pretty(&actual));
            continue;
        }
        assert_eq!(actual, json(&expected_file), "{name}");
    }
    blessed.finish();
}

#[test]
fn responses_map_to_anthropic() {
    // (name, stop sequences, whether the request enabled thinking)
    let cases: [(&str, &[&str], bool); 7] = [
        ("text_cached", &[], false),
        ("thinking", &[], true),
        ("tool_single", &[], false),
        ("tool_parallel_reasoning", &[], true),
        ("stop_sequence", &["3.", "\n\n"], false),
        ("max_tokens_truncated_tool", &[], false),
        ("empty", &[], false),
    ];
    let mut blessed = Blessed::default();
    for (name, stops, thinking) in cases {
        let input = read(&format!("response/{name}.openai.json"));
        let plan = AnswerPlan {
            stop_sequences: stops.iter().map(|s| s.to_string()).collect(),
            thinking,
            ..AnswerPlan::new(&format!("msg_golden_{name}"), "claude-sonnet-4-5")
        };
        let out = message_from_openai(&input, &plan).unwrap_or_else(|e| panic!("{name}: {e}"));
        let actual: Value = serde_json::from_slice(&out).unwrap();
        let expected_file = format!("response/{name}.anthropic.json");
        if blessing() && !same_json(&expected_file, &actual) {
            blessed.rewrite(&expected_file, &pretty(&actual));
            continue;
        }
        assert_eq!(actual, json(&expected_file), "{name}");
    }
    blessed.finish();
}

/// How a transcript's upstream ended.
#[derive(Clone, Copy)]
enum End {
    Finish,
    Fail(&'static str, &'static str),
}

struct StreamCase {
    name: &'static str,
    stops: &'static [&'static str],
    estimate: u32,
    /// The request enabled thinking.
    thinking: bool,
    end: End,
}

const STREAMS: &[StreamCase] = &[
    StreamCase {
        name: "text_final_usage",
        stops: &[],
        estimate: 19,
        thinking: false,
        end: End::Finish,
    },
    StreamCase {
        name: "text_running_usage",
        stops: &[],
        estimate: 2000,
        thinking: false,
        end: End::Finish,
    },
    StreamCase {
        name: "thinking",
        stops: &[],
        estimate: 16,
        thinking: true,
        end: End::Finish,
    },
    StreamCase {
        name: "thinking_then_tool",
        stops: &[],
        estimate: 300,
        thinking: true,
        end: End::Finish,
    },
    StreamCase {
        name: "tool_single",
        stops: &[],
        estimate: 250,
        thinking: false,
        end: End::Finish,
    },
    StreamCase {
        name: "tool_parallel_finish_stop",
        stops: &[],
        estimate: 290,
        thinking: false,
        end: End::Finish,
    },
    StreamCase {
        name: "stop_sequence",
        stops: &["3.", "\n\n"],
        estimate: 38,
        thinking: false,
        end: End::Finish,
    },
    StreamCase {
        name: "max_tokens",
        stops: &[],
        estimate: 11,
        thinking: false,
        end: End::Finish,
    },
    StreamCase {
        name: "empty",
        stops: &[],
        estimate: 8,
        thinking: false,
        end: End::Finish,
    },
    StreamCase {
        name: "upstream_reset",
        stops: &[],
        estimate: 10,
        thinking: false,
        end: End::Fail("api_error", "The model replica closed the stream early."),
    },
    StreamCase {
        name: "error_chunk",
        stops: &[],
        estimate: 10,
        thinking: false,
        end: End::Finish,
    },
    StreamCase {
        name: "no_finish",
        stops: &[],
        estimate: 10,
        thinking: false,
        end: End::Finish,
    },
];

/// Frames `pieces` as they would arrive and translates them, as the proxy does.
fn translate<'a>(case: &StreamCase, pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut translator = StreamTranslator::new(AnswerPlan {
        stop_sequences: case.stops.iter().map(|s| s.to_string()).collect(),
        input_estimate: case.estimate,
        thinking: case.thinking,
        ..AnswerPlan::new(&format!("msg_golden_{}", case.name), "claude-sonnet-4-5")
    });
    let mut framer = SseFramer::new();
    let mut out = Vec::new();
    for piece in pieces {
        framer.push(piece);
        while let Some(event) = framer.next_event().unwrap() {
            translator.on_data(&event.data, &mut out);
        }
    }
    while let Some(event) = framer.finish().unwrap() {
        translator.on_data(&event.data, &mut out);
    }
    match case.end {
        End::Finish => translator.finish(&mut out),
        End::Fail(kind, message) => translator.fail(kind, message, &mut out),
    }
    assert!(translator.is_done());
    out
}

/// (event name, data as JSON) of every event in `bytes`.
fn events(bytes: &[u8]) -> Vec<(String, Value)> {
    let mut framer = SseFramer::new();
    framer.push(bytes);
    let mut out = Vec::new();
    while let Some(e) = framer.next_event().unwrap() {
        let data: Value = serde_json::from_str(&e.data).unwrap();
        let name = e.event.unwrap_or_default();
        assert_eq!(data["type"], name.as_str(), "event name is its type");
        out.push((name, data));
    }
    assert!(
        framer.finish().unwrap().is_none(),
        "output ends with a blank line"
    );
    out
}

#[test]
fn streams_translate_event_by_event() {
    let mut blessed = Blessed::default();
    for case in STREAMS {
        let input = read(&format!("stream/{}.openai.sse", case.name));
        let actual = translate(case, [&input[..]]);
        let expected_file = format!("stream/{}.anthropic.sse", case.name);
        if blessing() && std::fs::read(golden(&expected_file)).ok().as_deref() != Some(&actual[..])
        {
            blessed.rewrite(&expected_file, &actual);
            continue;
        }
        let (actual, expected) = (events(&actual), events(&read(&expected_file)));
        for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
            assert_eq!(a, e, "{} event {i}", case.name);
        }
        assert_eq!(actual.len(), expected.len(), "{} event count", case.name);
    }
    blessed.finish();
}

/// A small deterministic generator, so a failure names a reproducible seed.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[test]
fn streams_survive_any_split_and_line_ending() {
    for case in STREAMS {
        let input = read(&format!("stream/{}.openai.sse", case.name));
        let whole = translate(case, [&input[..]]);
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(
                translate(case, [a, b]),
                whole,
                "{} split at {at}",
                case.name
            );
        }
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ input.len() as u64);
        for round in 0..200 {
            let mut cuts: Vec<usize> = (0..1 + rng.below(64))
                .map(|_| rng.below(input.len() + 1))
                .collect();
            cuts.push(input.len());
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut from = 0;
            for cut in cuts {
                pieces.push(&input[from..cut]);
                from = cut;
            }
            assert_eq!(
                translate(case, pieces),
                whole,
                "{} round {round}",
                case.name
            );
        }
        let text = String::from_utf8(input).unwrap();
        for ending in ["\r\n", "\r"] {
            let variant = text.replace('\n', ending);
            let bytes = variant.as_bytes();
            assert_eq!(
                translate(case, bytes.chunks(7)),
                whole,
                "{} with {ending:?}",
                case.name
            );
        }
    }
}

#[test]
fn streams_keep_the_anthropic_event_grammar() {
    for case in STREAMS {
        let input = read(&format!("stream/{}.openai.sse", case.name));
        let all = events(&translate(case, [&input[..]]));
        assert_eq!(
            all.iter().filter(|(n, _)| n == "message_start").count(),
            1,
            "{}",
            case.name
        );
        assert_eq!(all[0].0, "message_start", "{}", case.name);
        let mut open: Option<u64> = None;
        let mut next = 0;
        for (name, data) in &all {
            let index = data["index"].as_u64();
            match name.as_str() {
                "content_block_start" => {
                    assert_eq!((open, index), (None, Some(next)), "{}", case.name);
                    open = index;
                    next += 1;
                }
                "content_block_delta" => assert_eq!(index, open, "{}", case.name),
                "content_block_stop" => {
                    assert_eq!(index, open, "{}", case.name);
                    open = None;
                }
                _ => {}
            }
        }
        let last = all.last().map(|(n, _)| n.as_str());
        match case.end {
            End::Finish if case.name != "error_chunk" => {
                assert_eq!(open, None, "{}", case.name);
                assert_eq!(last, Some("message_stop"), "{}", case.name);
                assert_eq!(all[all.len() - 2].0, "message_delta", "{}", case.name);
            }
            _ => assert_eq!(last, Some("error"), "{}", case.name),
        }
    }
}
