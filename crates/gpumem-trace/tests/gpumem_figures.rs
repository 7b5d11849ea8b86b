//! The `gpumem` policy's memory on every bundled real trace, on the simulated device (exact
//! and repeatable, so a change that costs memory shows here). Time is measured by `gpumem
//! replay --device cuda` and scripts/gpu-bench.sh, never asserted.

use gpumem::{Policy, SimDevice};
use gpumem_trace::{read_trace, replay, ReplayOptions};

fn data(name: &str) -> String {
    format!("{}/../../testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

const TRACES: [&str; 13] = [
    "bert_varlen_train.jsonl.gz",
    "gpt2_train_bf16.jsonl.gz",
    "offload_side_stream.jsonl.gz",
    "resnet50_train.jsonl.gz",
    "vit_train_amp.jsonl.gz",
    "mlp_varbatch_infer.jsonl.gz",
    "transformer_lm_fp16.jsonl.gz",
    "unet_seg_train.jsonl.gz",
    "lstm_varlen_train.jsonl.gz",
    "multiscale_cnn_train.jsonl.gz",
    "gpt2_train_bf16_24steps.jsonl.gz",
    "resnet50_train_24steps.jsonl.gz",
    "vit_train_amp_24steps.jsonl.gz",
];

fn ratio(trace: &gpumem_trace::Trace, policy: &str) -> f64 {
    let policy = Policy::parse(policy).unwrap();
    replay(trace, &policy, SimDevice::default(), &ReplayOptions::default(), &mut |_, _| {})
        .unwrap()
        .reserved_ratio
}

/// Peak reserved within 2% of peak live bytes on every trace, and below every PyTorch setting.
#[test]
fn gpumem_reserves_within_two_percent_of_live_bytes() {
    for name in TRACES {
        let trace = read_trace(&data(name)).unwrap();
        let ours = ratio(&trace, "gpumem");
        assert!(ours <= 1.02, "{name}: reserved_ratio {ours:.4}");
        for torch in ["torch", "torch-expandable"] {
            let theirs = ratio(&trace, torch);
            assert!(ours <= theirs, "{name}: gpumem {ours:.4} > {torch} {theirs:.4}");
        }
    }
}
