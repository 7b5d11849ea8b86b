//! PyTorch snapshot pickles (`torch.cuda.memory._dump_snapshot()`): their `device_traces`.
//!
//! Snapshots share Python objects heavily (frames, interned strings), which `serde-pickle`
//! reports as "recursive structure found" unless told to replace such structures, and then
//! reads the shared values as `None`: the events read right, their frames do not, so the
//! frames come from `pickle_frames`, which shares them as the pickle does. Entries are read into typed
//! structs whose fields are all optional, then checked one by one, so that a missing field is
//! an error naming the entry rather than a silent zero.

use super::{io_error, pickle_frames, pickle_scan};
use crate::error::{Location, TraceError};
use crate::model::{Event, Trace};
use gpumem::{Action, StreamId};
use serde::Deserialize;
use std::io::{BufRead, Read};

#[derive(Deserialize)]
struct Snapshot {
    device_traces: Option<Vec<Vec<Entry>>>,
    segments: Option<Vec<serde::de::IgnoredAny>>,
}

#[derive(Deserialize)]
struct Entry {
    action: Option<String>,
    addr: Option<i64>,
    device_free: Option<i64>,
    size: Option<i64>,
    stream: Option<i64>,
    time_us: Option<i64>,
}

/// The largest (decompressed) pickle read. Snapshots of long runs reach a few hundred MB.
pub(super) const MAX_BYTES: u64 = 2 << 30;

/// What decoding a pickle may take: its objects, copied where the stream shares them. The
/// sample snapshot takes 44 times its size by the scan's estimate; three times that is
/// allowed, and never more than 16 GiB, whatever the pickle's size.
fn budget(len: usize) -> u64 {
    (len as u64).saturating_mul(128).saturating_add(64 << 20).min(16 << 30)
}

/// Reads the allocator events of the first device that has any in snapshot pickle `src`;
/// `path` is used in messages.
pub(super) fn parse<R: BufRead>(path: &str, src: R) -> Result<Trace, TraceError> {
    let mut data = Vec::new();
    src.take(MAX_BYTES + 1).read_to_end(&mut data).map_err(|e| io_error(path, Location::File, e))?;
    if data.len() as u64 > MAX_BYTES {
        return Err(TraceError::new(
            path,
            Location::File,
            format!("a pickle larger than {} GiB: too large to be read as a snapshot", MAX_BYTES >> 30),
        ));
    }
    // bound what decoding will take, and its nesting, before serde-pickle builds it
    pickle_scan::scan(&data, budget(data.len())).map_err(|(pos, m)| {
        TraceError::new(path, Location::Byte(pos as u64), format!("not a PyTorch snapshot pickle: {m}"))
    })?;
    let data = &data[..];
    let opts = serde_pickle::DeOptions::new().replace_recursive_structures();
    let snap: Snapshot = serde_pickle::from_slice(data, opts).map_err(|e| {
        let location = match &e {
            serde_pickle::Error::Eval(_, pos) => Location::Byte(*pos as u64),
            _ => Location::File,
        };
        TraceError::new(path, location, format!("not a PyTorch snapshot pickle: {e}"))
    })?;
    let Some(traces) = snap.device_traces else {
        let hint = if snap.segments.is_some() {
            "it has segments but no \"device_traces\": record it with torch.cuda.memory._record_memory_history() before the run"
        } else {
            "it has no \"device_traces\""
        };
        return Err(TraceError::new(path, Location::File, format!("not a PyTorch memory snapshot: {hint}")));
    };
    // One list per device; replay the first that has events.
    let entries = traces.into_iter().find(|t| !t.is_empty()).unwrap_or_default();
    let mut trace = Trace { path: path.to_string(), ..Default::default() };
    let mut all_times = true;
    for (i, e) in entries.into_iter().enumerate() {
        let bad = |m: String| TraceError::new(path, Location::Entry(i), m);
        let name = e.action.ok_or_else(|| bad("missing \"action\"".into()))?;
        let Some(action) = Action::from_name(&name) else {
            // annotations and other non-allocator entries carry no memory
            continue;
        };
        let field = |v: Option<i64>, f: &str| -> Result<u64, TraceError> {
            let v = v.ok_or_else(|| bad(format!("missing \"{f}\"")))?;
            u64::try_from(v).map_err(|_| bad(format!("negative \"{f}\": {v}")))
        };
        let addr =
            if action == Action::Oom { field(e.device_free, "device_free")? } else { field(e.addr, "addr")? };
        let size = field(e.size, "size")?;
        let stream = field(e.stream, "stream")?;
        trace.events.push(Event { action, addr, size, stream: StreamId(stream), origin: Location::Entry(i) });
        match e.time_us.and_then(|t| u64::try_from(t).ok()) {
            Some(t) if all_times => trace.times_us.push(t),
            _ => all_times = false,
        }
    }
    if let Some(frames) = pickle_frames::entry_frames(data, |a| Action::from_name(a).is_some()) {
        if frames.len() == trace.events.len() {
            trace.frames = frames;
        }
    }
    if !all_times {
        trace.times_us.clear();
    }
    Ok(trace)
}
