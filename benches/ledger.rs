//! Ledger write throughput: records handed to the writer and committed to SQLite, per second.
//! Target: at least 50,000 records/s on the 2-core reference machine.
//!
//!     cargo bench --bench ledger

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tollgate::account::{Ledger, UsageRecord};
use tollgate::vocab::Usage;

fn records(n: usize, offset: usize) -> Vec<UsageRecord> {
    (0..n)
        .map(|i| UsageRecord {
            id: tollgate::account::record_id(1_795_000_000_000 + (offset + i) as i64),
            request_id: format!("req_{:032x}", offset + i),
            ts_ms: 1_795_000_000_000 + (offset + i) as i64,
            key_id: format!("team-{}", i % 16).into(),
            model: format!("org/model-{}", i % 4).into(),
            surface: "chat_completions",
            status: 200,
            usage: Usage {
                input: 1200,
                cached_input: 512,
                output: 300,
                reasoning: 0,
            },
            cost_nanos: 1_234_567,
            estimated: false,
            ttft_ms: Some(41.5),
            duration_ms: 812.25,
            replica: Some("10.0.0.11:8000".into()),
            queue_ms: None,
            deployed: None,
        })
        .collect()
}

fn ledger_writes(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path(), Default::default()).expect("ledger opens");
    let mut group = c.benchmark_group("ledger");
    group
        .measurement_time(Duration::from_secs(8))
        .sample_size(20);
    for n in [1_000usize, 10_000] {
        group.throughput(Throughput::Elements(n as u64));
        let mut offset = 0;
        group.bench_function(format!("record_and_commit_{n}"), |b| {
            b.iter_batched(
                || {
                    offset += n;
                    records(n, offset)
                },
                |batch| {
                    for r in batch {
                        ledger.record(r);
                    }
                    ledger.flush();
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
    ledger.close();
}

criterion_group!(benches, ledger_writes);
criterion_main!(benches);
