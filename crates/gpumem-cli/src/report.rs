//! `gpumem report`: one self-contained HTML file (`report.html`, its data inlined as JSON)
//! that puts the policies side by side for each trace: memory over time (live bytes and
//! each policy's reserved bytes on one chart), the segments and blocks at each policy's peak,
//! the allocation sites that hold the most at the peak of live bytes, and `memory_summary()`.
//!
//! The timeline is downsampled here, into at most [`BUCKETS`] buckets of ops, each with the
//! minimum, maximum and last value of every series, so that a trace of any length makes a
//! page of the same size; the page draws the buckets that fall in each pixel column. A
//! bucket's maximum includes a peak reached inside an op (a policy may reserve a new range
//! before it releases an old one), so each reserved series reaches exactly the
//! `peak_reserved` that `gpumem replay` prints.

use crate::args::ReportArgs;
use crate::leaks::live_after;
use crate::replay::{capacity, policies};
use crate::Failure;
use gpumem::{site_frames, Allocator, BlockState, Frames, LeakReport, LiveBlock, Policy, SimDevice};
use gpumem_trace::{read_trace, replay_observed, schedule, Op, ReplayOptions, Schedule, Step, Trace};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;

/// The page, with `/*GPUMEM_DATA*/null` where the data goes.
const TEMPLATE: &str = include_str!("report.html");
const DATA_SLOT: &str = "/*GPUMEM_DATA*/null";

/// At most this many points per series: a few per pixel of a wide screen.
pub(crate) const BUCKETS: usize = 2000;

/// How many allocation sites the page lists for each trace.
const SITES: usize = 15;

/// The min, max and last value of one series in each bucket.
struct Series {
    min: Vec<u64>,
    max: Vec<u64>,
    last: Vec<u64>,
}

impl Series {
    fn new(n: usize) -> Series {
        Series { min: vec![u64::MAX; n], max: vec![0; n], last: vec![0; n] }
    }

    /// Records value `v` in bucket `b`; `high` is the highest the value was during the op
    /// (above `v` where it peaked inside it).
    fn note(&mut self, b: usize, v: u64, high: u64) {
        self.min[b] = self.min[b].min(v);
        self.max[b] = self.max[b].max(high.max(v));
        self.last[b] = v;
    }

    /// Fills buckets no op fell in (more buckets than ops never happens, but an empty
    /// trace prefix may) with the value before them.
    fn into_json(mut self) -> Value {
        let mut prev = 0;
        for b in 0..self.min.len() {
            if self.min[b] == u64::MAX {
                (self.min[b], self.max[b], self.last[b]) = (prev, prev, prev);
            }
            prev = self.last[b];
        }
        json!({"min": self.min, "max": self.max, "last": self.last})
    }
}

/// Distinct stacks, each once, referred to by index.
#[derive(Default)]
struct FrameTable {
    index: HashMap<Frames, usize>,
    list: Vec<Value>,
}

impl FrameTable {
    /// The index of the site frames of `frames`, or -1 where there are none.
    fn id(&mut self, frames: Option<&Frames>) -> i64 {
        let Some(f) = frames.map(|f| site_frames(f)).filter(|f| !f.is_empty()) else { return -1 };
        let next = self.list.len();
        let list = &mut self.list;
        *self.index.entry(f.clone()).or_insert_with(|| {
            list.push(Value::Array(f.iter().map(|x| json!([x.filename, x.line, x.name])).collect()));
            next
        }) as i64
    }
}

/// The bucket of the op numbered `index` (from 1; 0 for an `EmptyCache` before any op).
fn bucket(index: u64, ops: u64, buckets: usize) -> usize {
    (index.saturating_sub(1) as u128 * buckets as u128 / ops.max(1) as u128) as usize
}

/// Where in `schedule.ops` the `n`th counted op (alloc or free) ends.
fn position_after(schedule: &Schedule, n: u64) -> usize {
    if n == 0 {
        return 0;
    }
    let mut done = 0;
    for (i, op) in schedule.ops.iter().enumerate() {
        if !matches!(op, Op::EmptyCache) {
            done += 1;
            if done >= n {
                return i + 1;
            }
        }
    }
    schedule.ops.len()
}

/// One policy's replay: its figures, its reserved bytes over time, and the op after which
/// its reserved bytes stood at their peak with the most allocated.
struct PolicyRun {
    report: Value,
    reserved: Series,
    live: Series,
    peak_op: u64,
}

