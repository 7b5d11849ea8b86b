//! What the integration tests share: where the bundled traces are, and which they are.

/// The path of a file in `testdata/`.
pub fn data(name: &str) -> String {
    format!("{}/../../testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The five traces of `shared/traces`.
#[allow(dead_code)] // not every test file uses both lists
pub const SHARED: [&str; 5] = [
    "bert_varlen_train.jsonl.gz",
    "gpt2_train_bf16.jsonl.gz",
    "offload_side_stream.jsonl.gz",
    "resnet50_train.jsonl.gz",
    "vit_train_amp.jsonl.gz",
];

/// Traces recorded on the H100 for this project (scripts/record_traces.py and
/// scripts/record_long.py): workloads, and run lengths, the policies were not written
/// against.
#[allow(dead_code)]
pub const RECORDED: [&str; 8] = [
    "mlp_varbatch_infer.jsonl.gz",
    "transformer_lm_fp16.jsonl.gz",
    "unet_seg_train.jsonl.gz",
    "lstm_varlen_train.jsonl.gz",
    "multiscale_cnn_train.jsonl.gz",
    "gpt2_train_bf16_24steps.jsonl.gz",
    "resnet50_train_24steps.jsonl.gz",
    "vit_train_amp_24steps.jsonl.gz",
];

/// Traces recorded after the `gpumem` policy's design (scripts/record_traces.py):
/// autoregressive decoding with a growing KV cache, a GAN, and gradient accumulation over
/// micro-batches of random sizes. The `gpumem` policy's memory goal (1.02×) is not met on the
/// first (docs/policy.md, "Where it falls short").
#[allow(dead_code)]
pub const LATER: [&str; 3] =
    ["llm_decode_kvcache.jsonl.gz", "gan_train.jsonl.gz", "resnet_gradaccum_varbatch.jsonl.gz"];
