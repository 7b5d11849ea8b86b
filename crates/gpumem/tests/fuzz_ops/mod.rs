//! The allocator API fuzzer's interpreter, shared by `fuzz/fuzz_targets/allocator_api.rs` and
//! the regression tests of what it found (`tests/fuzz_regressions.rs`): arbitrary sequences
//! of allocator calls on a simulated GPU, under every policy: mallocs of any size on several
//! streams, frees of live and foreign pointers, `record_stream`, event completion,
//! `process_events`, `empty_cache` and memory fractions. After every call the counters must
//! equal a recount and no two live blocks may overlap, and the stream-ordering oracle must
//! find no memory handed to another stream before the stream that freed it was known done;
//! at the end, freeing everything and emptying the cache must leave nothing reserved.
#![allow(dead_code)]

use gpumem::{AllocError, Allocator, Policy, SimDevice, StreamId, StreamOracle};
use std::collections::BTreeMap;

const POLICIES: &[&str] = &[
    "torch",
    "torch-expandable",
    "gpumem",
    "torch:max_split_size_mb:40,roundup_power2_divisions:4,garbage_collection_threshold:0.6,per_process_memory_fraction:0.9",
    "gpumem:recycle_slack:0.1,compact_factor:4",
    "gpumem:compaction:True",
];

const CAPACITIES: &[u64] = &[64 << 20, 1 << 30, 80 << 30, 1 << 50, u64::MAX];

/// Reads the input as a stream of little pieces; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u64(&mut self, n: usize) -> u64 {
        (0..n).fold(0, |acc, _| (acc << 8) | self.u8() as u64)
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

fn size(b: &mut Bytes) -> u64 {
    match b.u8() % 6 {
        0 => b.u64(1),             // small pool
        1 => b.u64(2) << 4,        // up to 1 MiB
        2 => (b.u64(2) + 1) << 10, // up to 64 MiB
        3 => (b.u64(1) + 1) << 22, // up to 1 GiB in 4 MiB steps
        4 => b.u64(8),             // anything, to the top of u64
        _ => (1 << 20) + b.u64(1), // around the small/large boundaries
    }
}

fn ok_or_oom<T>(r: Result<T, AllocError>, what: &str) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(AllocError::OutOfMemory(_) | AllocError::TooLarge(_)) => None,
        Err(e) => panic!("{what}: unexpected error {e}"),
    }
}

/// Runs the calls that `data` encodes and checks the invariants; panics where one fails.
pub fn run(data: &[u8]) {
    let mut b = Bytes(data);
    let policy = Policy::parse(POLICIES[b.u8() as usize % POLICIES.len()]).unwrap();
    let capacity = CAPACITIES[b.u8() as usize % CAPACITIES.len()];
    let sim = SimDevice::new(capacity);
    let oracle = StreamOracle::new(sim.clone());
    let Ok(alloc) = Allocator::with_policy(oracle.clone(), &policy) else { return };
    // live blocks: address -> requested size
    let mut live: BTreeMap<u64, u64> = BTreeMap::new();
    let mut steps = 0;
    while !b.done() && steps < 2000 {
        steps += 1;
        match b.u8() % 10 {
            0..=2 => {
                let (n, stream) = (size(&mut b), StreamId(b.u8() as u64 % 4));
                if let Some(p) = ok_or_oom(alloc.malloc(n, stream), "malloc") {
                    if p == 0 {
                        continue;
                    }
                    let end = p.checked_add(n).expect("a block that wraps the address space");
                    if let Some((&q, &m)) = live.range(..end).next_back() {
                        assert!(q + m <= p, "block {p:#x}+{n} overlaps live block {q:#x}+{m}");
                    }
                    live.insert(p, n);
                    oracle.note_malloc(p, n, stream);
                }
            }
            3 | 4 => {
                if !live.is_empty() {
                    let i = b.u8() as usize % live.len();
                    let p = *live.keys().nth(i).unwrap();
                    live.remove(&p);
                    oracle.note_free(p);
                    alloc.free(p).unwrap();
                }
            }
            5 => {
                // a pointer that is not the start of a live block: inside one, or anywhere
                let p = match live.iter().next() {
                    Some((&q, &m)) if b.u8() % 2 == 0 && m > 1 => q + 1 + b.u64(1) % (m - 1),
                    _ => b.u64(8),
                };
                if p != 0 && !live.contains_key(&p) {
                    assert!(matches!(alloc.free(p), Err(AllocError::InvalidPointer(_))));
                    assert!(alloc.record_stream(p, StreamId(1)).is_err());
                }
            }
            6 => {
                if !live.is_empty() {
                    let i = b.u8() as usize % live.len();
                    let p = *live.keys().nth(i).unwrap();
                    let s = StreamId(b.u8() as u64 % 4);
                    alloc.record_stream(p, s).unwrap();
                    oracle.note_record_stream(p, s);
                }
            }
            7 => match b.u8() % 3 {
                0 => sim.complete_stream(StreamId(b.u8() as u64 % 4)),
                1 => sim.complete_all(),
                _ => alloc.process_events().unwrap(),
            },
            8 => ok_or_oom(alloc.empty_cache(), "empty_cache").unwrap_or(()),
            _ => {
                let f = b.u8() as f64 / 200.0; // above 1.0 now and then: must be refused
                let r = alloc.set_per_process_memory_fraction(f);
                assert_eq!(r.is_ok(), f <= 1.0, "fraction {f}: {r:?}");
            }
        }
        if let Err(e) = alloc.check_stats() {
            panic!("after step {steps}: {e}");
        }
        if let Some(v) = oracle.report().first_violation {
            panic!("after step {steps}: {v}");
        }
    }
    for (p, _) in std::mem::take(&mut live) {
        oracle.note_free(p);
        alloc.free(p).unwrap();
    }
    sim.complete_all();
    alloc.empty_cache().unwrap();
    alloc.check_stats().unwrap();
    assert_eq!(alloc.memory_allocated(), 0);
    assert_eq!(alloc.memory_reserved(), 0, "reserved after freeing everything and empty_cache");
    assert_eq!(sim.used(), 0, "device memory still in use after empty_cache");
}