fn run_policy(
    trace: &Trace,
    policy: &Policy,
    cap: u64,
    ops: u64,
    buckets: usize,
) -> Result<PolicyRun, Failure> {
    let (mut reserved, mut live) = (Series::new(buckets), Series::new(buckets));
    // the op after which reserved bytes stood at their peak with the most allocated: the
    // fullest the peak ever was (where a peak was reached only inside an op, that op)
    let (mut peak, mut peak_op, mut peak_allocated) = (0u64, 0u64, 0u64);
    let mut observe = |s: &Step, a: &Allocator<SimDevice>| {
        let b = bucket(s.index, ops, buckets);
        let (now, high) = (a.memory_reserved(), a.max_memory_reserved());
        let high_here = if high > peak { high } else { now };
        if high > peak || (now == peak && s.index > 0 && !matches!(s.op, Op::EmptyCache)) {
            let allocated = a.memory_allocated();
            if high > peak || allocated > peak_allocated {
                (peak, peak_op, peak_allocated) = (high, s.index, allocated);
            }
        }
        reserved.note(b, now, high_here);
        live.note(b, s.live_requested, s.live_requested);
    };
    let (report, _) = replay_observed(
        trace,
        policy,
        SimDevice::new(cap),
        &ReplayOptions::default(),
        &mut |_, _| {},
        &mut observe,
    )
    .map_err(Failure::work)?;
    let report = serde_json::to_value(&report).expect("reports serialize");
    Ok(PolicyRun { report, reserved, live, peak_op })
}

/// The segments and blocks, and `memory_summary()`, just after op `peak_op` of a replay
/// with `policy`; each live block with its trace event and frames.
fn peak_map(
    trace: &Trace,
    sched: &Schedule,
    policy: &Policy,
    cap: u64,
    peak_op: u64,
    frames: &mut FrameTable,
) -> Result<Value, Failure> {
    let mut ptr_of: Vec<u64> = vec![0; sched.allocs as usize];
    let mut id_at: HashMap<u64, u32> = HashMap::new();
    let mut taken: Option<Value> = None;
    let mut observe = |s: &Step, a: &Allocator<SimDevice>| {
        match s.op {
            Op::Alloc { id, .. } if s.ptr != 0 => {
                ptr_of[id as usize] = s.ptr;
                id_at.insert(s.ptr, id);
            }
            Op::Free { id } | Op::Complete { id } if id_at.get(&ptr_of[id as usize]) == Some(&id) => {
                id_at.remove(&ptr_of[id as usize]);
            }
            _ => {}
        }
        if taken.is_some() || s.index != peak_op || matches!(s.op, Op::EmptyCache) {
            return;
        }
        let segments: Vec<Value> = a
            .snapshot()
            .iter()
            .map(|seg| {
                let blocks: Vec<Value> = seg
                    .blocks
                    .iter()
                    .map(|b| {
                        let state = match b.state {
                            BlockState::ActiveAllocated => 0,
                            BlockState::ActivePendingFree => 1,
                            BlockState::Inactive => 2,
                        };
                        let id = (b.state != BlockState::Inactive).then(|| id_at.get(&b.address)).flatten();
                        let event = id.map_or(-1, |&i| sched.alloc_events[i as usize] as i64);
                        let f =
                            id.map_or(-1, |&i| frames.id(trace.frames_of(sched.alloc_events[i as usize])));
                        json!([b.address - seg.address, b.size, b.requested_size, state, event, f])
                    })
                    .collect();
                json!({"address": seg.address, "size": seg.total_size, "stream": seg.stream.0,
                       "expandable": seg.is_expandable, "pool": format!("{:?}", seg.pool).to_lowercase(),
                       "blocks": blocks})
            })
            .collect();
        taken = Some(json!({
            "op": peak_op,
            "reserved": a.memory_reserved(),
            "allocated": a.memory_allocated(),
            "live": s.live_requested,
            "segments": segments,
            "summary": a.memory_summary(false),
        }));
    };
    replay_observed(
        trace,
        policy,
        SimDevice::new(cap),
        &ReplayOptions::default(),
        &mut |_, _| {},
        &mut observe,
    )
    .map_err(Failure::work)?;
    Ok(taken.unwrap_or(Value::Null))
}

/// The sites that hold the most at the peak of live bytes (op `peak_op`): by the trace's
/// frames, or, for a trace without them, by requested size.
fn peak_sites(trace: &Trace, sched: &Schedule, peak_op: u64, frames: &mut FrameTable) -> Value {
    let blocks = live_after(trace, sched, position_after(sched, peak_op));
    if trace.frames.is_empty() {
        // one "site" per requested size: the sizes that hold the most
        let mut groups: HashMap<u64, Vec<LiveBlock>> = HashMap::new();
        for b in blocks {
            groups.entry(b.size).or_default().push(b);
        }
        let mut sites: Vec<(u64, u64, u64)> =
            groups.iter().map(|(&size, v)| (size, v.len() as u64, size * v.len() as u64)).collect();
        sites.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        let list: Vec<Value> = sites
            .iter()
            .take(SITES)
            .map(|&(size, count, bytes)| json!({"frames": -1, "size": size, "count": count, "bytes": bytes}))
            .collect();
        return json!({"op": peak_op, "by": "size", "list": list, "count": sites.len()});
    }
    let report = LeakReport::from_blocks(blocks);
    let list: Vec<Value> = report
        .top(SITES)
        .iter()
        .map(|s| json!({"frames": frames.id(Some(&s.frames)), "count": s.count, "bytes": s.bytes}))
        .collect();
    json!({"op": peak_op, "by": "site", "list": list, "count": report.sites.len()})
}

