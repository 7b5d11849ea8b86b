//! The in-memory form of a trace: plain data that the readers fill in, the writers and the
//! schedule read, and nothing here reads or writes a file (so every module can use it and
//! it uses none of them).

use crate::error::Location;
use gpumem::{Action, Frames, StreamId};
use std::collections::BTreeMap;

/// One allocator event of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub action: Action,
    /// The address (for `Oom`, the device's free bytes).
    pub addr: u64,
    /// For allocs and frees the requested size; for segments the segment size.
    pub size: u64,
    /// The stream.
    pub stream: StreamId,
    /// Where the event came from in the file (a line, or an entry index).
    pub origin: Location,
}

/// The formats gpumem reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// gpumem's JSON lines (`{"a": ..., "p": ..., "s": ..., "t": ...}`), plain or gzip'd.
    JsonLines,
    /// A `torch.cuda.memory._dump_snapshot()` pickle (its `device_traces`).
    SnapshotPickle,
    /// RAPIDS RMM's logging adaptor CSV.
    RmmCsv,
}

impl Format {
    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Format::JsonLines => "JSON lines",
            Format::SnapshotPickle => "PyTorch snapshot pickle",
            Format::RmmCsv => "RMM log CSV",
        }
    }
}

/// A trace: the events, in order, and what the file says of the recorded run.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// The file it was read from.
    pub path: String,
    /// The events in recorded order.
    pub events: Vec<Event>,
    /// The recorded run's own `memory_stats()`, where the file has them.
    pub stats: Option<BTreeMap<String, i64>>,
    /// The call stack of each event (by its index in `events`), innermost first, where the
    /// file has stacks (PyTorch snapshots recorded with them, and gpumem's own); empty where
    /// it has none.
    pub frames: Vec<Frames>,
    /// The time of each event (by its index in `events`) in microseconds, as recorded; empty
    /// where the file has no times.
    pub times_us: Vec<u64>,
}

impl Trace {
    /// The call stack of event `i`, if the trace has stacks.
    pub fn frames_of(&self, i: usize) -> Option<&Frames> {
        self.frames.get(i).filter(|f| !f.is_empty())
    }

    /// The time of event `i` in microseconds, if the trace has times.
    pub fn time_of(&self, i: usize) -> Option<u64> {
        self.times_us.get(i).copied()
    }

    /// The file's base name.
    pub fn name(&self) -> String {
        std::path::Path::new(&self.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.clone())
    }
}
