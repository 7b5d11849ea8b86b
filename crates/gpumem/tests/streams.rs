//! Stream ordering under every policy: random multi-stream sequences (four streams,
//! `record_stream`, events completing in random order, syncs, `empty_cache`), training
//! loops whose steps use several streams (so that the `gpumem` policy follows a periodic
//! plan), and sixteen threads sharing one allocator, all watched by a [`StreamOracle`] that
//! keeps its own books: no byte may reach another stream before the work on it is known
//! done. The stats invariants are checked too.
//!
//! A failure names the policy and the first violation; proptest prints the smallest
//! sequence it found that still fails.

use gpumem::{AllocError, Allocator, BlockState, Device, EventId, Policy, SimDevice, StreamId, StreamOracle};
use proptest::prelude::*;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// Every policy, and option sets that change how memory moves between streams.
const POLICIES: &[&str] = &[
    "torch",
    "torch-expandable",
    "torch:max_split_size_mb:64",
    "gpumem",
    "gpumem:periodic_plan:False",
    "gpumem:compaction:True",
];

/// The streams the sequences use: the default stream and three others.
const STREAMS: u8 = 4;

#[derive(Clone, Debug)]
enum Step {
    Alloc {
        size: u64,
        stream: u8,
    },
    Free {
        pick: usize,
    },
    RecordStream {
        pick: usize,
        stream: u8,
    },
    /// Completes one event (picked among every event created so far), whichever stream it
    /// was recorded on: events complete in any order across streams.
    CompleteEvent {
        pick: u64,
    },
    CompleteStream {
        stream: u8,
    },
    /// The program waits for a stream (`torch.cuda.current_stream().synchronize()`).
    Sync {
        stream: u8,
    },
    SyncDevice,
    EmptyCache,
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1..=MIB,
        3 => MIB + 1..10 * MIB,
        2 => 10 * MIB..120 * MIB,
        1 => 200 * MIB..500 * MIB,
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (size(), 0..STREAMS).prop_map(|(size, stream)| Step::Alloc { size, stream }),
        5 => any::<usize>().prop_map(|pick| Step::Free { pick }),
        2 => (any::<usize>(), 0..STREAMS).prop_map(|(pick, stream)| Step::RecordStream { pick, stream }),
        2 => any::<u64>().prop_map(|pick| Step::CompleteEvent { pick }),
        1 => (0..STREAMS).prop_map(|stream| Step::CompleteStream { stream }),
        1 => (0..STREAMS).prop_map(|stream| Step::Sync { stream }),
        1 => Just(Step::SyncDevice),
        1 => Just(Step::EmptyCache),
    ]
}

type Oracle = StreamOracle<SimDevice>;

/// An allocator of `policy` over a 1 GiB simulated device, watched by an oracle.
fn setup(policy: &str, capacity: u64) -> (SimDevice, Oracle, Allocator<Oracle>) {
    let sim = SimDevice::new(capacity);
    let oracle = StreamOracle::new(sim.clone());
    let alloc = Allocator::with_policy(oracle.clone(), &Policy::parse(policy).unwrap()).unwrap();
    (sim, oracle, alloc)
}

/// Allocates through the allocator and tells the oracle; `None` when the device is full.
fn malloc(a: &Allocator<Oracle>, o: &Oracle, size: u64, stream: StreamId) -> Option<u64> {
    match a.malloc(size, stream) {
        Ok(p) => {
            o.note_malloc(p, size, stream);
            Some(p)
        }
        Err(AllocError::OutOfMemory(_)) => None,
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Frees through the allocator, telling the oracle first (Note [The stream-ordering oracle]).
fn free(a: &Allocator<Oracle>, o: &Oracle, p: u64) {
    o.note_free(p);
    a.free(p).unwrap();
}

fn record_stream(a: &Allocator<Oracle>, o: &Oracle, p: u64, stream: StreamId) {
    o.note_record_stream(p, stream);
    a.record_stream(p, stream).unwrap();
}

/// Panics, naming the policy and the first violation, if the oracle saw one.
fn assert_ordered(policy: &str, o: &Oracle) {
    let r = o.report();
    if let Some(v) = r.first_violation {
        panic!(
            "policy {policy}: {} bytes in {} mallocs handed to a stream too early; the first: {v}",
            r.stream_violations, r.stream_violation_count
        );
    }
}

/// Stats equal a recount, no two live blocks overlap, each live pointer has its block, and
/// reserved memory is what the device handed out.
fn check(a: &Allocator<Oracle>, sim: &SimDevice, live: &[(u64, u64)]) {
    a.check_stats().unwrap();
    let mut blocks: Vec<(u64, u64)> = a
        .snapshot()
        .iter()
        .flat_map(|s| s.blocks.iter())
        .filter(|b| b.state == BlockState::ActiveAllocated)
        .map(|b| (b.address, b.size))
        .collect();
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "live blocks overlap: {w:?}");
    }
    assert_eq!(blocks.len(), live.len());
    for &(p, size) in live {
        let i = blocks.binary_search_by_key(&p, |b| b.0).expect("a live pointer has its block");
        assert!(blocks[i].1 >= size, "block smaller than the request");
    }
    assert_eq!(a.memory_reserved(), sim.used());
}