fn trace_data(path: &str, policies: &[Policy], cap: u64) -> Result<Value, Failure> {
    let trace = read_trace(path)?;
    let sched = schedule(&trace);
    let ops = sched.ops.iter().filter(|o| !matches!(o, Op::EmptyCache)).count() as u64;
    let buckets = (ops as usize).clamp(1, BUCKETS);
    let mut frames = FrameTable::default();
    let (mut reports, mut reserved, mut peaks) = (Vec::new(), Vec::new(), Vec::new());
    let mut live = None;
    let mut live_peak_op = 0;
    for policy in policies {
        let run = run_policy(&trace, policy, cap, ops, buckets)?;
        peaks.push(peak_map(&trace, &sched, policy, cap, run.peak_op, &mut frames)?);
        live_peak_op = run.report["peak_op"].as_u64().unwrap_or(0);
        reports.push(run.report);
        reserved.push(run.reserved.into_json());
        live.get_or_insert(run.live);
    }
    // the first op of each bucket, its time from the trace's first event, and the largest
    // allocation in it: [size, address, stream, event, frames]
    let mut first_op = vec![u64::MAX; buckets];
    let mut time_us: Vec<Value> = vec![Value::Null; buckets];
    let mut largest: Vec<Option<(u64, u64, u64, usize)>> = vec![None; buckets];
    let t0 = trace.times_us.first().copied();
    let mut counted = 0u64;
    for (i, op) in sched.ops.iter().enumerate() {
        if matches!(op, Op::EmptyCache) {
            continue;
        }
        counted += 1;
        let b = bucket(counted, ops, buckets);
        if first_op[b] == u64::MAX {
            first_op[b] = counted;
            if let (Some(t0), Some(t)) = (t0, trace.time_of(sched.op_events[i])) {
                time_us[b] = json!(t.saturating_sub(t0));
            }
        }
        if let Op::Alloc { size, stream, addr, .. } = *op {
            if largest[b].is_none_or(|l| size > l.0) {
                largest[b] = Some((size, addr, stream.0, sched.op_events[i]));
            }
        }
    }
    let largest: Vec<Value> = largest
        .into_iter()
        .map(|l| match l {
            Some((size, addr, stream, event)) => {
                json!([size, addr, stream, event, frames.id(trace.frames_of(event))])
            }
            None => Value::Null,
        })
        .collect();
    let sites = peak_sites(&trace, &sched, live_peak_op, &mut frames);
    Ok(json!({
        "name": trace.name(),
        "events": trace.events.len(),
        "ops": ops,
        "has_frames": !trace.frames.is_empty(),
        "policies": policies.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "reports": reports,
        "timeline": {
            "first_op": first_op,
            "time_us": time_us,
            "largest": largest,
            "live": live.map(Series::into_json),
            "reserved": reserved,
        },
        "peaks": peaks,
        "sites": sites,
        "frames": frames.list,
    }))
}

/// The page for `data`: the template with the data inlined where a `<script>` cannot end
/// early (`</` written as `<\/`, which JSON reads back the same).
pub(crate) fn page(data: &Value) -> String {
    let json =
        serde_json::to_string(data).expect("data serializes").replace("</", "<\\/").replace("<!--", "<\\!--");
    TEMPLATE.replacen(DATA_SLOT, &json, 1)
}

pub(crate) fn run(a: &ReportArgs) -> Result<(), Failure> {
    let policies = policies(&a.policies)?;
    let cap = capacity(&a.capacity)?;
    // create the file first: a bad path is bad input, found before the work
    let mut file = std::fs::File::create(&a.output)
        .map_err(|e| Failure::Input(format!("{}: cannot create: {e}", a.output)))?;
    let mut traces = Vec::new();
    for path in &a.traces {
        match trace_data(path, &policies, cap) {
            Ok(t) => traces.push(t),
            Err(e) => {
                // no half-made page left behind
                drop(file);
                let _ = std::fs::remove_file(&a.output);
                return Err(e);
            }
        }
    }
    let data = json!({"generator": format!("gpumem {}", env!("CARGO_PKG_VERSION")), "traces": traces});
    let html = page(&data);
    file.write_all(html.as_bytes()).map_err(|e| Failure::Work(format!("{}: cannot write: {e}", a.output)))?;
    println!(
        "wrote {} ({} trace{} x {} policies, {} KiB): open it in a browser",
        a.output,
        a.traces.len(),
        if a.traces.len() == 1 { "" } else { "s" },
        policies.len(),
        html.len() / 1024
    );
    Ok(())
}
