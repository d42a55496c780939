//! The chat workload: sessions whose history grows turn by turn after one of a few shared
//! system prompts, and Poisson arrival times.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// What the sessions send.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape {
    pub system_prompts: usize,
    pub system_tokens: usize,
    pub user_tokens: usize,
    pub turns: usize,
    pub output_tokens: u32,
}

/// Words of the generated text: ASCII, so a token is exactly 4 characters for the sim.
const WORDS: [&str; 16] = [
    "alpha ",
    "bravo ",
    "charlie ",
    "delta ",
    "echo ",
    "foxtrot ",
    "golf ",
    "hotel ",
    "india ",
    "juliet ",
    "kilo ",
    "lima ",
    "mike ",
    "november ",
    "oscar ",
    "papa ",
];

/// `tokens` tokens of text (4 characters each, as the sim counts them).
fn text(rng: &mut StdRng, tokens: usize) -> String {
    let chars = tokens * 4;
    let mut out = String::with_capacity(chars + 10);
    while out.len() < chars {
        out.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    out.truncate(chars);
    out
}

/// One conversation: its id (the affinity header), system prompt and history so far.
#[derive(Clone, Debug)]
pub(super) struct Session {
    pub id: String,
    generation: u64,
    index: usize,
    system: usize,
    history: Vec<Value>,
    rng: StdRng,
    pub busy: bool,
}

impl Session {
    fn new(index: usize, generation: u64, shape: &Shape, seed: u64) -> Session {
        Session {
            id: format!("session-{index}-{generation}"),
            generation,
            index,
            system: (index + generation as usize) % shape.system_prompts,
            history: Vec::new(),
            rng: StdRng::seed_from_u64(seed ^ (index as u64) << 20 ^ generation),
            busy: false,
        }
    }

    /// The next turn's request body: the whole history and a new user message.
    pub(super) fn next_request(&mut self, systems: &[String], shape: &Shape) -> Value {
        let user = text(&mut self.rng, shape.user_tokens);
        self.history.push(json!({"role": "user", "content": user}));
        let mut messages = vec![json!({"role": "system", "content": systems[self.system]})];
        messages.extend(self.history.iter().cloned());
        json!({
            "model": super::MODEL,
            "messages": messages,
            "max_tokens": shape.output_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    }

    /// Records the answer; after the last turn the session starts over as a new one.
    pub(super) fn answered(&mut self, answer: String, shape: &Shape, seed: u64) {
        self.history
            .push(json!({"role": "assistant", "content": answer}));
        if self.history.len() >= 2 * shape.turns {
            *self = Session::new(self.index, self.generation + 1, shape, seed);
        }
    }

    /// A failed turn is dropped from the history.
    pub(super) fn failed(&mut self) {
        self.history.pop();
    }
}

/// Everything one run sends, the same for every policy.
pub(super) struct Workload {
    pub systems: Vec<String>,
    pub sessions: Vec<Session>,
    /// Seconds from the start of each arrival.
    pub arrivals: Vec<f64>,
    /// Which idle session each arrival prefers to pick: a uniform draw in [0, 1).
    pub picks: Vec<f64>,
}

impl Workload {
    pub(super) fn new(
        shape: &Shape,
        sessions: usize,
        rate: f64,
        seconds: f64,
        seed: u64,
    ) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let systems = (0..shape.system_prompts)
            .map(|_| text(&mut rng, shape.system_tokens))
            .collect();
        let sessions = (0..sessions)
            .map(|i| Session::new(i, 0, shape, seed))
            .collect();
        let (mut arrivals, mut picks, mut at) = (Vec::new(), Vec::new(), 0.0);
        loop {
            // Exponential gaps: a Poisson process of `rate` arrivals a second.
            let u: f64 = rng.gen_range(f64::EPSILON..1.0);
            at += -u.ln() / rate;
            if at >= seconds {
                break;
            }
            arrivals.push(at);
            picks.push(rng.gen_range(0.0..1.0));
        }
        Workload {
            systems,
            sessions,
            arrivals,
            picks,
        }
    }
}

/// Mean prompt tokens of a request over a session's turns, as the sim counts them (4 tokens
/// a message plus its text), with answers of `output_tokens`.
pub(super) fn mean_prompt_tokens(shape: &Shape) -> f64 {
    let system = 4 + shape.system_tokens;
    let turn = |t: usize| {
        system + t * (4 + shape.user_tokens) + (t - 1) * (4 + shape.output_tokens as usize)
    };
    let total: usize = (1..=shape.turns).map(turn).sum();
    total as f64 / shape.turns as f64
}