/// Frees everything, empties the cache, and checks that nothing is left.
fn finish(policy: &str, sim: &SimDevice, o: &Oracle, a: &Allocator<Oracle>, live: &mut Vec<(u64, u64)>) {
    for (p, _) in live.drain(..) {
        free(a, o, p);
    }
    a.empty_cache().unwrap();
    check(a, sim, live);
    assert_eq!(a.memory_reserved(), 0, "{policy}: reserved after everything was freed");
    assert_eq!(sim.used(), 0);
    assert_ordered(policy, o);
}

fn run(policy: &str, steps: &[Step]) {
    let (sim, o, a) = setup(policy, 1 << 30);
    let mut live: Vec<(u64, u64)> = Vec::new();
    let nth = |live: &[(u64, u64)], i: usize| live[i % live.len()].0;
    for s in steps {
        match *s {
            Step::Alloc { size, stream } => {
                if let Some(p) = malloc(&a, &o, size, StreamId(stream as u64)) {
                    live.push((p, size));
                }
            }
            Step::Free { pick } if !live.is_empty() => {
                let (p, _) = live.swap_remove(pick % live.len());
                free(&a, &o, p);
            }
            Step::RecordStream { pick: i, stream } if !live.is_empty() => {
                record_stream(&a, &o, nth(&live, i), StreamId(stream as u64));
            }
            Step::CompleteEvent { pick } => {
                let n = sim.counters().events_created;
                if n > 0 {
                    // event ids count from 1; an event not pending is left as it is
                    sim.complete_event(EventId(1 + pick % n));
                }
            }
            Step::CompleteStream { stream } => sim.complete_stream(StreamId(stream as u64)),
            Step::Sync { stream } => o.synchronize_stream(StreamId(stream as u64)).unwrap(),
            Step::SyncDevice => o.synchronize_device().unwrap(),
            Step::EmptyCache => a.empty_cache().unwrap(),
            _ => {}
        }
        check(&a, &sim, &live);
        assert_ordered(policy, &o);
    }
    finish(policy, &sim, &o, &a, &mut live);
}

/// One request of a multi-stream training step: size, how many requests later it is freed,
/// its stream, a stream it is also used on (`record_stream`), and what the GPU does after
/// it (0-3: completes that stream; 4: completes one event; 5-23: nothing).
type Request = (u64, usize, u8, Option<u8>, u8);

fn period() -> impl Strategy<Value = Vec<Request>> {
    let request = (
        prop_oneof![3 => 512..=MIB, 2 => MIB..8 * MIB],
        1usize..40,
        prop_oneof![3 => Just(0u8), 1 => 1..STREAMS],
        prop::option::weighted(0.15, 0..STREAMS),
        0u8..24,
    );
    prop::collection::vec(request, 24..60)
}

/// The same step `reps` times, every block freed by the step's end, except that the first
/// step also allocates long-lived blocks (weights, optimizer state) on the default stream
/// among its own, every `every`-th request, which leaves holes between them that a plan may
/// use; under the `gpumem` policy a plan follows after a few steps.
fn run_periodic(policy: &str, step: &[Request], reps: usize, every: usize, capacity: u64) {
    let (sim, o, a) = setup(policy, capacity);
    let mut live: Vec<(u64, u64)> = Vec::new();
    let mut due: Vec<(usize, u64)> = Vec::new();
    let mut n = 0;
    for rep in 0..reps {
        for (i, &(size, life, stream, uses, gpu)) in step.iter().enumerate() {
            let life = life.min(step.len() - i);
            let Some(p) = malloc(&a, &o, size, StreamId(stream as u64)) else {
                continue; // out of memory: the step goes on without it
            };
            if let Some(u) = uses {
                record_stream(&a, &o, p, StreamId(u as u64));
            }
            live.push((p, size));
            due.push((n + life, p));
            if rep == 0 && i % every == every - 1 {
                let w = size / 2 + 4096;
                if let Some(q) = malloc(&a, &o, w, StreamId(stream as u64)) {
                    live.push((q, w));
                }
            }
            n += 1;
            while let Some(j) = due.iter().position(|&(when, _)| when <= n) {
                let (_, p) = due.swap_remove(j);
                live.retain(|l| l.0 != p);
                free(&a, &o, p);
            }
            match gpu {
                0..4 => sim.complete_stream(StreamId(gpu as u64)),
                4 => {
                    let k = sim.counters().events_created;
                    if k > 0 {
                        sim.complete_event(EventId(1 + (n as u64 * 7919) % k));
                    }
                }
                _ => {}
            }
            assert_ordered(policy, &o);
        }
        check(&a, &sim, &live);
    }
    finish(policy, &sim, &o, &a, &mut live);
}

