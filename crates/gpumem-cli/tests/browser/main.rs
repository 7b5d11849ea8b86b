//! `gpumem report` in a real browser: headless Chromium opens the report of the five shared
//! traces (and the snapshot sample, which has Python frames) under the three policies and
//! checks that the page raises no console error, that each memory chart has one series per
//! policy plus the live bytes, ending at (or reaching) the peaks `gpumem replay` prints, and
//! that hovering a block shows its size, address, stream and frames; it takes screenshots.
//!
//! Without Chromium (Debian's `chromium` package; `GPUMEM_CHROMIUM` names another) each
//! test says it is skipped, by name, and passes. With `GPUMEM_UPDATE_SCREENSHOT=1` the
//! screenshot of the first trace is written to `docs/report.png`.

mod cdp;

use cdp::{find_chromium, Browser};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

const TRACES: [&str; 5] = [
    "resnet50_train.jsonl.gz",
    "gpt2_train_bf16.jsonl.gz",
    "bert_varlen_train.jsonl.gz",
    "vit_train_amp.jsonl.gz",
    "offload_side_stream.jsonl.gz",
];
const POLICIES: [&str; 3] = ["torch", "torch-expandable", "gpumem"];

fn data(name: &str) -> String {
    format!("{}/../../testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn out_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gpumem(args: &[String]) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_gpumem"))
        .args(args)
        .env_remove("GPUMEM_ALLOC_CONF")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "gpumem {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// The chromium to use, or `None` after saying the test is skipped.
fn chromium(test: &str) -> Option<String> {
    let c = find_chromium();
    if c.is_none() {
        // straight to stderr, which the test harness does not capture, so that the skip shows
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: no chromium here (apt-get install -y chromium, or set GPUMEM_CHROMIUM)"
        );
    }
    c
}

/// `gpumem replay --json` for these traces: (trace, policy) -> its figures.
fn replay_figures(paths: &[String]) -> HashMap<(String, String), Value> {
    let mut args = vec!["replay".to_string(), "--json".to_string()];
    args.extend(paths.iter().cloned());
    for p in POLICIES {
        args.extend(["-p".to_string(), p.to_string()]);
    }
    let o = gpumem(&args);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            ((v["trace"].as_str().unwrap().to_string(), v["policy"].as_str().unwrap().to_string()), v)
        })
        .collect()
}

fn report(paths: &[String], out: &std::path::Path) {
    let mut args = vec!["report".to_string()];
    args.extend(paths.iter().cloned());
    for p in POLICIES {
        args.extend(["-p".to_string(), p.to_string()]);
    }
    args.extend(["-o".to_string(), out.to_string_lossy().into_owned()]);
    gpumem(&args);
}

/// Hovers the largest block of `state` (0 allocated, 2 reserved but unallocated) in the map
/// of (trace, policy), and returns the tooltip's text and the block; `None` where the map
/// has no such block.
fn hover_block(b: &mut Browser, trace: &str, pi: usize, state: u32) -> Option<(String, Value)> {
    let find = format!(
        "window.gpumemReport.maps.find(m => m.trace === {trace:?} && m.policy === {:?})",
        POLICIES[pi]
    );
    b.eval(&format!(
        "window.gpumemReport.showMap[{trace:?}]({pi}); {find}.canvas.scrollIntoView({{block: 'center'}}); true"
    ));
    let point = b.eval(&format!("{find}.pointOf({state})"));
    if point.is_null() {
        return None;
    }
    b.hover(point["x"].as_f64().unwrap(), point["y"].as_f64().unwrap());
    let tip = b.eval("document.getElementById('tip').style.display === 'block' ? document.getElementById('tip').textContent : ''");
    Some((tip.as_str().unwrap().to_string(), point))
}

