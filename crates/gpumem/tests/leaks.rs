//! Leak reports from the history: `Allocator::leaks`, `leaks_since`, the sites an
//! out-of-memory error names, and Rust backtraces as a stack source.

use gpumem::{
    rust_backtrace_source, AllocError, Allocator, Frame, Frames, Policy, SimDevice, StackSource, StreamId,
};
use std::sync::{Arc, Mutex};

/// A stack source that returns whatever stack `set` was last given, as a Python program's
/// frames would change from line to line.
fn scripted() -> (StackSource, impl Fn(&str, u32)) {
    let current: Arc<Mutex<Frames>> = Arc::new(Mutex::new(Arc::from(Vec::new())));
    let c = current.clone();
    let source: StackSource = Arc::new(move || c.lock().unwrap().clone());
    let set = move |file: &str, line: u32| {
        *current.lock().unwrap() = Arc::from(vec![
            Frame { filename: file.into(), line, name: "f".into() },
            Frame { filename: "native.cpp".into(), line: 0, name: "alloc".into() },
        ]);
    };
    (source, set)
}

fn each_policy(f: impl Fn(&str, Allocator<SimDevice>)) {
    for name in Policy::NAMES {
        let a = Allocator::with_policy(SimDevice::new(1 << 30), &Policy::parse(name).unwrap()).unwrap();
        f(name, a);
    }
}

#[test]
fn leaks_group_live_blocks_by_site_largest_first() {
    each_policy(|policy, a| {
        let (source, at) = scripted();
        a.record_history(true, 10_000);
        a.set_stack_source(Some(source));
        at("model.py", 10);
        let small: Vec<u64> = (0..5).map(|_| a.malloc(1000, StreamId::DEFAULT).unwrap()).collect();
        at("train.py", 3);
        let big = a.malloc(8 << 20, StreamId::DEFAULT).unwrap();
        let freed = a.malloc(64 << 20, StreamId::DEFAULT).unwrap();
        a.free(freed).unwrap();
        a.free(small[0]).unwrap();
        let r = a.leaks();
        assert_eq!((r.count, r.bytes), (5, 4 * 1000 + (8 << 20)), "{policy}");
        let sites: Vec<(String, u64, u64)> =
            r.sites.iter().map(|s| (s.location(), s.count, s.bytes)).collect();
        assert_eq!(
            sites,
            [("train.py:3 in f".to_string(), 1, 8 << 20), ("model.py:10 in f".to_string(), 4, 4000)],
            "{policy}"
        );
        assert_eq!(r.sites[0].blocks[0].address, big);
        // the C++ frame without a line is not part of the site
        assert_eq!(r.sites[0].frames.len(), 1);
        assert_eq!(a.memory_allocated() > 0, !r.is_empty());
    });
}

#[test]
fn leaks_since_a_mark_survive_the_ring_dropping_their_entries() {
    each_policy(|policy, a| {
        a.record_history(true, 4); // a ring far smaller than what is allocated
        let old = a.malloc(1 << 20, StreamId::DEFAULT).unwrap();
        let mark = a.allocation_mark();
        let mut kept = Vec::new();
        for i in 0..50u64 {
            let p = a.malloc(4096 + i, StreamId::DEFAULT).unwrap();
            if i % 10 == 0 {
                kept.push(p);
            } else {
                a.free(p).unwrap();
            }
        }
        assert_eq!(a.history().len(), 4);
        let r = a.leaks_since(mark);
        let mut got: Vec<u64> = r.sites.iter().flat_map(|s| s.blocks.iter().map(|b| b.address)).collect();
        got.sort_unstable();
        kept.sort_unstable();
        assert_eq!(got, kept, "{policy}");
        assert_eq!(r.bytes, (0..50u64).filter(|i| i % 10 == 0).map(|i| 4096 + i).sum::<u64>());
        // a later mark sees none of them; the earlier block is in leaks() but not here
        assert!(a.leaks_since(a.allocation_mark()).is_empty());
        assert_eq!(a.leaks().count, 6);
        // marks keep growing when history is turned off and on again
        a.record_history(false, 0);
        a.record_history(true, 4);
        assert!(a.allocation_mark() >= mark + 50);
        let late = a.malloc(1 << 20, StreamId::DEFAULT).unwrap();
        assert_eq!(a.leaks_since(mark).count, 1, "only the block allocated since history came back");
        a.free(late).unwrap();
        a.free(old).unwrap();
    });
}

