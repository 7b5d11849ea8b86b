//! The `gpumem` command's contract: output, JSON fields and exit codes.

use std::process::{Command, Output};

fn gpumem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpumem")).args(args).env_remove("GPUMEM_ALLOC_CONF").output().unwrap()
}

fn data(name: &str) -> String {
    format!("{}/../../testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn replay_json_has_the_contract_fields() {
    let o = gpumem(&["replay", &data("resnet50_train.jsonl.gz"), "--policy", "torch", "--json", "--verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1);
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    for key in [
        "trace",
        "policy",
        "device",
        "ops",
        "peak_requested",
        "peak_allocated",
        "peak_reserved",
        "reserved_ratio",
        "device_allocs",
        "device_frees",
        "device_maps",
        "device_unmaps",
        "ooms",
        "alloc_retries",
        "seconds",
        "ns_per_op",
        "steady_ns_per_op",
        "segments_expected",
        "segments_matched",
        "allocs_expected",
        "allocs_matched",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["trace"], "resnet50_train.jsonl.gz");
    assert_eq!(v["device"], "sim");
    assert_eq!(v["peak_reserved"], 7031750656u64);
    assert_eq!(v["segments_matched"], 111);
    assert_eq!(v["allocs_matched"], 3228);
}

#[test]
fn replay_without_a_policy_compares_every_policy() {
    let o = gpumem(&["replay", &data("vit_train_amp.jsonl.gz"), "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let policies: Vec<String> = stdout(&o)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["policy"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(policies, ["torch", "torch-expandable", "gpumem"]);
    let table = gpumem(&["replay", &data("vit_train_amp.jsonl.gz")]);
    let text = stdout(&table);
    assert!(text.contains("peak reserved") && text.contains("torch-expandable"), "{text}");
}

#[test]
fn replay_checks_contents_on_request() {
    let o =
        gpumem(&["replay", &data("unet_seg_train.jsonl.gz"), "-p", "gpumem", "--check-contents", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(r["contents_checked"], 1202);
    assert_eq!(r["contents_corrupted"], 0);
    // without the flag, the fields are left out
    let plain = gpumem(&["replay", &data("unet_seg_train.jsonl.gz"), "-p", "gpumem", "--json"]);
    assert!(!stdout(&plain).contains("contents_checked"));
    let table = gpumem(&["replay", &data("unet_seg_train.jsonl.gz"), "-p", "gpumem", "--check-contents"]);
    assert!(stdout(&table).contains("1202 blocks checked, 0 lost a stamp"), "{}", stdout(&table));
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let dir = std::env::temp_dir().join(format!("gpumem-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, [0x13u8, 0x37, 0x00, 0xff, 0x42]).unwrap();
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, b"").unwrap();
    let trace = data("resnet50_train.jsonl.gz");
    for args in [
        vec!["replay", junk.to_str().unwrap()],
        vec!["replay", empty.to_str().unwrap()],
        vec!["replay", "/no/such/file.jsonl"],
        vec!["replay", &trace, "--policy", "tensorflow"],
        vec!["replay", &trace, "--policy", "torch:max_split_size_mb:5"],
        vec!["replay", &trace, "--capacity", "lots"],
        vec!["summary", junk.to_str().unwrap()],
        vec!["replay"],
        vec!["frobnicate"],
    ] {
        let o = gpumem(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        if args.len() > 1 && args[0] == "replay" && args[1] != "--help" {
            assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{args:?}: {}", stderr(&o));
        }
    }
    let o = gpumem(&["replay", junk.to_str().unwrap()]);
    assert!(stderr(&o).contains("junk.bin"), "the error names the file: {}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn strict_replay_of_an_inconsistent_trace_exits_1() {
    let dir = std::env::temp_dir().join(format!("gpumem-strict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = dir.join("twice.jsonl");
    std::fs::write(
        &t,
        "{\"a\": \"alloc\", \"p\": 4096, \"s\": 10, \"t\": 0}\n{\"a\": \"free_requested\", \"p\": 77, \"s\": 10, \"t\": 0}\n",
    )
    .unwrap();
    let o = gpumem(&["replay", t.to_str().unwrap(), "--strict"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("line 2: free of an unknown address"), "{}", stderr(&o));
    let o = gpumem(&["replay", t.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("\"skipped\":1"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn summary_prints_pytorchs_table() {
    let o = gpumem(&["summary", &data("snapshot_sample.pickle"), "--at-end", "--policy", "torch"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let want = std::fs::read_to_string(data("summary_sample.txt")).unwrap();
    let out = stdout(&o);
    let table: String = out.lines().skip(1).map(|l| format!("{l}\n")).collect();
    assert_eq!(table.trim_end(), want.trim_end());
    let o = gpumem(&["summary", &data("resnet50_train.jsonl.gz")]);
    assert!(stdout(&o).contains("at its peak"), "{}", stdout(&o));
}

#[test]
fn demo_without_a_gpu_runs_on_the_simulated_device_and_says_so() {
    let o = gpumem(&["demo"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.to_lowercase().contains("simulated"), "{out}");
    assert!(out.contains("memory_reserved()"), "{out}");
    assert!(out.contains("back where it began"), "{out}");
    assert!(out.contains("policy gpumem"), "gpumem is the default: {out}");
    assert!(out.contains("memory_allocated() = 400.00 MB"), "{out}");
}

#[test]
fn without_a_gpu_info_and_cuda_exit_1_with_a_clear_line() {
    if gpumem::CudaDevice::new(0).is_ok() {
        return; // a GPU machine: scripts/gpu-test.sh covers these
    }
    let o = gpumem(&["info"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no NVIDIA driver"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1);
    let o = gpumem(&["demo", "--device", "cuda"]);
    assert_eq!(o.status.code(), Some(1));
    let o = gpumem(&["replay", &data("vit_train_amp.jsonl.gz"), "--device", "cuda"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn replay_writes_a_snapshot_pytorch_can_open() {
    let out = std::env::temp_dir().join(format!("gpumem-snap-{}.pickle", std::process::id()));
    let o = gpumem(&[
        "replay",
        &data("resnet50_train.jsonl.gz"),
        "-p",
        "gpumem",
        "--snapshot",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("memory_viz"));
    // it reads back as a snapshot (our reader checks every entry's fields)
    let back = gpumem_trace::read_trace(out.to_str().unwrap()).unwrap();
    assert!(back.events.len() > 5000);
    let o = gpumem(&["replay", &data("resnet50_train.jsonl.gz"), "--snapshot", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "several policies and --snapshot is a usage error");
    std::fs::remove_file(&out).ok();
}

fn gpumem_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_gpumem"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn one_line_exit(o: &Output, code: i32, what: &str) {
    assert_eq!(o.status.code(), Some(code), "{what}: {}", stderr(o));
    assert_eq!(stderr(o).trim_end().lines().count(), 1, "{what}: {}", stderr(o));
}

#[test]
fn impossible_sizes_and_counts_are_usage_errors() {
    let trace = data("resnet50_train.jsonl.gz");
    // once: a debug build panicked, a release build failed every allocation and exited 0
    let o = gpumem(&["replay", &trace, "--capacity", "9000000T", "-p", "gpumem"]);
    one_line_exit(&o, 2, "--capacity 9000000T");
    assert!(stderr(&o).contains("16 TiB"), "{}", stderr(&o));
    for n in ["0", "257", "100000000"] {
        let o = gpumem(&["bench", "--threads", n]);
        assert_eq!(o.status.code(), Some(2), "--threads {n}: {}", stderr(&o));
        assert!(stderr(&o).contains("1 to 256"), "{}", stderr(&o));
    }
    let o = gpumem(&["replay", &trace, "-p", "torch:max_split_size_mb:99999999999999999"]);
    one_line_exit(&o, 2, "max_split_size_mb beyond 1 EiB");
}

#[test]
fn bench_quick_gives_issue_20s_figures_for_the_policies_asked() {
    let o = gpumem(&["bench", "--device", "sim", "--quick", "-p", "torch", "--threads", "2", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let benches: Vec<String> = stdout(&o)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("one JSON object a line");
            assert_eq!(v["policy"], "torch", "{l}");
            v["bench"].as_str().unwrap().to_string()
        })
        .collect();
    for want in ["hit_pair_1MiB_busy", "threads_1", "threads_2", "threads_2_one_stream", "scaling_2_streams"]
    {
        assert!(benches.iter().any(|b| b == want), "{want} missing from {benches:?}");
    }
    assert!(!benches.iter().any(|b| b == "hit_pair_512B"), "--quick: {benches:?}");
    let o = gpumem(&["bench", "--device", "sim", "-p", "nonsense"]);
    one_line_exit(&o, 2, "an unknown policy");
}

#[test]
fn a_replay_that_runs_out_of_memory_exits_1_after_its_table() {
    let o = gpumem(&["replay", &data("resnet50_train.jsonl.gz"), "-p", "torch", "--capacity", "1GiB"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stdout(&o).contains("peak reserved"), "the table comes first: {}", stdout(&o));
    assert!(stderr(&o).contains("out of memory"), "{}", stderr(&o));
    let o =
        gpumem(&["replay", &data("resnet50_train.jsonl.gz"), "-p", "torch", "--capacity", "1GiB", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("\"ooms\":"), "{}", stdout(&o));
}

#[test]
fn device_auto_falls_back_to_the_simulated_device_and_says_so() {
    if gpumem::driver_present() {
        eprintln!("skipped: a driver is present");
        return;
    }
    let o =
        gpumem(&["replay", &data("lstm_varlen_train.jsonl.gz"), "-p", "torch", "--device", "auto", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("simulated device instead"), "{}", stderr(&o));
    assert!(stdout(&o).contains("\"device\":\"sim\""), "{}", stdout(&o));
}

#[test]
fn verify_where_it_cannot_apply_is_a_usage_error() {
    let trace = data("lstm_varlen_train.jsonl.gz");
    for (args, why) in [
        (vec!["replay", &trace, "--verify", "-p", "gpumem"], "torch policy only"),
        (vec!["replay", &trace, "--verify", "-p", "torch-expandable"], "torch policy only"),
        (vec!["replay", &trace, "--verify"], "torch policy only"),
        (vec!["replay", &trace, "--verify", "-p", "torch", "--device", "cuda"], "simulated device"),
    ] {
        let o = gpumem(&args);
        one_line_exit(&o, 2, &format!("{args:?}"));
        assert!(stderr(&o).contains(why), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn replay_and_summary_apply_gpumem_alloc_conf() {
    let trace = data("lstm_varlen_train.jsonl.gz");
    let env = [("GPUMEM_ALLOC_CONF", "max_split_size_mb:64")];
    // the options join the policy named on the command line
    let o = gpumem_env(&["replay", &trace, "-p", "torch", "--json"], &env);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("\"policy\":\"torch:max_split_size_mb:64"), "{}", stdout(&o));
    // without --policy, the policy they select
    let o = gpumem_env(&["replay", &trace, "--json"], &env);
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
    assert!(stdout(&o).contains("\"policy\":\"torch:"), "{}", stdout(&o));
    let o = gpumem_env(&["summary", &trace], &env);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("max_split_size_mb:64"), "{}", stdout(&o));
    // a bad value is a usage error that names the variable
    for args in [vec!["replay", &trace], vec!["summary", &trace], vec!["replay", &trace, "-p", "gpumem"]] {
        let o = gpumem_env(&args, &[("GPUMEM_ALLOC_CONF", "max_split_size_mb:lots")]);
        one_line_exit(&o, 2, &format!("{args:?}"));
        assert!(stderr(&o).contains("GPUMEM_ALLOC_CONF"), "{}", stderr(&o));
    }
    // options that do not apply to the named policy
    let o = gpumem_env(&["replay", &trace, "-p", "gpumem"], &env);
    one_line_exit(&o, 2, "torch-only option under -p gpumem");
    assert!(stderr(&o).contains("GPUMEM_ALLOC_CONF"), "{}", stderr(&o));
}

#[test]
fn endless_and_special_files_are_refused_at_once() {
    let dir = std::env::temp_dir().join(format!("gpumem-cli-special-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("t.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
    let mut paths = vec!["/dev/zero".to_string(), "/dev/urandom".to_string()];
    if made {
        paths.push(fifo.to_str().unwrap().to_string());
    }
    for p in &paths {
        let o = gpumem(&["replay", p]);
        one_line_exit(&o, 2, p);
        assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    }
    // an output path that would drive the terminal is escaped too
    let o = gpumem(&[
        "replay",
        &data("lstm_varlen_train.jsonl.gz"),
        "-p",
        "torch",
        "--snapshot",
        "/no/such/dir/\u{1b}[2J.pickle",
    ]);
    one_line_exit(&o, 2, "evil --snapshot path");
    assert!(!stderr(&o).contains('\u{1b}'), "{:?}", stderr(&o));
    // a file name that would drive the terminal is escaped
    let evil = dir.join("a\u{1b}[2Jb.jsonl");
    std::fs::write(&evil, b"garbage").unwrap();
    let o = gpumem(&["replay", evil.to_str().unwrap()]);
    one_line_exit(&o, 2, "evil name");
    assert!(!stderr(&o).contains('\u{1b}'), "{:?}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}
