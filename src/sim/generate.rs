//! Deterministic model output: reasoning, answer text cut by stop strings and limits, tool calls.

use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Map, Value};

use super::request::{ChatRequest, ToolSpec};

/// The answer cycles through these words, one word a token.
const ANSWER: [&str; 9] = [
    "The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog",
];
/// The reasoning cycles through these words, one word a token.
const THOUGHT: [&str; 10] = [
    "Let", "me", "think", "step", "by", "step", "about", "what", "is", "asked.",
];

/// Why generation ended, as `finish_reason` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    Stop,
    Length,
    ToolCalls,
}

impl Finish {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    /// Arguments cost a token per 4 bytes, at least one.
    pub(crate) fn tokens(&self) -> u64 {
        (self.arguments.len() as u64).div_ceil(4).max(1)
    }
}

/// Everything one completion produces, decided before anything is sent.
#[derive(Debug, Clone)]
pub(crate) struct Generation {
    /// One entry per reasoning token.
    pub reasoning: Vec<String>,
    /// One entry per answer token sent; the last may be cut short by a stop string.
    pub content: Vec<String>,
    /// Tokens generated but withheld because they form a matched stop string.
    pub withheld_tokens: u64,
    pub tool_calls: Vec<ToolCall>,
    pub finish: Finish,
    pub stop_reason: Option<String>,
}

impl Generation {
    /// `natural` is the answer length at which the model ends on its own (`sim.tokens`).
    pub(crate) fn new(req: &ChatRequest, natural: Option<u32>) -> Generation {
        let limit = req.max_tokens as usize;
        let reasoning: Vec<String> = (0..(req.reasoning_tokens as usize).min(limit))
            .map(|i| word(&THOUGHT, i))
            .collect();
        let budget = limit - reasoning.len();
        if !req.tool_calls.is_empty() {
            return Generation {
                reasoning,
                content: Vec::new(),
                withheld_tokens: 0,
                tool_calls: req.tool_calls.iter().map(call).collect(),
                finish: Finish::ToolCalls,
                stop_reason: None,
            };
        }
        let wanted = natural.map_or(budget, |n| (n as usize).min(budget));
        let answer = answer(wanted, &req.stops);
        let finish = if answer.stop_reason.is_some() || wanted < budget {
            Finish::Stop
        } else {
            Finish::Length
        };
        Generation {
            reasoning,
            content: answer.pieces,
            withheld_tokens: answer.withheld,
            tool_calls: Vec::new(),
            finish,
            stop_reason: answer.stop_reason,
        }
    }

    pub(crate) fn reasoning_tokens(&self) -> u64 {
        self.reasoning.len() as u64
    }

    pub(crate) fn completion_tokens(&self) -> u64 {
        self.reasoning_tokens()
            + self.content.len() as u64
            + self.withheld_tokens
            + self.tool_calls.iter().map(ToolCall::tokens).sum::<u64>()
    }

    /// `None` when reasoning was off.
    pub(crate) fn reasoning_text(&self) -> Option<String> {
        (!self.reasoning.is_empty()).then(|| self.reasoning.concat())
    }

    /// `None` when the model called tools instead of answering.
    pub(crate) fn content_text(&self) -> Option<String> {
        self.tool_calls.is_empty().then(|| self.content.concat())
    }
}

/// The i-th token of a cycle: words joined by single spaces.
fn word(cycle: &[&str], i: usize) -> String {
    let w = cycle[i % cycle.len()];
    if i == 0 {
        w.to_owned()
    } else {
        format!(" {w}")
    }
}

struct Answer {
    pieces: Vec<String>,
    withheld: u64,
    stop_reason: Option<String>,
}

