//! The hit path on the simulated device (issue 20): one 1 MiB malloc+free pair on a busy
//! cache, per policy, and the total throughput of 8 threads, each on its own stream or all on
//! one, beside one thread's. Run with `cargo bench -p gpumem --bench hit_path`;
//! docs/performance.md has the figures. Speed targets live here, never in tests.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gpumem::{Allocator, Policy, SimDevice, StreamId};
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const POLICIES: [&str; 2] = ["torch", "gpumem"];

/// An allocator whose cache holds a thousand holes of 4-100 KiB, as a real program's does
/// (on an empty cache every lookup is trivially short); the live blocks are returned too.
fn busy(policy: &str) -> (Arc<Allocator<SimDevice>>, Vec<u64>) {
    let a = Allocator::with_policy(SimDevice::default(), &Policy::parse(policy).unwrap()).unwrap();
    let mut kept = Vec::new();
    for i in 0..2000u64 {
        let p = a.malloc(4096 + (i % 97) * 1024, StreamId::DEFAULT).unwrap();
        if i % 2 == 0 {
            a.free(p).unwrap();
        } else {
            kept.push(p);
        }
    }
    (Arc::new(a), kept)
}

fn hit_pair(c: &mut Criterion) {
    let mut g = c.benchmark_group("hit_pair_1MiB_busy");
    for policy in POLICIES {
        let (a, _kept) = busy(policy);
        let warm = a.malloc(1 << 20, StreamId::DEFAULT).unwrap();
        a.free(warm).unwrap();
        g.bench_function(policy, |b| {
            b.iter(|| {
                let p = a.malloc(black_box(1 << 20), StreamId::DEFAULT).unwrap();
                a.free(black_box(p)).unwrap();
            })
        });
    }
    g.finish();
}

/// The time `threads` threads take for `pairs` pairs each, thread `i` on `stream(i)`, with
/// PyTorch's sizes (`threads_pairs_per_s` in `../shared/bench/torch_alloc_bench.py`).
fn run_threads(
    a: &Arc<Allocator<SimDevice>>,
    threads: usize,
    pairs: u64,
    stream: fn(usize) -> StreamId,
) -> Duration {
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (a, start) = (a.clone(), start.clone());
            std::thread::spawn(move || {
                let size = (i as u64 + 1) << 16;
                start.wait();
                for _ in 0..pairs {
                    let p = a.malloc(size, stream(i)).unwrap();
                    a.free(black_box(p)).unwrap();
                }
            })
        })
        .collect();
    start.wait();
    let t = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    t.elapsed()
}

fn threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("threads");
    g.sample_size(10);
    let own: fn(usize) -> StreamId = |i| StreamId(0x1000 + i as u64);
    let one: fn(usize) -> StreamId = |_| StreamId(0x1000);
    for policy in POLICIES {
        for (label, threads, stream) in [("1", 1, own), ("8_own_streams", 8, own), ("8_one_stream", 8, one)] {
            let (a, _kept) = busy(policy);
            run_threads(&a, threads, 1, stream); // every thread's first pair grows the cache
            g.throughput(Throughput::Elements(threads as u64));
            g.bench_with_input(BenchmarkId::new(policy, label), &threads, |b, &t| {
                // one iteration: one pair on every thread
                b.iter_custom(|iters| run_threads(&a, t, iters, stream))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, hit_pair, threads);
criterion_main!(benches);
