//! Property tests: random sequences of alloc, free, record_stream, event completion and
//! empty_cache over several streams, in every policy, checked after every step.

use gpumem::{AllocError, Allocator, AllocatorConfig, BlockState, PolicyKind, SimDevice, StreamId};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

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
    Complete {
        stream: u8,
    },
    EmptyCache,
    /// A live block replaced by one `step` bytes larger, the old one freed right after (a KV
    /// cache grown by `torch.cat`: Note [Buffers grown by copying]).
    Grow {
        pick: usize,
        step: u64,
    },
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1..=MIB,                 // small pool
        3 => MIB + 1..10 * MIB,       // 20 MiB segments
        2 => 10 * MIB..120 * MIB,     // own segments
        1 => 200 * MIB..700 * MIB,    // several chunks; often more than the device has left
        1 => prop::sample::select(vec![512, MIB, 2 * MIB, 20 * MIB, 64 * MIB]),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (size(), 0u8..3).prop_map(|(size, stream)| Step::Alloc { size, stream }),
        4 => any::<usize>().prop_map(|pick| Step::Free { pick }),
        1 => (any::<usize>(), 0u8..3).prop_map(|(pick, stream)| Step::RecordStream { pick, stream }),
        1 => (0u8..3).prop_map(|stream| Step::Complete { stream }),
        1 => Just(Step::EmptyCache),
        2 => (any::<usize>(), prop::sample::select(vec![16u64 << 10, 48 << 10]))
            .prop_map(|(pick, step)| Step::Grow { pick, step }),
    ]
}

/// A live block as the test sees it: pointer, requested size, and the word written at its
/// first and last byte.
type Live = (u64, u64, u64);

fn check(a: &Allocator<SimDevice>, sim: &SimDevice, live: &[Live]) {
    let snap = a.snapshot();
    // no two live blocks overlap, and every live pointer is an allocated block
    let mut blocks: Vec<(u64, u64)> = snap
        .iter()
        .flat_map(|s| s.blocks.iter())
        .filter(|b| b.state == BlockState::ActiveAllocated)
        .map(|b| (b.address, b.size))
        .collect();
    blocks.sort();
    for w in blocks.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "live blocks overlap: {w:?}");
    }
    assert_eq!(blocks.len(), live.len());
    for &(p, size, tag) in live {
        let i = blocks.binary_search_by_key(&p, |b| b.0).expect("a live pointer has its block");
        assert!(blocks[i].1 >= size, "block smaller than the request");
        // its contents survived everything since (recycling, compaction, other blocks)
        assert_eq!(sim.read_tag(p), Some(tag), "the first byte of a live block was lost");
        assert_eq!(sim.read_tag(p + size - 1), Some(tag), "the last byte of a live block was lost");
    }
    // segments lie in device memory and do not overlap
    let mut segs: Vec<(u64, u64)> = snap.iter().map(|s| (s.address, s.total_size)).collect();
    segs.sort();
    for w in segs.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "segments overlap: {w:?}");
    }
    // every stat equals a recount from scratch, and no peak is below its current value
    a.check_stats().unwrap();
    let got = a.stats();
    let m = got.to_map();
    for (key, &current) in &m {
        if let Some(stat) = key.strip_suffix(".current") {
            assert!(m[&format!("{stat}.peak")] >= current, "{stat} peak below current");
        }
    }
    // reserved is what the device has handed out
    assert_eq!(got.reserved_bytes.all().current as u64, sim.used());
}

