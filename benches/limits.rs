//! Admission + settlement on the hot path: one request's check-and-reserve and its
//! settlement, single-threaded and from several threads on different keys, against a naive
//! version that keeps every key's counters behind one global `Mutex<HashMap>`.
//! Target: under 1 µs per request single-threaded, and no global lock.
//!
//!     cargo bench --bench limits

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate::config::{self, Key, Model};
use tollgate::limits::{self, Demand, Registry};

const NOW: i64 = 1_795_000_000_000;

fn setup(keys: usize) -> (Vec<Arc<Key>>, Arc<Model>, Registry) {
    let mut text = String::from(
        "[[pools]]\nname = \"p\"\n[[models]]\nslug = \"m\"\npool = \"p\"\nprice = { input_per_mtok = 0.5, output_per_mtok = 1.5 }\n",
    );
    for i in 0..keys {
        text.push_str(&format!(
            "[[keys]]\nid = \"k{i}\"\nsha256 = \"{:064x}\"\nmodels = [\"*\"]\nrpm = 1000000000\ntpm = 1000000000000\nmax_concurrent = 100000\nbudget = {{ usd = 1000000000.0, period = \"monthly\" }}\n",
            i + 1
        ));
    }
    let s = config::parse(&text).expect("bench config");
    let registry = Registry::build(&s, None);
    let mut ks: Vec<Arc<Key>> = s.keys().cloned().collect();
    ks.sort_by(|a, b| a.id.cmp(&b.id));
    (ks, s.model("m").expect("model").clone(), registry)
}

/// The naive design: every key's counters in one map behind one lock.
#[derive(Default)]
struct Naive {
    map: Mutex<HashMap<String, (u64, u64, u64)>>,
}

impl Naive {
    fn admit(&self, key: &str, tokens: u64, cost: u64) -> bool {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(key.to_string()).or_default();
        if e.0 > 100_000 {
            return false;
        }
        e.0 += 1;
        e.1 += tokens;
        e.2 += cost;
        true
    }

    fn settle(&self, key: &str, reserved: u64, actual: u64) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = m.get_mut(key) {
            e.0 -= 1;
            e.1 = e.1 - reserved + actual;
        }
    }
}

fn one(key: &Key, model: &Model, r: &Registry, now: i64) {
    let demand = Demand {
        input_tokens: 200,
        output_tokens: 512,
        choices: 1,
        prices: model.token_prices,
        per_request: 0,
    };
    let counters = r.key(&key.id).expect("key");
    let (ticket, _view) = limits::admit(
        key,
        counters,
        model,
        r.model("m").expect("model"),
        demand,
        now,
        r.generation,
    )
    .expect("admitted");
    ticket.settle(500, 1_000, now);
}

fn single_thread(c: &mut Criterion) {
    let (keys, model, r) = setup(1);
    let naive = Naive::default();
    let mut g = c.benchmark_group("admit_settle");
    g.throughput(Throughput::Elements(1))
        .measurement_time(Duration::from_secs(4));
    let mut t = 0i64;
    g.bench_function("tollgate", |b| {
        b.iter(|| {
            t += 1;
            one(&keys[0], &model, &r, NOW + t / 1000)
        })
    });
    g.bench_function("naive_global_mutex", |b| {
        b.iter(|| {
            if naive.admit("k0", 712, 1000) {
                naive.settle("k0", 712, 500);
            }
        })
    });
    g.finish();
}

/// Requests per second from `threads` threads, each on its own key.
fn parallel(threads: usize, per_thread: usize, f: Arc<dyn Fn(usize) + Send + Sync>) -> f64 {
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                for _ in 0..per_thread {
                    f(t);
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    (threads * per_thread) as f64 / start.elapsed().as_secs_f64()
}

fn scaling(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (keys, model, r) = setup(threads);
    let shared = Arc::new((keys, model, r));
    let naive = Arc::new(Naive::default());
    let mut g = c.benchmark_group("admit_settle_threads");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements((threads * 20_000) as u64));
    g.bench_function(format!("tollgate_{threads}_threads"), |b| {
        b.iter(|| {
            let s = shared.clone();
            parallel(
                threads,
                20_000,
                Arc::new(move |t| one(&s.0[t], &s.1, &s.2, NOW)),
            )
        })
    });
    g.bench_function(format!("naive_global_mutex_{threads}_threads"), |b| {
        b.iter(|| {
            let n = naive.clone();
            let names: Arc<Vec<String>> = Arc::new((0..threads).map(|i| format!("k{i}")).collect());
            parallel(
                threads,
                20_000,
                Arc::new(move |t| {
                    if n.admit(&names[t], 712, 1000) {
                        n.settle(&names[t], 712, 500);
                    }
                }),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, single_thread, scaling);
criterion_main!(benches);