#[test]
fn the_report_of_the_shared_traces_renders_in_chromium() {
    let Some(exe) = chromium("the_report_of_the_shared_traces_renders_in_chromium") else { return };
    let mut paths: Vec<String> = TRACES.iter().map(|t| data(t)).collect();
    paths.push(data("snapshot_sample.pickle"));
    let html = out_dir().join("report.html");
    report(&paths, &html);
    let figures = replay_figures(&paths);

    let mut b = Browser::start(&exe, 1400, 1000);
    let took =
        b.open(&format!("file://{}", html.display()), "document.body && document.body.dataset.ready === '1'");
    println!("the report of {} traces rendered in {took:?}", paths.len());
    let charts = b.eval("window.gpumemReport.charts.map(c => ({trace: c.trace, series: c.series}))");
    let charts = charts.as_array().unwrap();
    assert_eq!(charts.len(), paths.len());
    for c in charts {
        let trace = c["trace"].as_str().unwrap();
        let series = c["series"].as_array().unwrap();
        let names: Vec<&str> = series.iter().map(|s| s["name"].as_str().unwrap()).collect();
        let mut want = vec!["live (requested)".to_string()];
        want.extend(POLICIES.iter().map(|p| format!("reserved: {p}")));
        assert_eq!(names, want, "{trace}: one series per policy plus the live bytes");
        let live_peak = &figures[&(trace.to_string(), "torch".to_string())]["peak_requested"];
        assert_eq!(&series[0]["max"], live_peak, "{trace}: the live series reaches the peak replay prints");
        for (i, p) in POLICIES.iter().enumerate() {
            let f = &figures[&(trace.to_string(), p.to_string())];
            let s = &series[i + 1];
            assert_eq!(
                s["max"], f["peak_reserved"],
                "{trace} / {p}: the reserved series reaches replay's peak"
            );
            assert!(s["end"].as_u64().unwrap() <= s["max"].as_u64().unwrap(), "{trace} / {p}");
        }
        // the same figures, as the DOM shows them
        let canvas_max = b.eval(&format!(
            "JSON.parse(window.gpumemReport.charts.find(c => c.trace === {trace:?}).canvas.dataset.max)"
        ));
        assert_eq!(canvas_max, Value::Array(series.iter().map(|s| s["max"].clone()).collect()));
    }

    // hovering a block shows its details
    for t in TRACES.iter().chain(["snapshot_sample.pickle"].iter()) {
        for (pi, policy) in POLICIES.iter().enumerate() {
            let (tip, point) =
                hover_block(&mut b, t, pi, 0).unwrap_or_else(|| panic!("{t} / {policy}: no block"));
            let addr = format!("address {:#x}", point["address"].as_u64().unwrap());
            assert!(tip.starts_with("allocated block"), "{t} / {policy}: {tip}");
            assert!(
                tip.contains(&addr) && tip.contains("stream ") && tip.contains("requested "),
                "{t}: {tip}"
            );
            if *t == "snapshot_sample.pickle" {
                assert!(tip.contains(".py:"), "the snapshot's Python frames: {tip}");
            }
            if let Some((tip, _)) = hover_block(&mut b, t, pi, 2) {
                assert!(tip.starts_with("free (reserved but unallocated)"), "{t} / {policy}: {tip}");
            }
        }
    }
    // and hovering the chart shows each series
    b.eval("window.gpumemReport.charts[0].canvas.scrollIntoView({block: 'center'}); true");
    let r = b.eval("(() => { const r = window.gpumemReport.charts[0].canvas.getBoundingClientRect(); return [r.left + r.width * 0.6, r.top + r.height / 2]; })()");
    b.hover(r[0].as_f64().unwrap(), r[1].as_f64().unwrap());
    let tip = b.eval("document.getElementById('tip').textContent");
    assert!(tip.as_str().unwrap().contains("reserved: gpumem"), "{tip}");

    let errors = b.errors();
    assert!(errors.is_empty(), "console errors: {errors:#?}");

    // the torch policy's map, where reserved but unallocated memory shows most
    b.eval("window.gpumemReport.showMap[window.gpumemReport.charts[0].trace](0); window.scrollTo(0, 0); document.getElementById('tip').style.display = 'none'; window.gpumemReport.charts.forEach(c => c.redraw()); true");
    // the first trace: its figures, its chart and its segment map
    let h =
        b.eval("document.querySelector('#trace-0 .sites').getBoundingClientRect().top + window.scrollY - 60");
    let png = b.screenshot(1400, h.as_f64().unwrap() as u32);
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "a screenshot");
    std::fs::write(out_dir().join("report.png"), &png).unwrap();
    if std::env::var("GPUMEM_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        std::fs::write(format!("{}/../../docs/report.png", env!("CARGO_MANIFEST_DIR")), &png).unwrap();
    }
}

/// A trace of `n` events: allocations of varied sizes, most freed soon after, some kept
/// for long, on one stream, at addresses that never repeat.
fn long_trace(n: usize) -> String {
    let mut out = String::with_capacity(n * 64);
    let (mut x, mut addr, mut live): (u64, u64, Vec<(u64, u64)>) = (12345, 1 << 40, Vec::new());
    let mut events = 0;
    while events < n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let r = x >> 33;
        if live.len() < 64 || r % 2 == 0 && live.len() < 4000 {
            let size = 512 + (r % 4096) * (1 + (r >> 20) % 2048);
            out.push_str(&format!(
                "{{\"a\": \"alloc\", \"p\": {addr}, \"s\": {size}, \"t\": 0, \"us\": {events}}}\n"
            ));
            live.push((addr, size));
            addr += size.div_ceil(512) * 512;
        } else {
            let (p, s) = live.swap_remove((r as usize) % live.len());
            for a in ["free_requested", "free_completed"] {
                out.push_str(&format!(
                    "{{\"a\": \"{a}\", \"p\": {p}, \"s\": {s}, \"t\": 0, \"us\": {events}}}\n"
                ));
                events += 1;
            }
            continue;
        }
        events += 1;
    }
    out
}

#[test]
fn a_long_trace_makes_a_small_page_that_renders() {
    let Some(exe) = chromium("a_long_trace_makes_a_small_page_that_renders") else { return };
    let trace = out_dir().join("long.jsonl");
    std::fs::write(&trace, long_trace(500_000)).unwrap();
    let html = out_dir().join("long.html");
    let paths = [trace.to_string_lossy().into_owned()];
    let start = std::time::Instant::now();
    report(&paths, &html);
    println!("gpumem report of 500,000 events took {:?}", start.elapsed());
    // downsampled: the page does not grow with the trace
    let size = std::fs::metadata(&html).unwrap().len();
    assert!(size < 2 << 20, "{size} bytes");
    let mut b = Browser::start(&exe, 1400, 1000);
    let took =
        b.open(&format!("file://{}", html.display()), "document.body && document.body.dataset.ready === '1'");
    println!("its page rendered in {took:?}");
    let figures = replay_figures(&paths);
    let series = b.eval("window.gpumemReport.charts[0].series");
    for (i, p) in POLICIES.iter().enumerate() {
        assert_eq!(
            series[i + 1]["max"],
            figures[&("long.jsonl".to_string(), p.to_string())]["peak_reserved"],
            "{p}"
        );
    }
    let errors = b.errors();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}