/// A new block of `size` bytes with `tag` at its first and last bytes; `None` when the
/// device is full.
fn stamped_malloc(
    a: &Allocator<SimDevice>,
    sim: &SimDevice,
    size: u64,
    stream: StreamId,
    tag: usize,
) -> Option<u64> {
    match a.malloc(size, stream) {
        Ok(p) => {
            sim.write_tag(p, tag as u64).unwrap();
            sim.write_tag(p + size - 1, tag as u64).unwrap();
            Some(p)
        }
        Err(AllocError::OutOfMemory(_)) => None,
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// The options `conf`, under PyTorch's algorithm unless they name another policy (the
/// library's default is the gpumem policy; these tests are about PyTorch's).
fn torch_config(conf: &str) -> AllocatorConfig {
    let mut c = AllocatorConfig::parse(conf).unwrap();
    c.settle_policy(PolicyKind::Torch).unwrap();
    c
}

fn run(config: &str, steps: &[Step]) {
    let sim = SimDevice::new(1 << 30);
    let a = Allocator::new(sim.clone(), torch_config(config)).unwrap();
    let mut live: Vec<Live> = Vec::new();
    for (tag, s) in steps.iter().enumerate() {
        match *s {
            Step::Alloc { size, stream } => {
                if let Some(p) = stamped_malloc(&a, &sim, size, StreamId(stream as u64), tag) {
                    live.push((p, size, tag as u64));
                }
            }
            Step::Free { pick } => {
                if !live.is_empty() {
                    let (p, _, _) = live.swap_remove(pick % live.len());
                    a.free(p).unwrap();
                    assert!(a.free(p).is_err(), "a double free must be refused");
                }
            }
            Step::RecordStream { pick, stream } => {
                if !live.is_empty() {
                    a.record_stream(live[pick % live.len()].0, StreamId(stream as u64)).unwrap();
                }
            }
            Step::Complete { stream } => {
                sim.complete_stream(StreamId(stream as u64));
                a.process_events().unwrap();
            }
            Step::EmptyCache => a.empty_cache().unwrap(),
            Step::Grow { pick, step } => {
                if !live.is_empty() {
                    let i = pick % live.len();
                    let (old, size, _) = live[i];
                    if let Some(p) = stamped_malloc(&a, &sim, size + step, StreamId(0), tag) {
                        a.free(old).unwrap();
                        live[i] = (p, size + step, tag as u64);
                    }
                }
            }
        }
        check(&a, &sim, &live);
    }
    for (p, _, _) in live.drain(..) {
        a.free(p).unwrap();
    }
    a.empty_cache().unwrap();
    check(&a, &sim, &live);
    assert_eq!(a.memory_reserved(), 0);
    assert_eq!(a.memory_allocated(), 0);
    assert_eq!(sim.used(), 0);
    assert!(sim.live_segments().is_empty());
    assert!(sim.live_mappings().is_empty());
    if !config.contains("gpumem") {
        // the gpumem policy keeps its address range reserved (address space, not memory)
        assert!(sim.live_reservations().is_empty());
    }
}

// 8 configurations × 1,100 cases = 8,800 random sequences; with the 200 training loops below
// and tests/streams.rs (2,640 multi-stream sequences), CI runs over 11,000. (2,000 each took
// 5.5 minutes of a 2-core machine in debug, most of `cargo test --workspace`.)
const CASES: u32 = 1100;

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn torch_default(steps in prop::collection::vec(step(), 1..60)) {
        run("", &steps);
    }

    #[test]
    fn torch_max_split_and_divisions(steps in prop::collection::vec(step(), 1..60)) {
        run("max_split_size_mb:64,roundup_power2_divisions:4", &steps);
    }

    #[test]
    fn torch_expandable(steps in prop::collection::vec(step(), 1..60)) {
        run("expandable_segments:True", &steps);
    }

    #[test]
    fn gpumem(steps in prop::collection::vec(step(), 1..60)) {
        run("policy:gpumem", &steps);
    }

    #[test]
    fn gpumem_with_recycle_slack(steps in prop::collection::vec(step(), 1..60)) {
        run("policy:gpumem,recycle_slack:0.2", &steps);
    }

    #[test]
    fn gpumem_with_recycle_above(steps in prop::collection::vec(step(), 1..60)) {
        run("policy:gpumem,recycle_above_mb:64", &steps);
    }

    #[test]
    fn gpumem_split_idle_no_compaction(steps in prop::collection::vec(step(), 1..60)) {
        run("policy:gpumem,compact_factor:2,compaction:False", &steps);
    }

    #[test]
    fn torch_with_gc(steps in prop::collection::vec(step(), 1..60)) {
        run("garbage_collection_threshold:0.6,per_process_memory_fraction:0.8", &steps);
    }
}

/// One request of a training step: its size, and how many requests later it is freed.
fn periodic_step() -> impl Strategy<Value = Vec<(u64, usize)>> {
    prop::collection::vec((prop_oneof![3 => 512..=MIB, 2 => MIB..8 * MIB], 1usize..60), 64..100)
}

/// A training loop: the same step `reps` times (every block freed by the step's end, as a
/// training step frees its activations), with one extra request in the third (which the plan
/// must survive), and perhaps `empty_cache` early on (which drops any plan), checked after
/// every request. Returns the device calls made before each step and at the end.
fn run_periodic(step: &[(u64, usize)], reps: usize, extra_at: usize, empty_at: Option<usize>) -> Vec<u64> {
    let sim = SimDevice::new(1 << 30);
    let a = Allocator::new(sim.clone(), AllocatorConfig::parse("policy:gpumem").unwrap()).unwrap();
    let mut live: Vec<Live> = Vec::new();
    let mut due: Vec<(usize, u64)> = Vec::new(); // (request index when freed, pointer)
    let mut n = 0;
    let mut calls_at_rep = Vec::new();
    let requests: Vec<(u64, usize)> = step
        .iter()
        .enumerate()
        .flat_map(|(i, &r)| std::iter::once(r).chain((i == extra_at).then_some((3 * MIB + 512, 2))))
        .collect();
    for rep in 0..reps {
        let c = sim.counters();
        calls_at_rep.push(c.maps + c.unmaps);
        let reqs: &[(u64, usize)] = if rep == 2 { &requests } else { step };
        for (i, &(size, life)) in reqs.iter().enumerate() {
            let life = life.min(reqs.len() - i);
            if empty_at == Some(n) {
                a.empty_cache().unwrap();
            }
            let p = a.malloc(size, StreamId(0)).unwrap();
            sim.write_tag(p, n as u64).unwrap();
            sim.write_tag(p + size - 1, n as u64).unwrap();
            live.push((p, size, n as u64));
            due.push((n + life, p));
            n += 1;
            while let Some(i) = due.iter().position(|&(when, _)| when <= n) {
                let (_, p) = due.swap_remove(i);
                live.retain(|l| l.0 != p);
                a.free(p).unwrap();
            }
            check(&a, &sim, &live);
        }
    }
    let c = sim.counters();
    calls_at_rep.push(c.maps + c.unmaps);
    for (p, _, _) in live.drain(..) {
        a.free(p).unwrap();
    }
    a.empty_cache().unwrap();
    check(&a, &sim, &live);
    assert_eq!(sim.used(), 0);
    calls_at_rep
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn gpumem_periodic_plan(step in periodic_step(), extra in 0usize..100, empty in prop::option::of(0usize..150)) {
        run_periodic(&step, 9, extra, empty);
    }
}

/// A training step: forward activations that backward frees in reverse, a few temporaries,
/// and gradients freed at the end. Repeated, the policy settles (by best fit here, which
/// settles before a plan is made) and the last steps make no device call.
#[test]
fn a_training_loop_stops_making_device_calls() {
    let mut x = 99u64;
    let mut rand = move |n: u64| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    let mut step: Vec<(u64, usize)> = Vec::new();
    let layers = 40;
    for l in 0..layers {
        step.push((rand(16 * MIB) + 512, 3 * (layers - l) + 1)); // an activation, freed in backward
        step.push((rand(4 * MIB) + 512, 1 + rand(3) as usize)); // temporaries
        step.push((rand(MIB) + 512, 1));
    }
    for l in 0..layers {
        step.push((rand(2 * MIB) + 512, 2 * (layers - l))); // a gradient
        step.push((rand(8 * MIB) + 512, 1)); // a temporary
    }
    let calls = run_periodic(&step, 8, usize::MAX, None);
    let n = calls.len() - 1;
    assert!(calls[n - 4] > 0);
    assert_eq!(calls[n] - calls[n - 2], 0, "the last two steps made device calls: {calls:?}");
}
