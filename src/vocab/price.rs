//! Cost of a request in integer nano- and micro-dollars: prices are converted once, sums are
//! exact integers, so totals never drift the way float sums do.

use super::Usage;

/// Prices in nano-dollars (1e-9 USD) per token: 0.50 USD per million tokens is 500.
/// Three decimals of USD per million tokens are kept exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenPrices {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

impl TokenPrices {
    /// uncached input × input price + cached input × cached price + output × output price.
    /// Saturates instead of wrapping on counts no replica reports honestly.
    pub fn cost_nanos(&self, u: &Usage) -> u64 {
        u.uncached_input()
            .saturating_mul(self.input)
            .saturating_add(u.cached_input.saturating_mul(self.cached_input))
            .saturating_add(u.output.saturating_mul(self.output))
    }

    /// The cost in micro-dollars, rounded half up.
    pub fn cost_micros(&self, u: &Usage) -> u64 {
        micros(self.cost_nanos(u))
    }
}

pub fn micros(nanos: u64) -> u64 {
    nanos.saturating_add(500) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_follows_the_formula_in_exact_integers() {
        let p = TokenPrices {
            input: 500,
            cached_input: 100,
            output: 1500,
        };
        let u = Usage {
            input: 1_000_000,
            cached_input: 400_000,
            output: 2_000_000,
            reasoning: 0,
        };
        // 0.6M × $0.50 + 0.4M × $0.10 + 2M × $1.50 = $0.30 + $0.04 + $3.00
        assert_eq!(p.cost_micros(&u), 3_340_000);
        // A million one-token requests cost exactly what one million-token request costs.
        let one = Usage {
            input: 0,
            cached_input: 0,
            output: 1,
            reasoning: 0,
        };
        assert_eq!(
            p.cost_nanos(&one) * 1_000_000,
            p.cost_nanos(&Usage {
                output: 1_000_000,
                ..one
            })
        );
    }
}