#[test]
fn blocks_allocated_with_history_off_are_listed_without_a_stack() {
    each_policy(|policy, a| {
        let p = a.malloc(3 << 20, StreamId::DEFAULT).unwrap();
        let r = a.leaks();
        assert_eq!((r.count, r.bytes, r.sites.len()), (1, 3 << 20, 1), "{policy}");
        assert!(r.sites[0].frames.is_empty());
        assert_eq!(r.sites[0].blocks[0].seq, None);
        assert!(a.leaks_since(0).is_empty(), "no history, no allocation order");
        a.free(p).unwrap();
        assert!(a.leaks().is_empty());
    });
}

#[test]
fn out_of_memory_names_the_three_sites_that_hold_the_most() {
    each_policy(|policy, a| {
        let (source, at) = scripted();
        a.record_history(true, 100);
        a.set_stack_source(Some(source));
        for (line, n) in [(1, 1u64), (2, 2), (3, 3), (4, 4)] {
            at("hog.py", line);
            for _ in 0..n {
                a.malloc(40 << 20, StreamId::DEFAULT).unwrap();
            }
        }
        at("hog.py", 99);
        let e = a.malloc(900 << 20, StreamId::DEFAULT).unwrap_err();
        let AllocError::OutOfMemory(oom) = &e else { panic!("{policy}: {e}") };
        let lines: Vec<u32> = oom.sites.iter().map(|s| s.frames[0].line).collect();
        assert_eq!(lines, [4, 3, 2], "{policy}");
        let text = e.to_string();
        assert!(
            text.contains("Held the most by: 160.00 MiB in 4 blocks from hog.py:4 in f; 120.00 MiB in 3 blocks from hog.py:3 in f; 80.00 MiB in 2 blocks from hog.py:2 in f."),
            "{policy}: {text}"
        );
    });
}

#[test]
fn out_of_memory_with_history_but_no_stacks_still_names_what_holds_the_most() {
    each_policy(|policy, a| {
        a.record_history(true, 100);
        a.malloc(600 << 20, StreamId::DEFAULT).unwrap();
        let e = a.malloc(600 << 20, StreamId::DEFAULT).unwrap_err();
        let AllocError::OutOfMemory(oom) = &e else { panic!("{policy}: {e}") };
        assert_eq!(oom.sites.len(), 1, "{policy}: one site, the blocks allocated without a stack");
        assert_eq!((oom.sites[0].count, oom.sites[0].bytes), (1, 600 << 20), "{policy}");
        assert!(e.to_string().contains("Held the most by: 600.00 MiB in 1 block"), "{policy}: {e}");
    });
}

#[test]
fn out_of_memory_without_history_names_no_site() {
    each_policy(|policy, a| {
        a.malloc(600 << 20, StreamId::DEFAULT).unwrap();
        let e = a.malloc(600 << 20, StreamId::DEFAULT).unwrap_err();
        let AllocError::OutOfMemory(oom) = &e else { panic!("{policy}: {e}") };
        assert!(oom.sites.is_empty());
        assert!(!e.to_string().contains("Held the most"));
    });
}

#[inline(never)]
fn allocate_and_keep(a: &Allocator<SimDevice>) -> u64 {
    a.malloc(5 << 20, StreamId::DEFAULT).unwrap()
}

#[test]
fn rust_backtraces_name_the_rust_function_that_allocated() {
    let a = Allocator::with_policy(SimDevice::new(1 << 30), &Policy::parse("gpumem").unwrap()).unwrap();
    a.record_history(true, 100);
    a.set_stack_source(Some(rust_backtrace_source()));
    allocate_and_keep(&a);
    let r = a.leaks();
    let frames = &r.sites[0].frames;
    if frames.is_empty() {
        println!("SKIPPED rust_backtraces_name_the_rust_function_that_allocated: this build has no symbols");
        return;
    }
    assert!(
        frames.iter().all(|f| !f.name.starts_with("gpumem::") && !f.name.starts_with("std::")),
        "{frames:?}"
    );
    let at = frames.iter().find(|f| f.name.ends_with("allocate_and_keep")).expect("the allocating function");
    assert!(at.filename.ends_with("leaks.rs") && at.line > 0, "{at:?}");
}
