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

/// Traces recorded after the `gpumem` policy's design (scripts/record_traces.py), to test it:
/// autoregressive decoding with a growing KV cache, a GAN, gradient accumulation over
/// micro-batches of random sizes; then, later still, a re-creation of the GAN (the code that
/// recorded the first was not kept), a mixture-of-experts transformer whose experts see a
/// different number of tokens at every step, serving with Hugging Face `generate()` at
/// random batch and prompt sizes, and sampling from a small diffusion model.
#[allow(dead_code)]
pub const LATER: [&str; 7] = [
    "llm_decode_kvcache.jsonl.gz",
    "gan_train.jsonl.gz",
    "resnet_gradaccum_varbatch.jsonl.gz",
    "gan_train_v2.jsonl.gz",
    "moe_train.jsonl.gz",
    "llm_serve_varlen.jsonl.gz",
    "diffusion_sampling.jsonl.gz",
];
