//! The replay engine: feeds a trace's allocations and frees to a fresh allocator and
//! reports what it reserved, how often it called the device, and how fast it was.

use crate::contents::{stamps_intact, write_stamps};
use crate::device::ReplayDevice;
use crate::error::Location;
use crate::model::{Event, Trace};
use crate::schedule::{schedule, Op, Schedule, Skip};
use gpumem::{Action, AllocError, Allocator, Policy, PolicyKind, StreamId};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// How to replay.
#[derive(Clone, Debug, Default)]
pub struct ReplayOptions {
    /// Check the `torch` policy against the trace's own decisions.
    pub verify: bool,
    /// Stop at the first inconsistent event.
    pub strict: bool,
    /// Stop after this many ops (to look at the allocator at that point).
    pub stop_after: Option<u64>,
    /// Record the allocator's history (for a snapshot of the replay).
    pub record_history: bool,
    /// Stamp every block and check its stamps when it is freed (on the GPU the timings
    /// then mean nothing).
    pub check_contents: bool,
}

/// The figures of one replay; its JSON form is the contract of `gpumem replay --json`.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    /// The trace's file name.
    pub trace: String,
    /// The policy, with its options.
    pub policy: String,
    /// "sim" or "cuda".
    pub device: String,
    /// Allocations and frees replayed.
    pub ops: u64,
    /// The exact peak of live requested bytes.
    pub peak_requested: u64,
    /// Peak allocated bytes.
    pub peak_allocated: u64,
    /// Peak reserved bytes.
    pub peak_reserved: u64,
    /// `peak_reserved / peak_requested`.
    pub reserved_ratio: f64,
    /// Device allocations (segments and page mappings), as `num_device_alloc`.
    pub device_allocs: u64,
    /// Device frees (segments and page unmappings), as `num_device_free`.
    pub device_frees: u64,
    /// Page map calls.
    pub device_maps: u64,
    /// Page unmap calls.
    pub device_unmaps: u64,
    /// Of `seconds`, the time spent in the driver's memory calls (segment allocations and
    /// frees, maps, unmaps, remaps, and the waits for the GPU before unmapping), with
    /// `--device cuda`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_seconds: Option<f64>,
    /// Allocations that failed for lack of memory.
    pub ooms: u64,
    /// Allocation retries after flushing the cache.
    pub alloc_retries: u64,
    /// The whole replay, in seconds.
    pub seconds: f64,
    /// Nanoseconds per op over the whole replay.
    pub ns_per_op: f64,
    /// Nanoseconds per op over the second half of the ops.
    pub steady_ns_per_op: f64,
    /// Device allocations and frees (as `device_allocs` + `device_frees`) made during the second
    /// half of the ops: what the steady state still pays the driver for.
    pub steady_device_calls: u64,
    /// `segment_alloc` events in the trace (with `--verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments_expected: Option<u64>,
    /// Segments allocated in the same order and of the same size (with `--verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments_matched: Option<u64>,
    /// Allocations in the trace (with `--verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocs_expected: Option<u64>,
    /// Allocations returned at PyTorch's own address (with `--verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocs_matched: Option<u64>,
    /// Blocks whose stamps were checked when they were freed (with `--check-contents`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contents_checked: Option<u64>,
    /// Of those, blocks that had lost a stamp: memory handed out twice or a page lost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contents_corrupted: Option<u64>,
    /// Keys of the recorded run's own `memory_stats()` (with `--verify`, where the trace has them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats_expected: Option<u64>,
    /// Of those, keys whose value the replay reproduced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats_matched: Option<u64>,
    /// Bytes freed with another stream's work on them and handed to a stream once that work
    /// was known done (with `--check-streams`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_stream_reuses: Option<u64>,
    /// Bytes handed to a stream before another stream's work on them was known done (with
    /// `--check-streams`): any is a bug of the policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_violations: Option<u64>,
    /// Allocations that handed out such bytes (with `--check-streams`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_violation_count: Option<u64>,
    /// The first of them, described (with `--check-streams`, where there is one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_stream_violation: Option<String>,
    /// Inconsistent events skipped.
    pub skipped: u64,
    /// Why, with counts.
    pub skipped_reasons: BTreeMap<String, u64>,
    /// Allocations still live when the trace ends (normal: the program did not free them).
    pub live_at_end: u64,
    /// Their requested bytes.
    pub live_bytes_at_end: u64,
    /// `empty_cache()` calls replayed.
    pub empty_cache_calls: u64,
    /// The op (counted from 1) after which live requested bytes peaked.
    pub peak_op: u64,
}

