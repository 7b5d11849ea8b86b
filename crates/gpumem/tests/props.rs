//! Property tests: random sequences of alloc, free, record_stream, event completion and
//! empty_cache over several streams, in every policy, checked after every step.

use gpumem::{AllocError, Allocator, AllocatorConfig, BlockState, SimDevice, StreamId};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Step {
    Alloc { size: u64, stream: u8 },
    Free { pick: usize },
    RecordStream { pick: usize, stream: u8 },
    Complete { stream: u8 },
    EmptyCache,
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

fn run(config: &str, steps: &[Step]) {
    let sim = SimDevice::new(1 << 30);
    let a = Allocator::new(sim.clone(), AllocatorConfig::parse(config).unwrap()).unwrap();
    let mut live: Vec<Live> = Vec::new();
    for (tag, s) in steps.iter().enumerate() {
        match *s {
            Step::Alloc { size, stream } => match a.malloc(size, StreamId(stream as u64)) {
                Ok(p) => {
                    sim.write_tag(p, tag as u64).unwrap();
                    sim.write_tag(p + size - 1, tag as u64).unwrap();
                    live.push((p, size, tag as u64));
                }
                Err(AllocError::OutOfMemory(_)) => {}
                Err(e) => panic!("unexpected error {e}"),
            },
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

// 6 configurations × 2,000 cases = 12,000 random sequences.
const CASES: u32 = 2000;

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
    fn gpumem_split_idle_no_compaction(steps in prop::collection::vec(step(), 1..60)) {
        run("policy:gpumem,compact_factor:2,compaction:False", &steps);
    }

    #[test]
    fn torch_with_gc(steps in prop::collection::vec(step(), 1..60)) {
        run("garbage_collection_threshold:0.6,per_process_memory_fraction:0.8", &steps);
    }
}
