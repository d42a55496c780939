//! CPU time from `/proc`, sampled over the measured window.

use tokio::time::sleep_until;
use tokio::time::Instant;

/// CPU seconds from `/proc` (Linux): this process (load generator and replicas), tollgate,
/// the `cluster` variant's redis-server, and every core of the machine, so that other work
/// on a shared box shows up.
#[derive(Clone, Copy)]
pub(super) struct Cpu {
    pub(super) own: f64,
    pub(super) tollgate: f64,
    pub(super) redis: f64,
    pub(super) machine: f64,
}

impl Cpu {
    pub(super) fn now(tollgate: Option<u32>, redis: Option<u32>) -> Option<Cpu> {
        let redis = redis
            .and_then(|pid| process_ticks(&pid.to_string()))
            .unwrap_or(0);
        let tollgate = match tollgate {
            // With its children: nginx works in worker processes.
            Some(pid) => {
                let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .unwrap_or_default();
                process_ticks(&pid.to_string())?
                    + children
                        .split_whitespace()
                        .filter_map(process_ticks)
                        .sum::<u64>()
            }
            None => 0,
        };
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace();
        let ticks: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal; guest time is already in user.
        let busy = ticks.iter().take(8).sum::<u64>() - ticks.get(3)? - ticks.get(4)?;
        // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
        let secs = |t: u64| t as f64 / 100.0;
        Some(Cpu {
            own: secs(process_ticks("self")?),
            tollgate: secs(tollgate),
            redis: secs(redis),
            machine: secs(busy),
        })
    }
}

/// The processes whose CPU a phase reports apart from the rest of the machine.
#[derive(Clone, Copy, Default)]
pub(super) struct Watched {
    pub(super) tollgate: Option<u32>,
    pub(super) redis: Option<u32>,
}

/// CPU spent between `from` and `to`.
pub(super) async fn sample_cpu(from: Instant, to: Instant, watched: Watched) -> Option<Cpu> {
    sleep_until(from).await;
    let a = Cpu::now(watched.tollgate, watched.redis)?;
    sleep_until(to).await;
    let b = Cpu::now(watched.tollgate, watched.redis)?;
    Some(Cpu {
        own: b.own - a.own,
        tollgate: b.tollgate - a.tollgate,
        redis: b.redis - a.redis,
        machine: b.machine - a.machine,
    })
}

/// utime + stime of a process.
pub(super) fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the numeric fields start after its closing paren.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}
