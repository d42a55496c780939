//! Tokens of one request, in the one shape every engine's report is normalised to
//! (`translate::usage`).

/// `cached_input ⊂ input`, `reasoning ⊂ output`: nothing is ever counted twice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    pub reasoning: u64,
}

impl Usage {
    pub fn uncached_input(&self) -> u64 {
        self.input.saturating_sub(self.cached_input)
    }

    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}
