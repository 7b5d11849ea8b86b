//! Each reader on real files, and on each kind of broken file.

mod common;

use common::data;
use gpumem::{Action, Policy, SimDevice};
use gpumem_trace::{read_trace, read_trace_bytes, replay, Location, ReplayError, ReplayOptions};
use std::collections::BTreeMap;

fn err(bytes: &[u8]) -> String {
    read_trace_bytes("bad.trace", bytes).unwrap_err().to_string()
}

#[test]
fn reads_gzipped_json_lines_with_the_runs_stats() {
    let t = read_trace(&data("resnet50_train.jsonl.gz")).unwrap();
    assert_eq!(t.events.iter().filter(|e| e.action == Action::Alloc).count(), 3228);
    assert_eq!(t.events.iter().filter(|e| e.action == Action::SegmentAlloc).count(), 111);
    let stats = t.stats.as_ref().unwrap();
    assert_eq!(stats.len(), 122);
    assert_eq!(stats["reserved_bytes.all.peak"], 7031750656);
    let first = t.events[0];
    assert_eq!((first.action, first.addr, first.size), (Action::SegmentAlloc, 139740114321408, 2097152));
    assert_eq!(first.origin, Location::Line(1));
}

#[test]
fn reads_plain_json_lines_too() {
    let gz = std::fs::read(data("vit_train_amp.jsonl.gz")).unwrap();
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut plain).unwrap();
    let a = read_trace_bytes("vit.jsonl", &plain).unwrap();
    let b = read_trace(&data("vit_train_amp.jsonl.gz")).unwrap();
    assert_eq!(a.events, b.events);
}

#[test]
fn reads_the_real_snapshot_pickle() {
    let t = read_trace(&data("snapshot_sample.pickle")).unwrap();
    let count = |a| t.events.iter().filter(|e| e.action == a).count();
    // checked against Python's own pickle: 76 alloc, 61 free_requested, 61 free_completed,
    // 16 segment_alloc, 6 segment_free
    assert_eq!(t.events.len(), 220);
    assert_eq!(count(Action::Alloc), 76);
    assert_eq!(count(Action::FreeRequested), 61);
    assert_eq!(count(Action::FreeCompleted), 61);
    assert_eq!(count(Action::SegmentAlloc), 16);
    assert_eq!(count(Action::SegmentFree), 6);
    assert_eq!(t.events[0].addr, 140580025794560);
    assert_eq!(t.events[0].size, 16777216);
}

