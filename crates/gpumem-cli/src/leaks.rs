//! `gpumem leaks`: the blocks still live at the end of a trace, or at a point in it, grouped
//! by allocation site (the trace's frames), with count and bytes, largest first.
//!
//! "Live" is what `gpumem replay` counts as live at the end (`live_at_end`,
//! `live_bytes_at_end`): allocated and not yet freed, where a free that waited for another
//! stream counts once PyTorch completed it; inconsistent events are skipped as the replay
//! skips them (both read the trace through the same schedule).

use crate::args::LeaksArgs;
use crate::Failure;
use gpumem::{format_size, LeakReport, LiveBlock};
use gpumem_trace::{read_trace, schedule, Op, Schedule, Trace};
use serde::Serialize;
use std::collections::BTreeMap;

/// The blocks live after the first `n` ops of `schedule` (of `trace`): each with the trace's
/// own address, requested size, stream and frames; `seq` is its allocation id.
pub(crate) fn live_after(trace: &Trace, schedule: &Schedule, n: usize) -> Vec<LiveBlock> {
    let mut live: BTreeMap<u32, usize> = BTreeMap::new();
    for op in &schedule.ops[..n.min(schedule.ops.len())] {
        match *op {
            Op::Alloc { id, .. } => {
                live.insert(id, schedule.alloc_events[id as usize]);
            }
            Op::Free { id } | Op::Complete { id } => {
                live.remove(&id);
            }
            Op::FreeDeferred { .. } | Op::EmptyCache => {}
        }
    }
    live.into_iter()
        .map(|(id, i)| {
            let e = &trace.events[i];
            LiveBlock {
                address: e.addr,
                size: e.size,
                stream: e.stream,
                seq: Some(id as u64),
                frames: trace.frames_of(i).cloned().unwrap_or_else(|| std::sync::Arc::from(Vec::new())),
            }
        })
        .collect()
}

#[derive(Serialize)]
struct JsonFrame<'a> {
    filename: &'a str,
    line: u32,
    name: &'a str,
}

#[derive(Serialize)]
struct JsonBlock {
    address: u64,
    size: u64,
    stream: u64,
    /// The index of its `alloc` event.
    event: usize,
}

#[derive(Serialize)]
struct JsonSite<'a> {
    count: u64,
    bytes: u64,
    frames: Vec<JsonFrame<'a>>,
    blocks: Vec<JsonBlock>,
}

#[derive(Serialize)]
struct JsonLeaks<'a> {
    trace: String,
    /// Events in the trace.
    events: usize,
    /// The report is of the state just after this event (the last one at the end).
    at_event: usize,
    /// Whether the trace has stacks.
    has_frames: bool,
    count: u64,
    bytes: u64,
    sites: Vec<JsonSite<'a>>,
}

/// The number of ops of `schedule` done just after event `at` (0-based) of the trace.
fn ops_through(schedule: &Schedule, at: usize) -> usize {
    schedule.op_events.partition_point(|&e| e <= at)
}

/// The last event index included, from `--at` or `--time`; `None` for the end.
fn cut(trace: &Trace, a: &LeaksArgs) -> Result<Option<usize>, Failure> {
    let n = trace.events.len();
    if let Some(at) = a.at {
        if at >= n as u64 {
            return Err(Failure::Input(format!(
                "{}: --at {at} is past the trace's last event ({} events, numbered from 0)",
                a.trace, n
            )));
        }
        return Ok(Some(at as usize));
    }
    let Some(t) = a.time else { return Ok(None) };
    if trace.times_us.is_empty() {
        return Err(Failure::Input(format!(
            "{}: --time needs a trace with event times, and this one has none (use --at EVENT)",
            a.trace
        )));
    }
    let t0 = trace.times_us[0];
    // the last event at or before t0 + t (times are in recorded order, not always sorted)
    let last = trace.times_us.iter().rposition(|&x| x.saturating_sub(t0) <= t).unwrap_or(0);
    Ok(Some(last))
}

pub(crate) fn run(a: &LeaksArgs) -> Result<(), Failure> {
    let trace = read_trace(&a.trace)?;
    let cut = cut(&trace, a)?;
    let schedule = schedule(&trace);
    let n = cut.map_or(schedule.ops.len(), |at| ops_through(&schedule, at));
    let report = LeakReport::from_blocks(live_after(&trace, &schedule, n));
    let events = trace.events.len();
    let when = match cut {
        Some(at) => format!("just after event {at} of {events}"),
        None => format!("at its end (after all {events} events)"),
    };
    if a.json {
        let sites = report
            .sites
            .iter()
            .map(|s| JsonSite {
                count: s.count,
                bytes: s.bytes,
                frames: s
                    .frames
                    .iter()
                    .map(|f| JsonFrame { filename: &f.filename, line: f.line, name: &f.name })
                    .collect(),
                blocks: s
                    .blocks
                    .iter()
                    .map(|b| JsonBlock {
                        address: b.address,
                        size: b.size,
                        stream: b.stream.0,
                        event: schedule.alloc_events[b.seq.unwrap_or(0) as usize],
                    })
                    .collect(),
            })
            .collect();
        let out = JsonLeaks {
            trace: trace.name(),
            events,
            at_event: cut.unwrap_or(events - 1),
            has_frames: !trace.frames.is_empty(),
            count: report.count,
            bytes: report.bytes,
            sites,
        };
        println!("{}", serde_json::to_string(&out).expect("leaks serialize"));
        return Ok(());
    }
    println!("{} {when}:", trace.name());
    print!("{report}");
    if trace.frames.is_empty() && !report.is_empty() {
        println!(
            "The trace has no call stacks (record it with stacks to see the sites); the largest blocks:"
        );
        let mut blocks: Vec<&LiveBlock> = report.sites.iter().flat_map(|s| &s.blocks).collect();
        blocks.sort_by(|x, y| y.size.cmp(&x.size).then(x.address.cmp(&y.address)));
        for b in blocks.iter().take(10) {
            let event = schedule.alloc_events[b.seq.unwrap_or(0) as usize];
            println!(
                "  {:>12}  at {:#x}, stream {}, allocated at event {event}",
                format_size(b.size),
                b.address,
                b.stream.0
            );
        }
        if blocks.len() > 10 {
            println!("  ... and {} more", blocks.len() - 10);
        }
    }
    Ok(())
}
