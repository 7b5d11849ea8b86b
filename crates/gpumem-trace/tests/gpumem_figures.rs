//! The `gpumem` policy's memory on every bundled real trace, on the simulated device (exact
//! and repeatable, so a change that costs memory shows here). Time is measured by `gpumem
//! replay --device cuda` and scripts/gpu-bench.sh, never asserted.

mod common;

use common::{data, LATER, RECORDED, SHARED};
use gpumem::{Policy, SimDevice};
use gpumem_trace::{read_trace, replay, ReplayOptions};

fn ratio(trace: &gpumem_trace::Trace, policy: &str) -> f64 {
    let policy = Policy::parse(policy).unwrap();
    replay(trace, &policy, SimDevice::default(), &ReplayOptions::default(), &mut |_, _| {})
        .unwrap()
        .reserved_ratio
}

/// Peak reserved within 2% of peak live bytes on every trace, and below every PyTorch setting,
/// including the workloads recorded after the policy's design (`LATER`: the chunk cap of Note
/// [Chunk shapes], the staged copies of Note [The copy's memory], Note [Blocks of whole pages],
/// Note [Chunks under the request], Note [Buffers grown by copying] and Note [What a plan
/// leaves outside its region] came of them). One known exception, bounded so that it cannot
/// grow unseen (docs/policy.md, "Where it falls short"): on the mixture-of-experts trace
/// `expandable_segments` reserves 1.0051x and gpumem 1.0089x (holes of under 2 MB between live
/// blocks, in pages those blocks hold).
#[test]
fn gpumem_reserves_within_two_percent_of_live_bytes() {
    for name in SHARED.iter().chain(&RECORDED).chain(&LATER) {
        let trace = read_trace(&data(name)).unwrap();
        let ours = ratio(&trace, "gpumem");
        assert!(ours <= 1.02, "{name}: reserved_ratio {ours:.4}");
        for torch in ["torch", "torch-expandable"] {
            let theirs = ratio(&trace, torch);
            let slack =
                if *name == "moe_train.jsonl.gz" && torch == "torch-expandable" { 0.005 } else { 0.0 };
            assert!(ours <= theirs + slack, "{name}: gpumem {ours:.4} > {torch} {theirs:.4}");
        }
    }
}

/// A real training loop (GPT-2, 24 steps): once its period has repeated, the periodic plan
/// places every step's blocks where the last step's went, and the second half of the replay
/// makes no device call; without the plan, best fit at the peak keeps recycling and
/// compacting at every step (Note [Periodic plans]).
#[test]
fn the_periodic_plan_stops_device_calls_in_a_training_loop() {
    let trace = read_trace(&data("gpt2_train_bf16_24steps.jsonl.gz")).unwrap();
    let run = |policy: &str| {
        let policy = Policy::parse(policy).unwrap();
        replay(&trace, &policy, SimDevice::default(), &ReplayOptions::default(), &mut |_, _| {}).unwrap()
    };
    let planned = run("gpumem");
    let unplanned = run("gpumem:periodic_plan:False");
    assert_eq!(planned.steady_device_calls, 0);
    assert!(unplanned.steady_device_calls > 500, "{}", unplanned.steady_device_calls);
    assert!(planned.reserved_ratio <= unplanned.reserved_ratio);
}

/// Every block of every trace keeps its contents until it is freed, under every policy
/// (`--check-contents`: stamps written at allocation, checked at the free, on the simulated
/// device's contents, which unmapping loses and compaction keeps only where it copies):
/// recycling, compaction and periodic plans move pages under live blocks.
#[test]
fn every_block_keeps_its_contents_under_every_policy() {
    let opts = ReplayOptions { check_contents: true, ..Default::default() };
    for name in SHARED.iter().chain(&RECORDED).chain(&LATER) {
        let trace = read_trace(&data(name)).unwrap();
        for policy in
            ["gpumem", "gpumem:compaction:False", "gpumem:periodic_plan:False", "torch", "torch-expandable"]
        {
            let p = Policy::parse(policy).unwrap();
            let r = replay(&trace, &p, SimDevice::default(), &opts, &mut |_, _| {}).unwrap();
            let checked = r.contents_checked.unwrap();
            assert!(checked > 400, "{name} / {policy}: only {checked} blocks checked");
            assert_eq!(r.contents_corrupted, Some(0), "{name} / {policy}: blocks lost their contents");
        }
    }
}