#[test]
fn reads_rmm_logs() {
    let csv = "Thread,Time,Action,Pointer,Size,Stream\n\
               1,08:00:00.000001,allocate,0x7f0000000000,1048576,0\n\
               1,08:00:00.000002,allocate,0x7f0000100000,4096,0x5a\n\
               1,08:00:00.000003,free,0x7f0000000000,1048576,0\n\
               1,08:00:00.000004,allocate failure,(nil),999999999999,0\n";
    let t = read_trace_bytes("rmm.csv", csv.as_bytes()).unwrap();
    assert_eq!(t.events.len(), 5);
    assert_eq!(t.events[1].stream.0, 0x5a);
    assert_eq!(t.events[1].addr, 0x7f0000100000);
    let r = replay(
        &t,
        &Policy::parse("torch").unwrap(),
        SimDevice::default(),
        &ReplayOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(r.ops, 3);
    assert_eq!(r.peak_requested, 1048576 + 4096);
    assert_eq!(r.live_at_end, 1);
    let bad = "Thread,Time,Action,Pointer,Size,Stream\n1,08:00:00.000001,allocate,0x7f00,lots,0\n";
    assert_eq!(
        err(bad.as_bytes()),
        "bad.trace: line 2: bad size \"lots\" (a non-negative integer is expected)"
    );
    // blank lines are skipped but counted, and a short record names what RMM writes
    let short = "Thread,Time,Action,Pointer,Size,Stream\n\n   \n1,08:00:00.000001,allocate,0x7f00,4096\n";
    assert_eq!(
        err(short.as_bytes()),
        "bad.trace: line 4: expected 6 columns (Thread,Time,Action,Pointer,Size,Stream), found 5"
    );
}

#[test]
fn a_truncated_gzip_is_an_error_with_an_offset() {
    let gz = std::fs::read(data("resnet50_train.jsonl.gz")).unwrap();
    let e = err(&gz[..gz.len() / 2]);
    assert!(e.starts_with("bad.trace: byte "), "{e}");
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn random_bytes_are_not_a_trace() {
    let mut x: u32 = 12345;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    let e = err(&bytes);
    assert!(e.starts_with("bad.trace: "), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn an_empty_file_is_an_error() {
    assert_eq!(err(b""), "bad.trace: the file is empty");
    assert_eq!(err(b"  \n\n"), "bad.trace: the file is empty");
}

#[test]
fn pickles_of_the_wrong_shape_are_errors() {
    let list = serde_pickle::to_vec(&vec![1, 2, 3], Default::default()).unwrap();
    assert!(err(&list).contains("not a PyTorch snapshot pickle"), "{}", err(&list));
    let mut m: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    m.insert("segments".into(), vec![]);
    let no_traces = serde_pickle::to_vec(&m, Default::default()).unwrap();
    assert!(err(&no_traces).contains("no \"device_traces\""), "{}", err(&no_traces));
    // an entry without its size, then one with a negative size
    #[derive(serde::Serialize)]
    struct Entry {
        action: &'static str,
        addr: i64,
        stream: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        size: Option<i64>,
    }
    #[derive(serde::Serialize)]
    struct Snap {
        device_traces: Vec<Vec<Entry>>,
    }
    let snap =
        |size| Snap { device_traces: vec![vec![Entry { action: "alloc", addr: 4096, stream: 0, size }]] };
    let bytes = serde_pickle::to_vec(&snap(None), Default::default()).unwrap();
    assert_eq!(err(&bytes), "bad.trace: trace entry 0: missing \"size\"");
    let bytes = serde_pickle::to_vec(&snap(Some(-5)), Default::default()).unwrap();
    assert_eq!(err(&bytes), "bad.trace: trace entry 0: negative \"size\": -5");
}

#[test]
fn json_lines_with_bad_fields_are_errors_naming_the_line() {
    let cases = [
        ("{\"a\": \"alloc\", \"p\": 1, \"t\": 0}\n", "line 1: missing field \"s\""),
        (
            "{\"a\": \"alloc\", \"p\": 1, \"s\": -5, \"t\": 0}\n",
            "line 1: field \"s\" must be a non-negative integer, not -5",
        ),
        (
            "{\"a\": \"alloc\", \"p\": 1, \"s\": \"abc\", \"t\": 0}\n",
            "line 1: field \"s\" must be a non-negative integer, not \"abc\"",
        ),
        (
            "{\"a\": \"alloc\", \"p\": 1, \"s\": 1.5, \"t\": 0}\n",
            "line 1: field \"s\" must be a non-negative integer, not 1.5",
        ),
        (
            "{\"a\": \"alloc\", \"p\": 1, \"s\": 2, \"t\": 0}\n{\"a\": \"teleport\", \"p\": 1, \"s\": 2}\n",
            "line 2: unknown action \"teleport\"",
        ),
        ("{\"p\": 1}\n", "line 1: missing field \"a\" (the action)"),
        ("{\"a\": \"alloc\", \"p\": 1, \"s\": 2\n", "line 1: invalid JSON"),
    ];
    for (text, want) in cases {
        let e = err(text.as_bytes());
        assert!(e.starts_with(&format!("bad.trace: {want}")), "{e} should start with {want}");
    }
}

fn trace_of(lines: &[&str]) -> gpumem_trace::Trace {
    read_trace_bytes("t.jsonl", lines.join("\n").as_bytes()).unwrap()
}

#[test]
fn inconsistent_events_are_counted_or_stop_a_strict_replay() {
    let t = trace_of(&[
        r#"{"a": "alloc", "p": 4096, "s": 1000, "t": 0}"#,
        r#"{"a": "alloc", "p": 4096, "s": 1000, "t": 0}"#,
        r#"{"a": "free_requested", "p": 999, "s": 1000, "t": 0}"#,
        r#"{"a": "alloc", "p": 8192, "s": 100000000000000, "t": 0}"#,
        r#"{"a": "free_requested", "p": 4096, "s": 1000, "t": 0}"#,
        r#"{"a": "free_completed", "p": 4096, "s": 1000, "t": 0}"#,
    ]);
    let torch = Policy::parse("torch").unwrap();
    let r = replay(&t, &torch, SimDevice::default(), &ReplayOptions::default(), &mut |_, _| {}).unwrap();
    assert_eq!(r.skipped, 3);
    assert_eq!(r.skipped_reasons["address allocated twice"], 1);
    assert_eq!(r.skipped_reasons["free of an unknown address"], 1);
    assert_eq!(r.skipped_reasons["allocation larger than the device's capacity"], 1);
    assert_eq!(r.ops, 3);
    let strict = ReplayOptions { strict: true, ..Default::default() };
    let e = replay(&t, &torch, SimDevice::default(), &strict, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, ReplayError::Inconsistent { .. }));
    assert_eq!(
        e.to_string(),
        "t.jsonl: line 2: address allocated twice (alloc at 0x1000, 1000 bytes); stopped because of --strict"
    );
}

#[test]
fn a_trace_that_runs_out_of_memory_is_reported() {
    let t = trace_of(&[
        r#"{"a": "alloc", "p": 4096, "s": 600000000, "t": 0}"#,
        r#"{"a": "alloc", "p": 8192, "s": 600000000, "t": 0}"#,
        r#"{"a": "free_requested", "p": 8192, "s": 600000000, "t": 0}"#,
        r#"{"a": "free_completed", "p": 8192, "s": 600000000, "t": 0}"#,
    ]);
    let torch = Policy::parse("torch").unwrap();
    let r = replay(&t, &torch, SimDevice::new(1 << 30), &ReplayOptions::default(), &mut |_, _| {}).unwrap();
    assert_eq!(r.ooms, 1);
    assert_eq!(r.alloc_retries, 1);
    assert_eq!(r.live_at_end, 1);
}

#[test]
fn a_snapshot_converts_to_json_lines_and_back() {
    let t = read_trace(&data("snapshot_sample.pickle")).unwrap();
    let mut out = Vec::new();
    gpumem_trace::write_jsonl(&t.events, &mut out).unwrap();
    let back = read_trace_bytes("converted.jsonl", &out).unwrap();
    let strip = |es: &[gpumem_trace::Event]| {
        es.iter().map(|e| (e.action, e.addr, e.size, e.stream)).collect::<Vec<_>>()
    };
    assert_eq!(strip(&back.events), strip(&t.events));
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(bytes).unwrap();
    z.finish().unwrap()
}

#[test]
fn compressed_non_traces_are_refused_at_their_first_bytes() {
    // 64 MiB of zeros in 64 KB of gzip: refused from its head, not decompressed whole
    let zeros = gzip(&vec![0u8; 64 << 20]);
    assert!(zeros.len() < 200_000);
    let e = err(&zeros);
    assert!(e.starts_with("bad.trace: byte 0: not a trace"), "{e}");
    // a JSON line that never ends: refused at the line limit
    let mut endless = b"{\"a\": \"".to_vec();
    endless.resize(32 << 20, b'x');
    let e = err(&gzip(&endless));
    assert!(e.starts_with("bad.trace: line 1: a line longer than 1 MiB"), "{e}");
    // the same in an RMM log (a quoted field that never ends)
    let mut csv = b"Thread,Time,Action,Pointer,Size,Stream\n1,2,\"".to_vec();
    csv.resize(32 << 20, b'y');
    let e = err(&gzip(&csv));
    assert!(e.starts_with("bad.trace: line 2: a line longer than 1 MiB"), "{e}");
    // nothing but blank space
    let e = err(&gzip(&vec![b' '; 8 << 20]));
    assert!(e.contains("blank space"), "{e}");
    // a good first line, then garbage: stops at the first bad line
    let mut lines = b"{\"a\": \"alloc\", \"p\": 1, \"s\": 2}\n".to_vec();
    lines.extend(std::iter::repeat_n(b'\x01', 1 << 20));
    let e = err(&gzip(&lines));
    assert!(e.starts_with("bad.trace: line 2: "), "{e}");
}

#[test]
fn blank_lines_before_a_trace_keep_line_numbers() {
    let mut text = vec![b'\n'; 50_000];
    text.extend(b"{\"a\": \"teleport\", \"p\": 1, \"s\": 2}\n");
    assert!(err(&text).starts_with("bad.trace: line 50001: unknown action"), "{}", err(&text));
}

#[test]
fn pickles_that_nest_or_copy_without_bound_are_refused() {
    // 1M nested lists: decoding (or dropping) them recursively would overflow the stack
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', 1_000_000));
    deep.extend(std::iter::repeat_n(b'a', 999_999));
    deep.push(b'.');
    let e = err(&deep);
    assert!(e.contains("nested more than"), "{e}");
    // a list paired with itself 60 times by DUP: 2^60 copies from 130 bytes
    let mut dup = vec![0x80, 2, b']'];
    for _ in 0..60 {
        dup.extend([b'2', 0x86]);
    }
    dup.push(b'.');
    let e = err(&dup);
    assert!(e.contains("would take more than"), "{e}");
    // the same through the memo
    let mut memo = vec![0x80, 2, b']', b'q', 0];
    for _ in 0..60 {
        memo.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
    }
    memo.push(b'.');
    assert!(err(&memo).contains("would take more than"), "{}", err(&memo));
    // a string whose length claims 2^63 bytes
    let long = [0x80, 4, 0x8d, 0, 0, 0, 0, 0, 0, 0, 0x80, b'.'];
    assert!(err(&long).contains("past the end"), "{}", err(&long));
}

#[test]
fn devices_fifos_and_directories_are_refused_without_reading() {
    let dir = std::env::temp_dir().join(format!("gpumem-special-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("trace.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().map(|s| s.success()).unwrap_or(false);
    let mut paths = vec!["/dev/zero".to_string(), dir.to_str().unwrap().to_string()];
    if made {
        // no writer: opening it would block forever
        paths.push(fifo.to_str().unwrap().to_string());
    }
    for p in paths {
        if !std::path::Path::new(&p).exists() {
            continue;
        }
        let e = read_trace(&p).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{p}: ")), "{e}");
        assert!(e.contains("directory") || e.contains("not a regular file"), "{e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn errors_quote_input_safely() {
    // JSON escapes: the action read is ESC [ 2 J ESC ] 0 ; owned BEL zzz...
    let hostile = format!(
        "{{\"a\": \"\\u001b[2J\\u001b]0;owned\\u0007{}\", \"p\": 1, \"s\": 2}}\n",
        "z".repeat(200_000)
    );
    let e = err(hostile.as_bytes());
    assert!(e.starts_with("bad.trace: line 1: unknown action \"\\u{1b}[2J"), "{e}");
    assert!(!e.chars().any(char::is_control), "{e:?}");
    assert!(e.len() < 600, "{} bytes", e.len());
    let csv =
        format!("Thread,Time,Action,Pointer,Size,Stream\n1,2,allocate,0x10,{},0\n", "9\u{8}".repeat(50_000));
    let e = err(csv.as_bytes());
    assert!(!e.chars().any(char::is_control) && e.len() < 600, "{e:?}");
    let e = err(b"{\"a\": \"alloc\", \"p\": 1, \"s\": \"\\u001b[31mred\"}\n");
    assert!(!e.chars().any(char::is_control), "{e:?}");
}

#[test]
fn events_that_wrap_the_address_space_are_malformed() {
    let e = err(b"{\"a\": \"alloc\", \"p\": 18446744073709551615, \"s\": 2}\n");
    assert!(
        e.starts_with("bad.trace: line 1: alloc at 0xffffffffffffffff of 2 bytes runs past the end"),
        "{e}"
    );
    let csv = b"Thread,Time,Action,Pointer,Size,Stream\n1,2,allocate,0xfffffffffffff000,8192,0x0\n";
    assert!(err(csv).starts_with("bad.trace: line 2: "), "{}", err(csv));
    // the last byte of the space is fine
    let ok = b"{\"a\": \"alloc\", \"p\": 18446744073709551614, \"s\": 1}\n";
    assert_eq!(read_trace_bytes("t", ok).unwrap().events.len(), 1);
}

#[test]
fn pickles_nested_just_under_the_limit_decode_on_a_small_stack() {
    // {"segments": [[[...]]]} nested 190 deep: accepted by the scan, then decoded and
    // dropped recursively by serde-pickle; run on a thread of 1 MiB of stack, half a test
    // thread's, in a debug build
    let mut p = vec![0x80, 2, b'}', 0x8c, 8];
    p.extend(b"segments");
    p.extend(std::iter::repeat_n(b']', 190));
    p.extend(std::iter::repeat_n(b'a', 189));
    p.extend([b's', b'.']);
    let e = std::thread::Builder::new().stack_size(1 << 20).spawn(move || err(&p)).unwrap().join().unwrap();
    assert!(e.contains("no \"device_traces\""), "{e}");
}
