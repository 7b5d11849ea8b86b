//! `gpumem replay --check-streams`: the stream-ordering fields, the table's columns, and the
//! exit code that a violation sets.

use std::process::{Command, Output};

fn gpumem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpumem")).args(args).env_remove("GPUMEM_ALLOC_CONF").output().unwrap()
}

fn data(name: &str) -> String {
    format!("{}/../../testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn check_streams_reports_cross_stream_reuse_and_exits_1_only_on_a_violation() {
    let trace = data("woven/resnet50_train_24steps_side_moved.jsonl.gz");
    let args = ["replay", &trace, "--check-streams", "-p", "torch", "-p", "gpumem", "--json"];
    let o = gpumem(&args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let reports = lines(&o);
    assert_eq!(reports.len(), 2, "every result is printed, violation or not: {stderr}");
    for r in &reports {
        for key in ["cross_stream_reuses", "stream_violations", "stream_violation_count"] {
            assert!(r[key].is_u64(), "{key} missing in {r}");
        }
        // the trace's side stream takes memory freed on the main stream and back
        assert!(r["cross_stream_reuses"].as_u64().unwrap() > 0, "{r}");
    }
    // PyTorch's algorithm keeps freed memory on its stream until a segment is freed
    assert_eq!(reports[0]["stream_violations"], 0);
    let bad: Vec<&serde_json::Value> =
        reports.iter().filter(|r| r["stream_violations"].as_u64() != Some(0)).collect();
    if bad.is_empty() {
        assert_eq!(o.status.code(), Some(0), "{stderr}");
        assert!(stderr.is_empty(), "{stderr}");
    } else {
        // one line naming the trace, the policy and the first violation
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        let policy = bad[0]["policy"].as_str().unwrap();
        assert!(stderr.contains("resnet50_train_24steps_side_moved") && stderr.contains(policy), "{stderr}");
        assert!(stderr.contains(bad[0]["first_stream_violation"].as_str().unwrap()), "{stderr}");
    }
}

#[test]
fn without_the_flag_the_fields_are_left_out_and_the_table_gains_columns_with_it() {
    let trace = data("offload_side_stream.jsonl.gz");
    let plain = gpumem(&["replay", &trace, "-p", "torch", "--json"]);
    assert_eq!(plain.status.code(), Some(0));
    assert!(lines(&plain)[0].get("stream_violations").is_none());
    let o = gpumem(&["replay", &trace, "-p", "torch", "-p", "torch-expandable", "--check-streams"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("x-stream reuse") && table.contains("violations"), "{table}");
    let o = gpumem(&["replay", &trace, "-p", "torch", "--check-streams", "--snapshot", "/tmp/x.pickle"]);
    assert_eq!(o.status.code(), Some(2), "--check-streams with --snapshot is a usage error");
}
