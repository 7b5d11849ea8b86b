//! Call stacks through snapshot pickles: the frames gpumem's history writes come back from
//! the reader, event by event, as PyTorch's own snapshots' frames do.

use gpumem::{Action, Allocator, AllocatorConfig, Frame, Frames, SimDevice, StreamId};
use gpumem_trace::{read_trace, read_trace_bytes, write_snapshot};
use std::sync::{Arc, Mutex};

#[test]
fn frames_written_by_the_history_read_back_per_event() {
    let a = Allocator::new(SimDevice::new(1 << 30), AllocatorConfig::default()).unwrap();
    let line = Arc::new(Mutex::new(0u32));
    let l = line.clone();
    a.record_history(true, 1000);
    a.set_stack_source(Some(Arc::new(move || -> Frames {
        let n = *l.lock().unwrap();
        Arc::from(vec![
            Frame { filename: "model.py".into(), line: n, name: "forward".into() },
            Frame { filename: "train.py".into(), line: 3, name: "<module>".into() },
        ])
    })));
    let mut kept = Vec::new();
    for i in 1..=5u32 {
        *line.lock().unwrap() = 10 * i;
        let p = a.malloc(1 << 20, StreamId::DEFAULT).unwrap();
        if i % 2 == 0 {
            a.free(p).unwrap();
        } else {
            kept.push(p);
        }
    }
    let mut bytes = Vec::new();
    write_snapshot(&a.snapshot(), &a.history(), 0, "gpumem", &mut bytes).unwrap();
    let trace = read_trace_bytes("mine.pickle", &bytes).unwrap();
    assert_eq!(trace.frames.len(), trace.events.len());
    let allocs: Vec<u32> = trace
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.action == Action::Alloc)
        .map(|(i, _)| trace.frames_of(i).expect("a stack")[0].line)
        .collect();
    assert_eq!(allocs, [10, 20, 30, 40, 50]);
    assert_eq!(trace.frames_of(0).unwrap()[1].filename, "train.py");
    assert_eq!(trace.times_us.len(), trace.events.len());
}

#[test]
fn pytorchs_shared_frames_read_back_whole() {
    let path = format!("{}/../../testdata/snapshot_sample.pickle", env!("CARGO_MANIFEST_DIR"));
    let trace = read_trace(&path).unwrap();
    assert_eq!(trace.frames.len(), trace.events.len());
    // every event of the sample was recorded with its stack, C++ and Python
    assert!(trace.frames.iter().all(|f| !f.is_empty()));
    let python: Vec<&Frame> = trace.frames.iter().flat_map(|f| f.iter()).filter(|f| f.line > 0).collect();
    assert!(python.iter().any(|f| f.filename == "bench/snapshot_sample.py" && f.name == "<module>"));
    assert!(trace.frames.iter().flat_map(|f| f.iter()).all(|f| !f.name.is_empty()));
    // shared, as the pickle shares them: far fewer distinct stacks than events
    let distinct: std::collections::HashSet<*const Frame> = trace.frames.iter().map(|f| f.as_ptr()).collect();
    assert!(distinct.len() < trace.events.len() / 2, "{} stacks", distinct.len());
}
