//! What a phase measured, and the table and ratios printed at the end.

use std::fmt::Write as _;
use std::time::Duration;

use super::client::Tally;
use super::cpu::Cpu;

/// What one phase measured.
pub(super) struct Report {
    pub name: &'static str,
    /// Every connection's tally merged, latencies sorted.
    pub tally: Tally,
    pub measured: Duration,
    /// Requests and new connections the replicas saw during the phase, warm-up included.
    pub upstream_requests: u64,
    pub upstream_connections: u64,
    /// CPU spent in the measured window; `None` where `/proc` cannot be read.
    pub cpu: Option<Cpu>,
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds.
pub(super) fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1000.0
}

impl Report {
    pub(super) fn rate(&self) -> f64 {
        self.tally.latencies.len() as f64 / self.measured.as_secs_f64()
    }

    pub(super) fn ms(&self, p: f64) -> f64 {
        percentile(&self.tally.latencies, p)
    }
}

pub(super) fn render(reports: &[Report]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "phase", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:<14} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7}",
            r.name,
            r.rate(),
            r.ms(50.0),
            r.ms(90.0),
            r.ms(99.0),
            r.ms(100.0),
            r.tally.errors,
        );
    }
    // Each phase against calling the replicas directly with the same request: predict
    // phases against `direct-predict`, the others against `direct`.
    let direct_of = |name: &str| {
        let wanted = match name.ends_with("tg-predict") {
            true => "direct-predict",
            false => "direct",
        };
        reports.iter().find(|r| r.name == wanted)
    };
    for tollgate in reports.iter().filter(|r| !r.name.starts_with("direct")) {
        if let Some(direct) = direct_of(tollgate.name) {
            let _ = writeln!(
                out,
                "{}/{} throughput {:.2}x; added latency p50 {:+.3} ms, p99 {:+.3} ms",
                tollgate.name,
                direct.name,
                tollgate.rate() / direct.rate(),
                tollgate.ms(50.0) - direct.ms(50.0),
                tollgate.ms(99.0) - direct.ms(99.0),
            );
        }
    }
    // Each variant's cost against the default setup, from tollgate's own CPU per request.
    let per_request = |r: &Report| {
        r.cpu
            .map(|c| c.tollgate / r.tally.latencies.len().max(1) as f64)
    };
    if let Some(base) = reports
        .iter()
        .find(|r| r.name == "tollgate")
        .and_then(per_request)
    {
        for r in reports.iter().filter(|r| r.name.starts_with("tg-")) {
            if let Some(cost) = per_request(r) {
                let _ = writeln!(
                    out,
                    "{}: tollgate CPU per request {:.0} us, {:.2}x the default setup ({:.0} us)",
                    r.name,
                    cost * 1e6,
                    cost / base,
                    base * 1e6
                );
            }
        }
    }
    for r in reports {
        let mut line = format!(
            "{}: replicas saw {} requests on {} new connections (warm-up included); {} client reconnects",
            r.name, r.upstream_requests, r.upstream_connections, r.tally.reconnects
        );
        if let Some(cpu) = r.cpu {
            let secs = r.measured.as_secs_f64();
            let per_req = 1e6 / r.tally.latencies.len().max(1) as f64;
            let others = (cpu.machine - cpu.own - cpu.tollgate - cpu.redis).max(0.0);
            let _ = write!(
                line,
                "\n{}: cores busy: harness+replicas {:.2}, tollgate {:.2}, other processes {:.2}; \
                 CPU per request: harness+replicas {:.0} us, tollgate {:.0} us",
                r.name,
                cpu.own / secs,
                cpu.tollgate / secs,
                others / secs,
                cpu.own * per_req,
                cpu.tollgate * per_req,
            );
            if cpu.redis > 0.0 {
                let _ = write!(
                    line,
                    "; redis-server {:.2} cores, {:.0} us per request",
                    cpu.redis / secs,
                    cpu.redis * per_req
                );
            }
        }
        let _ = writeln!(out, "{line}");
        if let Some(e) = &r.tally.first_error {
            let _ = writeln!(out, "{}: first error: {e}", r.name);
        }
    }
    out
}
