//! Writing snapshot pickles in the shape of `torch.cuda.memory._dump_snapshot()`, so that
//! PyTorch's own viewers (`torch.cuda._memory_viz`, pytorch.org/memory_viz) open what gpumem
//! recorded: the segments and blocks held now, and the history of every event.

use gpumem::{Action, SegmentInfo, TraceEntry};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;

#[derive(Serialize)]
struct Frame {
    filename: String,
    line: i64,
    name: String,
}

#[derive(Serialize)]
struct Block {
    address: u64,
    size: u64,
    requested_size: u64,
    state: &'static str,
    frames: Vec<Frame>,
}

#[derive(Serialize)]
struct Segment {
    device: usize,
    address: u64,
    total_size: u64,
    allocated_size: u64,
    active_size: u64,
    requested_size: u64,
    stream: u64,
    segment_type: &'static str,
    segment_pool_id: (u64, u64),
    is_expandable: bool,
    frames: Vec<Frame>,
    blocks: Vec<Block>,
}

#[derive(Serialize)]
struct Entry {
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    addr: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_free: Option<u64>,
    size: u64,
    stream: u64,
    time_us: u64,
    frames: Vec<Frame>,
    compile_context: &'static str,
    user_metadata: String,
}

#[derive(Serialize)]
struct Snapshot {
    segments: Vec<Segment>,
    device_traces: Vec<Vec<Entry>>,
    allocator_settings: BTreeMap<String, String>,
    external_annotations: Vec<u8>,
}

fn frames(stack: &[gpumem::Frame]) -> Vec<Frame> {
    stack
        .iter()
        .map(|f| Frame { filename: f.filename.clone(), line: f.line.into(), name: f.name.clone() })
        .collect()
}

/// Writes `segments` (from `Allocator::snapshot`) and `history` (from `Allocator::history`) of
/// device `device` as a PyTorch snapshot pickle; `settings` become its `allocator_settings`.
pub fn write_snapshot(
    segments: &[SegmentInfo],
    history: &[TraceEntry],
    device: usize,
    settings: &str,
    mut out: impl Write,
) -> Result<(), serde_pickle::Error> {
    let segments = segments
        .iter()
        .map(|s| Segment {
            device,
            address: s.address,
            total_size: s.total_size,
            allocated_size: s.allocated_size,
            active_size: s.active_size,
            requested_size: s.requested_size,
            stream: s.stream.0,
            segment_type: s.pool.name(),
            segment_pool_id: (0, 0),
            is_expandable: s.is_expandable,
            frames: Vec::new(),
            blocks: s
                .blocks
                .iter()
                .map(|b| Block {
                    address: b.address,
                    size: b.size,
                    requested_size: b.requested_size,
                    state: b.state.name(),
                    frames: frames(&b.frames),
                })
                .collect(),
        })
        .collect();
    let trace = history
        .iter()
        .map(|e| Entry {
            action: e.action.name(),
            addr: (e.action != Action::Oom).then_some(e.addr),
            device_free: (e.action == Action::Oom).then_some(e.addr),
            size: e.size,
            stream: e.stream.0,
            time_us: e.time_us,
            frames: frames(&e.frames),
            compile_context: "N/A",
            user_metadata: e.tag.clone(),
        })
        .collect();
    let mut device_traces: Vec<Vec<Entry>> = (0..device).map(|_| Vec::new()).collect();
    device_traces.push(trace);
    let mut allocator_settings = BTreeMap::new();
    allocator_settings.insert("PYTORCH_CUDA_ALLOC_CONF".to_string(), settings.to_string());
    let snap = Snapshot { segments, device_traces, allocator_settings, external_annotations: Vec::new() };
    serde_pickle::to_writer(&mut out, &snap, serde_pickle::SerOptions::new())
}
