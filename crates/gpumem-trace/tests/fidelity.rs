//! The `torch` policy is PyTorch's algorithm: replaying real PyTorch traces reproduces every
//! decision PyTorch made, and PyTorch's own figures.

mod common;

use common::{data, LATER, RECORDED};
use gpumem::{Policy, SimDevice};
use gpumem_trace::{read_trace, replay, replay_into, stats_differences, ReplayOptions};

struct Figures {
    trace: &'static str,
    ops: u64,
    peak_live: u64,
    peak_allocated: u64,
    peak_reserved: u64,
    device_allocs: u64,
    expandable_reserved: u64,
}

/// PyTorch 2.11 on an H100 (shared/traces/README.md).
const PYTORCH: [Figures; 5] = [
    Figures {
        trace: "bert_varlen_train.jsonl.gz",
        ops: 25345,
        peak_live: 7735776464,
        peak_allocated: 7748356608,
        peak_reserved: 9076473856,
        device_allocs: 151,
        expandable_reserved: 8338276352,
    },
    Figures {
        trace: "gpt2_train_bf16.jsonl.gz",
        ops: 11763,
        peak_live: 13594206920,
        peak_allocated: 13622938112,
        peak_reserved: 15286140928,
        device_allocs: 154,
        expandable_reserved: 15130951680,
    },
    Figures {
        trace: "resnet50_train.jsonl.gz",
        ops: 5811,
        peak_live: 5879357848,
        peak_allocated: 5910140416,
        peak_reserved: 7031750656,
        device_allocs: 111,
        expandable_reserved: 5972688896,
    },
    Figures {
        trace: "vit_train_amp.jsonl.gz",
        ops: 8891,
        peak_live: 3790148880,
        peak_allocated: 3808690688,
        peak_reserved: 4246732800,
        device_allocs: 154,
        expandable_reserved: 3934257152,
    },
    Figures {
        trace: "offload_side_stream.jsonl.gz",
        ops: 8511,
        peak_live: 9175450088,
        peak_allocated: 9179325952,
        peak_reserved: 15831400448,
        device_allocs: 141,
        expandable_reserved: 9363783680,
    },
];

fn verify() -> ReplayOptions {
    ReplayOptions { verify: true, ..Default::default() }
}

#[test]
fn torch_policy_reproduces_pytorch_exactly() {
    let torch = Policy::parse("torch").unwrap();
    for f in &PYTORCH {
        let trace = read_trace(&data(f.trace)).unwrap();
        let (r, alloc) =
            replay_into(&trace, &torch, SimDevice::default(), &verify(), &mut |_, _| {}).unwrap();
        assert_eq!(r.ops, f.ops, "{}: ops", f.trace);
        assert_eq!(r.peak_requested, f.peak_live, "{}: peak live", f.trace);
        assert_eq!(r.peak_allocated, f.peak_allocated, "{}: peak allocated", f.trace);
        assert_eq!(r.peak_reserved, f.peak_reserved, "{}: peak reserved", f.trace);
        assert_eq!(r.device_allocs, f.device_allocs, "{}: device allocs", f.trace);
        assert_eq!(r.segments_expected, Some(f.device_allocs), "{}", f.trace);
        assert_eq!(r.segments_matched, r.segments_expected, "{}: every segment_alloc", f.trace);
        assert_eq!(r.allocs_matched, r.allocs_expected, "{}: every address", f.trace);
        assert_eq!(r.skipped, 0, "{}", f.trace);
        // and all 122 counters of the recorded run's own memory_stats()
        let diffs = stats_differences(&trace, &alloc.memory_stats());
        assert!(diffs.is_empty(), "{}: stats differ: {diffs:?}", f.trace);
        assert_eq!(r.stats_matched, Some(122));
    }
}

/// Traces of other workloads, recorded on the H100 for this project: the torch policy must
/// reproduce them too, decision by decision and counter by counter.
#[test]
fn torch_policy_reproduces_traces_it_was_not_written_against() {
    let torch = Policy::parse("torch").unwrap();
    for name in RECORDED.iter().chain(&LATER) {
        let trace = read_trace(&data(name)).unwrap();
        let (r, alloc) =
            replay_into(&trace, &torch, SimDevice::default(), &verify(), &mut |_, _| {}).unwrap();
        assert_eq!(r.segments_matched, r.segments_expected, "{name}");
        assert_eq!(r.allocs_matched, r.allocs_expected, "{name}");
        let diffs = stats_differences(&trace, &alloc.memory_stats());
        assert!(diffs.is_empty(), "{name}: stats differ: {diffs:?}");
    }
}