/// Generates up to `n` answer tokens, ending before the first stop string that appears.
fn answer(n: usize, stops: &[String]) -> Answer {
    let longest_stop = stops.iter().map(String::len).max().unwrap_or(0);
    let mut text = String::new();
    let mut ends = Vec::with_capacity(n);
    for i in 0..n {
        let before = text.len();
        text.push_str(&word(&ANSWER, i));
        ends.push(text.len());
        // Earlier text held no match, so a new one must end inside the newest word; search
        // only the tail that could hold it (the answer is ASCII, so any byte is a boundary).
        let from = before.saturating_sub(longest_stop.saturating_sub(1));
        let tail = &text[from..];
        let found = stops
            .iter()
            .filter_map(|s| tail.find(s.as_str()).map(|at| (from + at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((cut, stop)) = found {
            let mut pieces = Vec::new();
            let mut start = 0;
            for &end in &ends {
                if start >= cut {
                    break;
                }
                pieces.push(text[start..end.min(cut)].to_owned());
                start = end;
            }
            return Answer {
                withheld: (i + 1 - pieces.len()) as u64,
                pieces,
                stop_reason: Some(stop.clone()),
            };
        }
    }
    let mut start = 0;
    let pieces = ends
        .iter()
        .map(|&end| {
            let piece = text[start..end].to_owned();
            start = end;
            piece
        })
        .collect();
    Answer {
        pieces,
        withheld: 0,
        stop_reason: None,
    }
}

fn call(tool: &ToolSpec) -> ToolCall {
    ToolCall {
        id: format!("call_{}", random_alnum(24)),
        name: tool.name.clone(),
        arguments: arguments_for(&tool.parameters),
    }
}

/// A compact JSON object holding a plausible value for every required property.
pub(crate) fn arguments_for(parameters: &Value) -> String {
    let mut args = Map::new();
    let required = parameters.get("required").and_then(Value::as_array);
    for name in required.into_iter().flatten().filter_map(Value::as_str) {
        let schema = parameters.get("properties").and_then(|p| p.get(name));
        args.insert(name.to_owned(), sample(schema));
    }
    Value::Object(args).to_string()
}

fn sample(schema: Option<&Value>) -> Value {
    let Some(schema) = schema else {
        return json!("sim");
    };
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    let kind = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ => "string",
    };
    match kind {
        "integer" | "number" => json!(1),
        "boolean" => json!(true),
        "array" => json!([]),
        "object" => json!({}),
        "null" => Value::Null,
        _ => json!("sim"),
    }
}

pub(crate) fn random_alnum(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(max_tokens: u32, stops: &[&str], reasoning_tokens: u32) -> ChatRequest {
        ChatRequest {
            model: "m".to_owned(),
            stream: false,
            include_usage: false,
            prompt_tokens: 1,
            max_tokens,
            stops: stops.iter().map(|s| s.to_string()).collect(),
            reasoning_tokens,
            tool_calls: Vec::new(),
        }
    }

    #[test]
    fn answer_runs_to_the_limit() {
        let g = Generation::new(&request(11, &[], 0), None);
        let text = "The quick brown fox jumps over the lazy dog The quick";
        assert_eq!(g.content_text().as_deref(), Some(text));
        assert_eq!((g.finish, g.completion_tokens()), (Finish::Length, 11));
        let g = Generation::new(&request(11, &[], 0), Some(3));
        assert_eq!((g.finish, g.completion_tokens()), (Finish::Stop, 3));
    }

    #[test]
    fn stop_strings_cut_the_answer() {
        let g = Generation::new(&request(20, &["lazy", " fox"], 0), None);
        assert_eq!(g.content_text().as_deref(), Some("The quick brown"));
        assert_eq!(g.stop_reason.as_deref(), Some(" fox"));
        assert_eq!(
            (g.finish, g.completion_tokens(), g.content.len()),
            (Finish::Stop, 4, 3)
        );
        // A stop inside a word keeps the part of the word before it.
        let g = Generation::new(&request(20, &["ump"], 0), None);
        assert_eq!(g.content.last().map(String::as_str), Some(" j"));
        assert_eq!(g.completion_tokens(), 5);
        let g = Generation::new(&request(20, &["The"], 0), None);
        assert_eq!((g.content.len(), g.completion_tokens()), (0, 1));
    }

    #[test]
    fn reasoning_counts_against_the_limit() {
        let g = Generation::new(&request(10, &[], 4), None);
        assert_eq!(g.reasoning_text().as_deref(), Some("Let me think step"));
        assert_eq!((g.reasoning_tokens(), g.content.len()), (4, 6));
        let g = Generation::new(&request(3, &[], 8), None);
        assert_eq!((g.reasoning_tokens(), g.content.len()), (3, 0));
        assert_eq!(g.finish, Finish::Length);
    }

    #[test]
    fn arguments_cover_required_properties() {
        let params = json!({"type": "object", "required": ["s", "i", "b", "a", "o", "e", "n"],
            "properties": {"s": {"type": "string"}, "i": {"type": "integer"},
                "b": {"type": "boolean"}, "a": {"type": "array"}, "o": {"type": "object"},
                "e": {"type": "string", "enum": ["c", "f"]}, "n": {"type": ["null", "number"]},
                "optional": {"type": "string"}}});
        assert_eq!(
            arguments_for(&params),
            r#"{"a":[],"b":true,"e":"c","i":1,"n":1,"o":{},"s":"sim"}"#
        );
        assert_eq!(arguments_for(&Value::Null), "{}");
        let call = ToolCall {
            id: String::new(),
            name: String::new(),
            arguments: "{}".to_owned(),
        };
        assert_eq!(call.tokens(), 1);
    }
}