// Random sequences: 6 policies × 400 cases; training loops: 6 × 40. With tests/props.rs
// (16,200 sequences) CI runs well over 10,000 random sequences.
const CASES: u32 = 400;
const PERIODIC_CASES: u32 = 40;

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn random_streams_torch(steps in prop::collection::vec(step(), 1..80)) {
        run(POLICIES[0], &steps);
    }

    #[test]
    fn random_streams_torch_expandable(steps in prop::collection::vec(step(), 1..80)) {
        run(POLICIES[1], &steps);
    }

    #[test]
    fn random_streams_torch_max_split(steps in prop::collection::vec(step(), 1..80)) {
        run(POLICIES[2], &steps);
    }

    #[test]
    fn random_streams_gpumem(steps in prop::collection::vec(step(), 1..80)) {
        run(POLICIES[3], &steps);
    }

    #[test]
    fn random_streams_gpumem_no_plan(steps in prop::collection::vec(step(), 1..80)) {
        run(POLICIES[4], &steps);
    }

    #[test]
    fn random_streams_gpumem_no_compaction(steps in prop::collection::vec(step(), 1..80)) {
        run(POLICIES[5], &steps);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: PERIODIC_CASES, ..ProptestConfig::default() })]

    #[test]
    fn periodic_streams_torch(step in period(), every in 2usize..8, cap_mib in 64u64..1024) {
        run_periodic(POLICIES[0], &step, 8, every, cap_mib * MIB);
    }

    #[test]
    fn periodic_streams_torch_expandable(step in period(), every in 2usize..8, cap_mib in 64u64..1024) {
        run_periodic(POLICIES[1], &step, 8, every, cap_mib * MIB);
    }

    #[test]
    fn periodic_streams_torch_max_split(step in period(), every in 2usize..8, cap_mib in 64u64..1024) {
        run_periodic(POLICIES[2], &step, 8, every, cap_mib * MIB);
    }

    #[test]
    fn periodic_streams_gpumem(step in period(), every in 2usize..8, cap_mib in 64u64..1024) {
        run_periodic(POLICIES[3], &step, 8, every, cap_mib * MIB);
    }

    #[test]
    fn periodic_streams_gpumem_no_plan(step in period(), every in 2usize..8, cap_mib in 64u64..1024) {
        run_periodic(POLICIES[4], &step, 8, every, cap_mib * MIB);
    }

    #[test]
    fn periodic_streams_gpumem_no_compaction(step in period(), every in 2usize..8, cap_mib in 64u64..1024) {
        run_periodic(POLICIES[5], &step, 8, every, cap_mib * MIB);
    }
}

/// A small deterministic generator, one per thread.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Sixteen threads share one allocator: each allocates on its own stream and on a stream
/// they all share, frees, records uses on the others' streams, completes and synchronizes
/// streams, and now and then empties the cache.
fn stress(policy: &'static str, ops: usize) {
    const THREADS: u64 = 16;
    const SHARED: StreamId = StreamId(100);
    let (sim, o, a) = setup(policy, 8 << 30);
    let a = Arc::new(a);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (sim, o, a) = (sim.clone(), o.clone(), Arc::clone(&a));
            std::thread::spawn(move || {
                let mut rng = Lcg(t * 7 + 1);
                let mine = StreamId(t + 1);
                let mut live: Vec<(u64, u64)> = Vec::new();
                for _ in 0..ops {
                    let other = StreamId(1 + rng.below(THREADS));
                    match rng.below(20) {
                        0..=7 if live.len() < 24 => {
                            let size = match rng.below(4) {
                                0 => 1 + rng.below(8 * MIB),
                                _ => 1 + rng.below(MIB),
                            };
                            let stream = if rng.below(4) == 0 { SHARED } else { mine };
                            if let Some(p) = malloc(&a, &o, size, stream) {
                                live.push((p, size));
                            }
                        }
                        0..=13 if !live.is_empty() => {
                            let (p, _) = live.swap_remove(rng.below(live.len() as u64) as usize);
                            free(&a, &o, p);
                        }
                        14 | 15 if !live.is_empty() => {
                            let p = live[rng.below(live.len() as u64) as usize].0;
                            record_stream(&a, &o, p, if rng.below(2) == 0 { other } else { SHARED });
                        }
                        16 => sim.complete_stream(other),
                        17 => sim.complete_stream(mine),
                        18 => o.synchronize_stream(mine).unwrap(),
                        _ if rng.below(8) == 0 => a.empty_cache().unwrap(),
                        _ => a.process_events().unwrap(),
                    }
                }
                live
            })
        })
        .collect();
    let mut live: Vec<(u64, u64)> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    live.sort_unstable();
    check(&a, &sim, &live);
    assert_ordered(policy, &o);
    finish(policy, &sim, &o, &a, &mut live);
}

#[test]
fn sixteen_threads_share_one_allocator_torch() {
    stress("torch", 600);
}

#[test]
fn sixteen_threads_share_one_allocator_torch_expandable() {
    stress("torch-expandable", 600);
}

#[test]
fn sixteen_threads_share_one_allocator_gpumem() {
    stress("gpumem", 600);
}
