//! Sixteen threads on one allocator (issue 20): mallocs of many sizes on shared and own
//! streams, frees from any thread (a block allocated on one thread is often freed on
//! another, as the Python package's C ABI allows), `record_stream`, event completion,
//! `process_events`, `empty_cache` and counter reads, all at once, under every policy.
//! Throughout: no two live blocks overlap, the stream-ordering oracle (Note [The
//! stream-ordering oracle]) finds no memory handed to another stream too early, each
//! thread sees `memory_allocated()` cover at least the blocks it holds, and `check_stats`
//! (counters against a recount, and each policy's own invariants) holds whenever a thread
//! asks. At the end, freeing everything and emptying the cache leaves nothing reserved.

use gpumem::{AllocError, Allocator, Policy, SimDevice, StreamId, StreamOracle};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;

const THREADS: usize = 16;
const OPS: u64 = if cfg!(debug_assertions) { 1500 } else { 20_000 };
const STREAMS: u64 = 6;

/// xorshift: a reproducible sequence per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What the threads share besides the allocator: the live blocks by address (start to end,
/// to catch overlaps), and blocks handed from one thread to another to free.
struct World {
    a: Allocator<StreamOracle<SimDevice>>,
    oracle: StreamOracle<SimDevice>,
    sim: SimDevice,
    live: Mutex<BTreeMap<u64, u64>>,
    handed: Mutex<Vec<(u64, u64)>>,
}

impl World {
    fn note_malloc(&self, p: u64, size: u64, stream: StreamId) {
        self.oracle.note_malloc(p, size, stream);
        let mut live = self.live.lock();
        let before = live.range(..=p).next_back().map(|(&s, &e)| (s, e));
        assert!(before.is_none_or(|(_, e)| e <= p), "{p:#x} lands in the live block {before:x?}");
        let after = live.range(p..).next().map(|(&s, &e)| (s, e));
        assert!(after.is_none_or(|(s, _)| s >= p + size), "{p:#x}+{size} overlaps the live block {after:x?}");
        live.insert(p, p + size);
    }

    fn free(&self, p: u64) {
        // the oracle first: an event the allocator records while freeing comes after the free
        self.oracle.note_free(p);
        self.live.lock().remove(&p);
        self.a.free(p).expect("a live block frees");
    }
}

fn size(r: &mut Rng) -> u64 {
    match r.next() % 8 {
        0..=2 => 1 + r.next() % 4096,
        3 | 4 => (1 + r.next() % 64) << 14,
        5 => 1 << 20,
        6 => (1 + r.next() % 16) << 20,
        _ => (1 + r.next() % 3) * (20 << 20) + 512,
    }
}

fn worker(w: &World, t: usize) {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    // threads 0-5 share streams with the others; each other thread also has one of its own
    let streams = [StreamId(1 + t as u64 % STREAMS), StreamId(100 + t as u64)];
    let mut mine: Vec<(u64, u64)> = Vec::new();
    for i in 0..OPS {
        let stream = streams[(r.next() % 2) as usize];
        match r.next() % 16 {
            0..=6 => {
                let n = size(&mut r);
                match w.a.malloc(n, stream) {
                    Ok(p) => {
                        w.note_malloc(p, n, stream);
                        mine.push((p, n));
                    }
                    Err(AllocError::OutOfMemory(_)) => {}
                    Err(e) => panic!("thread {t}: malloc({n}): {e}"),
                }
            }
            7..=10 if !mine.is_empty() => {
                let (p, _) = mine.swap_remove((r.next() % mine.len() as u64) as usize);
                w.free(p);
            }
            11 if !mine.is_empty() => {
                // to another thread, which frees it
                let k = (r.next() % mine.len() as u64) as usize;
                w.handed.lock().push(mine.swap_remove(k));
            }
            12 => {
                let taken = w.handed.lock().pop();
                if let Some((p, _)) = taken {
                    w.free(p);
                }
            }
            13 if !mine.is_empty() => {
                let (p, _) = mine[(r.next() % mine.len() as u64) as usize];
                let other = StreamId(1 + r.next() % STREAMS);
                w.oracle.note_record_stream(p, other);
                w.a.record_stream(p, other).expect("a live block");
            }
            14 => match r.next() % 8 {
                0 => w.sim.complete_all(),
                1 => w.a.empty_cache().expect("empty_cache"),
                2 => w.a.process_events().expect("process_events"),
                _ => w.sim.complete_stream(StreamId(1 + r.next() % STREAMS)),
            },
            _ => {
                let held: u64 = mine.iter().map(|b| b.1).sum();
                let allocated = w.a.memory_allocated();
                assert!(
                    allocated >= held,
                    "thread {t}: memory_allocated() {allocated} < {held} held by this thread"
                );
            }
        }
        if i % 256 == 255 {
            w.a.check_stats().unwrap_or_else(|e| panic!("thread {t}, op {i}: {e}"));
        }
    }
    for (p, _) in mine {
        w.free(p);
    }
}

#[test]
fn sixteen_threads_keep_every_invariant() {
    for policy in Policy::NAMES {
        let sim = SimDevice::new(8 << 30);
        let oracle = StreamOracle::new(sim.clone());
        let a = Allocator::with_policy(oracle.clone(), &Policy::parse(policy).unwrap()).unwrap();
        let w = Arc::new(World { a, oracle, sim, live: Mutex::default(), handed: Mutex::default() });
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || worker(&w, t))
            })
            .collect();
        for h in handles {
            h.join().unwrap_or_else(|_| panic!("{policy}: a thread failed"));
        }
        for (p, _) in std::mem::take(&mut *w.handed.lock()) {
            w.free(p);
        }
        w.a.check_stats().unwrap_or_else(|e| panic!("{policy}: {e}"));
        assert_eq!(w.a.memory_allocated(), 0, "{policy}");
        w.sim.complete_all();
        w.a.empty_cache().unwrap();
        assert_eq!(w.a.memory_reserved(), 0, "{policy}");
        assert_eq!(w.sim.used(), 0, "{policy}");
        let report = w.oracle.report();
        assert_eq!(report.stream_violations, 0, "{policy}: {:?}", report.first_violation);
        assert!(!w.a.is_poisoned(), "{policy}");
    }
}