/// One op of a replay, as an observer sees it right after the allocator did it
/// ([`replay_observed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// The op.
    pub op: Op,
    /// Allocations and frees done so far, this one included, as [`ReplayReport::ops`] counts
    /// them (an `EmptyCache` shares the number of the op before it).
    pub index: u64,
    /// The address the allocation got, or the block freed; 0 where the allocation failed
    /// (or was skipped) and for `Complete` and `EmptyCache`.
    pub ptr: u64,
    /// Live requested bytes after it.
    pub live_requested: u64,
}

/// A replay that could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// `--strict` and an inconsistent event.
    #[error(
        "{trace}: {origin}: {reason} ({action} at {addr:#x}, {size} bytes); stopped because of --strict"
    )]
    Inconsistent {
        /// The trace.
        trace: String,
        /// Where in the file.
        origin: String,
        /// Why.
        reason: &'static str,
        /// The action.
        action: &'static str,
        /// The address.
        addr: u64,
        /// The size.
        size: u64,
    },
    /// The allocator or the device failed.
    #[error("{0}")]
    Alloc(#[from] AllocError),
}

fn inconsistent(trace: &Trace, s: &Skip) -> ReplayError {
    ReplayError::Inconsistent {
        trace: trace.name(),
        origin: s.event.origin.to_string(),
        reason: s.reason,
        action: s.event.action.name(),
        addr: s.event.addr,
        size: s.event.size,
    }
}

/// Replays `trace` through `policy` on `device` (a fresh device per replay).
/// `progress` is called now and then with (ops done, ops in all).
pub fn replay<D: ReplayDevice + 'static>(
    trace: &Trace,
    policy: &Policy,
    device: D,
    opts: &ReplayOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReplayReport, ReplayError> {
    replay_into(trace, policy, device, opts, progress).map(|(report, _)| report)
}

