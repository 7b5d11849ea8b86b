//! Cache-hit pairs for instruction counting: `valgrind --tool=callgrind` counts what
//! `hit_loop` executes (docs/performance.md has the command). The cache is made busy first
//! (a thousand holes of 4-100 KiB, as `gpumem bench`'s `hit_pair_1MiB_busy` does), so that a
//! lookup is not trivially short.
//!
//! Usage: `hit_pairs POLICY PAIRS` (for example `hit_pairs torch 100000`).

use gpumem::{Allocator, Policy, SimDevice, StreamId};

/// The measured loop: `pairs` malloc+free pairs of 1 MiB on a warm cache.
#[inline(never)]
fn hit_loop(a: &Allocator<SimDevice>, pairs: u64) {
    for _ in 0..pairs {
        let p = a.malloc(1 << 20, StreamId::DEFAULT).expect("a cache hit");
        a.free(std::hint::black_box(p)).expect("our own pointer");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let policy = Policy::parse(args.get(1).map_or("gpumem", String::as_str)).expect("a policy name");
    let pairs: u64 = args.get(2).map_or(100_000, |s| s.parse().expect("a pair count"));
    let a = Allocator::with_policy(SimDevice::default(), &policy).expect("an allocator");
    let mut kept = Vec::new();
    for i in 0..2000u64 {
        let p = a.malloc(4096 + (i % 97) * 1024, StreamId::DEFAULT).expect("room");
        if i % 2 == 0 {
            a.free(p).expect("our own pointer");
        } else {
            kept.push(p);
        }
    }
    // warm: the first pair grows the cache
    hit_loop(&a, 1);
    hit_loop(&a, pairs);
    for p in kept {
        a.free(p).expect("our own pointer");
    }
    println!("{pairs} pairs, allocated after: {}", a.memory_allocated());
}
