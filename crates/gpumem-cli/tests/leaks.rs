//! `gpumem leaks`: live blocks by site, from a snapshot's Python frames, and the same live
//! blocks that `gpumem replay` counts at the end.

use std::process::{Command, Output};

fn gpumem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpumem")).args(args).env_remove("GPUMEM_ALLOC_CONF").output().unwrap()
}

fn data(name: &str) -> String {
    format!("{}/../../testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn json(o: &Output) -> serde_json::Value {
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn a_snapshot_lists_its_live_blocks_with_their_python_frames() {
    let v = json(&gpumem(&["leaks", &data("snapshot_sample.pickle"), "--json"]));
    assert_eq!(v["has_frames"], true);
    assert_eq!(v["count"], 15);
    let sites = v["sites"].as_array().unwrap();
    let total: u64 = sites.iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 15);
    let bytes: Vec<u64> = sites.iter().map(|s| s["bytes"].as_u64().unwrap()).collect();
    assert!(bytes.windows(2).all(|w| w[0] >= w[1]), "largest first: {bytes:?}");
    // the model's parameters, moved to the GPU at line 4 of the script
    let cuda = sites
        .iter()
        .find(|s| {
            s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["filename"] == "bench/snapshot_sample.py" && f["line"] == 4)
        })
        .expect("a site from bench/snapshot_sample.py:4");
    assert_eq!(cuda["count"], 4);
    assert!(cuda["frames"][0]["filename"].as_str().unwrap().ends_with("torch/nn/modules/module.py"));
    // the text names the Python lines too
    let o = gpumem(&["leaks", &data("snapshot_sample.pickle")]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("15 blocks (161.06 MiB) still live, from 5 sites:"), "{text}");
    assert!(text.contains("bench/snapshot_sample.py:4 in <module>"), "{text}");
}

#[test]
fn live_blocks_match_what_replay_counts_at_the_end() {
    for name in [
        "resnet50_train.jsonl.gz",
        "gpt2_train_bf16.jsonl.gz",
        "bert_varlen_train.jsonl.gz",
        "vit_train_amp.jsonl.gz",
        "offload_side_stream.jsonl.gz",
        "snapshot_sample.pickle",
    ] {
        let leaks = json(&gpumem(&["leaks", &data(name), "--json"]));
        let replay = json(&gpumem(&["replay", &data(name), "-p", "torch", "--json"]));
        assert_eq!(leaks["count"], replay["live_at_end"], "{name}");
        assert_eq!(leaks["bytes"], replay["live_bytes_at_end"], "{name}");
        assert!(leaks["count"].as_u64().unwrap() > 0, "{name}");
    }
}

#[test]
fn a_point_in_the_trace_by_event_or_time() {
    let v = json(&gpumem(&["leaks", &data("resnet50_train.jsonl.gz"), "--at", "1", "--json"]));
    // event 0 is a segment_alloc, event 1 the first alloc (37632 bytes)
    assert_eq!(
        (v["count"].as_u64(), v["bytes"].as_u64(), v["at_event"].as_u64()),
        (Some(1), Some(37632), Some(1))
    );
    let v = json(&gpumem(&["leaks", &data("resnet50_train.jsonl.gz"), "--time", "0", "--json"]));
    assert_eq!(v["at_event"], 0);
    assert_eq!(v["count"], 0);
    let o = gpumem(&["leaks", &data("resnet50_train.jsonl.gz"), "--at", "99999999"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("past the trace's last event") && err.lines().count() == 1, "{err}");
    let o = gpumem(&["leaks", "/nonexistent.jsonl"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn a_replays_own_snapshot_has_the_same_live_blocks() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("leaks");
    std::fs::create_dir_all(&dir).unwrap();
    for policy in ["torch", "gpumem"] {
        let out = dir.join(format!("offload-{policy}.pickle")).to_string_lossy().into_owned();
        let trace = data("offload_side_stream.jsonl.gz");
        let replay = json(&gpumem(&["replay", &trace, "-p", policy, "--snapshot", &out, "--json"]));
        let leaks = json(&gpumem(&["leaks", &out, "--json"]));
        assert_eq!(
            (&leaks["count"], &leaks["bytes"]),
            (&replay["live_at_end"], &replay["live_bytes_at_end"]),
            "{policy}"
        );
    }
}
