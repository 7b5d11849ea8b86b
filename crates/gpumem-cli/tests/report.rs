//! `gpumem report` without a browser: the page is one self-contained file, its data holds
//! the series and figures the page draws, and they reach the peaks `gpumem replay` prints.
//! (`tests/browser/` opens the same pages in Chromium.)

use serde_json::Value;
use std::process::{Command, Output};

fn gpumem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpumem")).args(args).env_remove("GPUMEM_ALLOC_CONF").output().unwrap()
}

fn data(name: &str) -> String {
    format!("{}/../../testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn out(name: &str) -> String {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("report");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name).to_string_lossy().into_owned()
}

/// The data inlined in the page.
fn page_data(html: &str) -> Value {
    let start = html.find(r#"<script id="gpumem-data" type="application/json">"#).expect("the data script");
    let rest = &html[start..];
    let body = &rest[rest.find('>').unwrap() + 1..rest.find("</script>").unwrap()];
    serde_json::from_str(body).expect("the data is JSON")
}

#[test]
fn the_page_is_self_contained_and_its_series_reach_replays_peaks() {
    let html_path = out("two.html");
    let traces = [data("vit_train_amp.jsonl.gz"), data("snapshot_sample.pickle")];
    let o = gpumem(&["report", &traces[0], &traces[1], "-o", &html_path]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&html_path).unwrap();
    // nothing from the network: no external script, style, image or font
    for needle in ["http://", "https://", "src=", "@import", "url("] {
        assert!(!html.contains(needle), "the page refers to {needle}");
    }
    let d = page_data(&html);
    let o = gpumem(&["replay", &traces[0], &traces[1], "--json"]);
    let replays: Vec<Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let traces = d["traces"].as_array().unwrap();
    assert_eq!(traces.len(), 2);
    for t in traces {
        let policies: Vec<&str> =
            t["policies"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
        assert_eq!(policies, ["torch", "torch-expandable", "gpumem"], "the three by default");
        let tl = &t["timeline"];
        let max = |s: &Value| s["max"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).max().unwrap();
        for (i, p) in policies.iter().enumerate() {
            let r = replays.iter().find(|r| r["trace"] == t["name"] && r["policy"] == *p).unwrap();
            assert_eq!(max(&tl["reserved"][i]), r["peak_reserved"].as_u64().unwrap(), "{} / {p}", t["name"]);
            assert_eq!(max(&tl["live"]), r["peak_requested"].as_u64().unwrap());
            assert_eq!(t["reports"][i]["peak_reserved"], r["peak_reserved"]);
            // the map at the peak holds what the policy reserved there
            let peak = &t["peaks"][i];
            let seg_sum: u64 =
                peak["segments"].as_array().unwrap().iter().map(|s| s["size"].as_u64().unwrap()).sum();
            assert_eq!(seg_sum, peak["reserved"].as_u64().unwrap());
            assert!(peak["summary"].as_str().unwrap().contains("Allocated memory"));
        }
        assert!(tl["first_op"].as_array().unwrap().len() <= 2000);
    }
    // the snapshot's sites are its Python lines
    let snap = &traces[1];
    assert_eq!(snap["sites"]["by"], "site");
    let frames = snap["frames"].as_array().unwrap();
    assert!(frames.iter().flat_map(|f| f.as_array().unwrap()).any(|f| f[0] == "bench/snapshot_sample.py"));
    // a trace without stacks groups by size
    assert_eq!(traces[0]["sites"]["by"], "size");
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let good = data("resnet50_train.jsonl.gz");
    for (args, what) in [
        (vec!["report", "/nonexistent.jsonl", "-o", &out("x.html")], "cannot read"),
        (vec!["report", &good, "-p", "nosuch", "-o", &out("x.html")], "nosuch"),
        (vec!["report", &good, "-o", "/nonexistent-dir/x.html"], "cannot create"),
    ] {
        let o = gpumem(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(what) && err.lines().count() == 1, "{args:?}: {err}");
    }
}