#[test]
fn torch_expandable_is_within_one_percent_of_pytorch() {
    let policy = Policy::parse("torch-expandable").unwrap();
    for f in &PYTORCH {
        let trace = read_trace(&data(f.trace)).unwrap();
        let r =
            replay(&trace, &policy, SimDevice::default(), &ReplayOptions::default(), &mut |_, _| {}).unwrap();
        let ratio = r.peak_reserved as f64 / f.expandable_reserved as f64;
        assert!(
            (ratio - 1.0).abs() <= 0.01,
            "{}: {} vs PyTorch's {}",
            f.trace,
            r.peak_reserved,
            f.expandable_reserved
        );
    }
}

#[test]
fn snapshot_replay_ends_with_pytorchs_own_summary() {
    let trace = read_trace(&data("snapshot_sample.pickle")).unwrap();
    let torch = Policy::parse("torch").unwrap();
    let (r, alloc) = replay_into(&trace, &torch, SimDevice::default(), &verify(), &mut |_, _| {}).unwrap();
    assert_eq!(r.segments_matched, Some(16));
    assert_eq!(r.allocs_matched, Some(76));
    assert_eq!(r.empty_cache_calls, 1, "the run ended with empty_cache()");
    let want = std::fs::read_to_string(data("summary_sample.txt")).unwrap();
    let got = alloc.memory_summary(false);
    // print() added one newline after the table
    assert_eq!(got, want.trim_end_matches('\n').to_string() + "\n");
}

#[test]
fn stream_waits_are_modelled() {
    // offload_side_stream frees blocks that a side stream still reads: replayed immediately,
    // they would be reused too early and PyTorch's addresses would not match
    let trace = read_trace(&data("offload_side_stream.jsonl.gz")).unwrap();
    let schedule = gpumem_trace::schedule(&trace);
    let deferred = schedule.ops.iter().filter(|o| matches!(o, gpumem_trace::Op::FreeDeferred { .. })).count();
    let completed = schedule.ops.iter().filter(|o| matches!(o, gpumem_trace::Op::Complete { .. })).count();
    assert_eq!((deferred, completed), (31, 19));
    // the 12 frees the trace never completed stay pending, as in the recorded run
    assert_eq!(deferred - completed, 4152 - 4140);
}

#[test]
fn a_replayed_snapshot_dumps_as_pytorchs_own() {
    #[derive(serde::Deserialize, PartialEq, Debug)]
    struct Block {
        address: u64,
        size: u64,
        state: String,
    }
    #[derive(serde::Deserialize, PartialEq, Debug)]
    struct Segment {
        address: u64,
        total_size: u64,
        allocated_size: u64,
        segment_type: String,
        blocks: Vec<Block>,
    }
    #[derive(serde::Deserialize)]
    struct Snap {
        segments: Vec<Segment>,
    }
    let path = data("snapshot_sample.pickle");
    let trace = read_trace(&path).unwrap();
    let torch = Policy::parse("torch").unwrap();
    let opts = ReplayOptions { verify: true, record_history: true, ..Default::default() };
    let (_, alloc) = replay_into(&trace, &torch, SimDevice::default(), &opts, &mut |_, _| {}).unwrap();
    let mut out = Vec::new();
    gpumem_trace::write_snapshot(&alloc.snapshot(), &alloc.history(), 0, "", &mut out).unwrap();
    // the history is PyTorch's trace, event for event
    let ours = gpumem_trace::read_trace_bytes("ours.pickle", &out).unwrap();
    let key = |t: &gpumem_trace::Trace| {
        t.events.iter().map(|e| (e.action, e.addr, e.size, e.stream)).collect::<Vec<_>>()
    };
    assert_eq!(key(&ours), key(&trace));
    // and the segments and blocks are PyTorch's snapshot's
    let opts = || serde_pickle::DeOptions::new().replace_recursive_structures();
    let mine: Snap = serde_pickle::from_slice(&out, opts()).unwrap();
    let theirs: Snap = serde_pickle::from_slice(&std::fs::read(&path).unwrap(), opts()).unwrap();
    assert_eq!(mine.segments, theirs.segments);
}