#[allow(clippy::too_many_arguments)]
fn run<D: ReplayDevice>(
    trace: &Trace,
    schedule: &Schedule,
    policy: &Policy,
    device: &D,
    alloc: &Allocator<D>,
    capacity: u64,
    verify: bool,
    opts: &ReplayOptions,
    progress: &mut dyn FnMut(u64, u64),
    observe: &mut dyn FnMut(&Step, &Allocator<D>),
) -> Result<ReplayReport, ReplayError> {
    let strict = opts.strict;
    let stop_after = opts.stop_after.unwrap_or(u64::MAX);
    let n = schedule.allocs as usize;
    let mut ptrs = vec![0u64; n];
    let mut sizes = vec![0u64; n];
    let mut failed = vec![false; n];
    let mut skipped: Vec<Skip> = schedule.skipped.clone();
    let is_op = |op: &Op| matches!(op, Op::Alloc { .. } | Op::Free { .. } | Op::Complete { .. });
    let total_ops = schedule.ops.iter().filter(|o| is_op(o)).count() as u64;
    let mid = total_ops / 2;
    let (mut done, mut live_requested, mut peak_requested) = (0u64, 0u64, 0u64);
    let (mut ooms, mut allocs_matched, mut empty_cache_calls, mut peak_op) = (0u64, 0u64, 0u64, 0u64);
    let device_seconds_before = device.memory_call_seconds().unwrap_or(0.0);
    let start = Instant::now();
    let mut t_mid = start;
    let calls = |a: &Allocator<D>| {
        let s = a.stats();
        (s.num_device_alloc + s.num_device_free) as u64
    };
    let mut calls_mid = 0;
    // with check_contents: blocks checked when freed, and those that had lost a stamp
    let checking = opts.check_contents;
    let (mut checked, mut corrupted) = (0u64, 0u64);
    let mut released = vec![false; n];
    let mut check = |id: u32, ptr: u64, size: u64| -> Result<(), ReplayError> {
        if checking {
            checked += 1;
            corrupted += !stamps_intact(device, id, ptr, size).map_err(AllocError::from)? as u64;
        }
        Ok(())
    };
    for op in &schedule.ops {
        if is_op(op) {
            if done >= stop_after {
                break;
            }
            if done == mid {
                calls_mid = calls(alloc);
                t_mid = Instant::now();
            }
            done += 1;
            if done & 0xffff == 0 {
                progress(done, total_ops);
            }
        }
        let mut ptr = 0;
        match *op {
            Op::Alloc { id, size, stream, addr } => {
                let i = id as usize;
                if size > capacity {
                    let event = gpumem_event(size, addr, stream);
                    let s = Skip { reason: "allocation larger than the device's capacity", event };
                    if strict {
                        return Err(inconsistent(trace, &s));
                    }
                    skipped.push(s);
                    failed[i] = true;
                    observe(&Step { op: *op, index: done, ptr, live_requested }, alloc);
                    continue;
                }
                match alloc.malloc(size, stream) {
                    Ok(p) => {
                        ptr = p;
                        device.note_malloc(p, size, stream);
                        if checking {
                            write_stamps(device, id, p, size).map_err(AllocError::from)?;
                        }
                        ptrs[i] = p;
                        sizes[i] = size;
                        allocs_matched += (p == addr) as u64;
                        live_requested = live_requested.saturating_add(size);
                        if live_requested > peak_requested {
                            peak_requested = live_requested;
                            peak_op = done;
                        }
                    }
                    Err(e) if e.is_out_of_memory() => {
                        ooms += 1;
                        failed[i] = true;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Op::Free { id } => {
                let i = id as usize;
                if !failed[i] {
                    ptr = ptrs[i];
                    check(id, ptrs[i], sizes[i])?;
                    device.note_free(ptrs[i]);
                    alloc.free(ptrs[i])?;
                    live_requested -= sizes[i];
                    sizes[i] = 0;
                }
            }
            Op::FreeDeferred { id } => {
                let i = id as usize;
                if !failed[i] {
                    ptr = ptrs[i];
                    check(id, ptrs[i], sizes[i])?;
                    released[i] = true;
                    device.note_record_stream(ptrs[i], device.side_stream(id));
                    device.note_free(ptrs[i]);
                    alloc.record_stream(ptrs[i], device.side_stream(id))?;
                    alloc.free(ptrs[i])?;
                }
            }
            Op::Complete { id } => {
                let i = id as usize;
                if !failed[i] {
                    device.complete_side(device.side_stream(id));
                    alloc.process_events()?;
                    live_requested -= sizes[i];
                    sizes[i] = 0;
                }
            }
            Op::EmptyCache => {
                alloc.empty_cache()?;
                empty_cache_calls += 1;
            }
        }
        observe(&Step { op: *op, index: done, ptr, live_requested }, alloc);
    }
    let end = Instant::now();
    // the blocks still live at the end keep their stamps too (not those freed with a use on
    // another stream still pending: the program let go of them, and on a GPU, whose events
    // complete at once here, their memory may already hold other blocks)
    for (i, &size) in sizes.iter().enumerate() {
        if size > 0 && !failed[i] && !released[i] {
            check(i as u32, ptrs[i], size)?;
        }
    }
    progress(total_ops, total_ops);
    let seconds = (end - start).as_secs_f64();
    let steady_ops = (total_ops - mid).max(1) as f64;
    let stats = alloc.stats();
    let (maps, unmaps) = device.map_counts();
    let peak_reserved = stats.reserved_bytes.all().peak as u64;
    let streams = device.stream_report();
    let mut report = ReplayReport {
        trace: trace.name(),
        policy: policy.to_string(),
        device: device.kind().to_string(),
        ops: total_ops,
        peak_requested,
        peak_allocated: stats.allocated_bytes.all().peak as u64,
        peak_reserved,
        reserved_ratio: if peak_requested > 0 { peak_reserved as f64 / peak_requested as f64 } else { 0.0 },
        device_allocs: stats.num_device_alloc as u64,
        device_frees: stats.num_device_free as u64,
        device_maps: maps,
        device_unmaps: unmaps,
        device_seconds: device.memory_call_seconds().map(|s| s - device_seconds_before),
        ooms,
        alloc_retries: stats.num_alloc_retries as u64,
        seconds,
        ns_per_op: seconds * 1e9 / total_ops.max(1) as f64,
        steady_ns_per_op: (end - t_mid).as_secs_f64() * 1e9 / steady_ops,
        steady_device_calls: calls(alloc) - calls_mid,
        segments_expected: None,
        segments_matched: None,
        allocs_expected: None,
        allocs_matched: None,
        stats_expected: None,
        stats_matched: None,
        contents_checked: checking.then_some(checked),
        contents_corrupted: checking.then_some(corrupted),
        cross_stream_reuses: streams.map(|s| s.cross_stream_reuses),
        stream_violations: streams.map(|s| s.stream_violations),
        stream_violation_count: streams.map(|s| s.stream_violation_count),
        first_stream_violation: streams.and_then(|s| s.first_violation).map(|v| v.to_string()),
        skipped: skipped.len() as u64,
        skipped_reasons: BTreeMap::new(),
        live_at_end: sizes.iter().filter(|&&s| s > 0).count() as u64,
        live_bytes_at_end: live_requested,
        empty_cache_calls,
        peak_op,
    };
    for s in &skipped {
        *report.skipped_reasons.entry(s.reason.to_string()).or_default() += 1;
    }
    if verify {
        let ours = device.malloc_log();
        let matched = ours.iter().zip(&schedule.segments).filter(|(a, b)| a.0 == b.0).count();
        report.segments_expected = Some(schedule.segments.len() as u64);
        report.segments_matched = Some(matched as u64);
        report.allocs_expected = Some(schedule.allocs as u64);
        report.allocs_matched = Some(allocs_matched);
        if let Some(want) = &trace.stats {
            let differ = stats_differences(trace, &alloc.memory_stats()).len();
            report.stats_expected = Some(want.len() as u64);
            report.stats_matched = Some((want.len() - differ) as u64);
        }
    }
    Ok(report)
}

fn gpumem_event(size: u64, addr: u64, stream: StreamId) -> Event {
    Event { action: Action::Alloc, addr, size, stream, origin: Location::File }
}

/// The stats keys where a replay differs from the recorded run: (key, recorded, replayed).
pub fn stats_differences(trace: &Trace, got: &gpumem::MemoryStats) -> Vec<(String, i64, i64)> {
    let Some(want) = &trace.stats else {
        return Vec::new();
    };
    want.iter()
        .filter_map(|(k, &v)| match got.get(k) {
            Some(&g) if g == v => None,
            g => Some((k.clone(), v, g.copied().unwrap_or(i64::MIN))),
        })
        .collect()
}

/// Replays `trace` and returns the allocator afterwards too, to inspect its state (the
/// summary at the end, the stats, a snapshot).
pub fn replay_into<D: ReplayDevice + 'static>(
    trace: &Trace,
    policy: &Policy,
    device: D,
    opts: &ReplayOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(ReplayReport, Allocator<D>), ReplayError> {
    replay_observed(trace, policy, device, opts, progress, &mut |_, _| {})
}

/// Replays `trace` like [`replay_into`], and calls `observe` after every op with the op and
/// the allocator: what a timeline of the replay (the report's memory over time) or a look
/// at its state at one op is made of. `observe` runs inside the timed replay, so keep it
/// cheap, or ignore the timings.
pub fn replay_observed<D: ReplayDevice + 'static>(
    trace: &Trace,
    policy: &Policy,
    device: D,
    opts: &ReplayOptions,
    progress: &mut dyn FnMut(u64, u64),
    observe: &mut dyn FnMut(&Step, &Allocator<D>),
) -> Result<(ReplayReport, Allocator<D>), ReplayError> {
    let schedule = schedule(trace);
    if opts.strict {
        if let Some(s) = schedule.skipped.first() {
            return Err(inconsistent(trace, s));
        }
    }
    // Addresses can be checked only where the device can hand out the trace's own.
    let verify =
        opts.verify && policy.kind == PolicyKind::Torch && device.preset_addresses(&schedule.segments);
    let (_, capacity) = device.mem_get_info().map_err(AllocError::from)?;
    let alloc = Allocator::with_policy(device.clone(), policy)?;
    if opts.record_history {
        alloc.record_history(true, usize::MAX);
    }
    let report = run(trace, &schedule, policy, &device, &alloc, capacity, verify, opts, progress, observe)?;
    Ok((report, alloc))
}
