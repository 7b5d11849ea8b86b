//! The in-memory form of a trace, and reading one from any supported format.

use crate::error::{Location, TraceError};
use gpumem::{Action, StreamId};
use std::collections::BTreeMap;
use std::io::Read;

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
}

impl Trace {
    /// The file's base name.
    pub fn name(&self) -> String {
        std::path::Path::new(&self.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.clone())
    }
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Decides the format from the first bytes of the (decompressed) content.
pub fn detect(bytes: &[u8]) -> Option<Format> {
    let text_start = bytes.iter().position(|b| !b.is_ascii_whitespace()).map(|i| &bytes[i..]);
    match bytes.first() {
        Some(0x80) => Some(Format::SnapshotPickle),
        _ => match text_start {
            Some(t) if t.starts_with(b"{") => Some(Format::JsonLines),
            Some(t) if t.starts_with(b"Thread,Time,Action,Pointer,Size,Stream") => Some(Format::RmmCsv),
            _ => None,
        },
    }
}

/// Reads the file at `path`, whatever its format (detected from its content, gzip'd or not).
pub fn read_trace(path: &str) -> Result<Trace, TraceError> {
    let raw = std::fs::read(path)
        .map_err(|e| TraceError::new(path, Location::File, format!("cannot read: {e}")))?;
    read_trace_bytes(path, &raw)
}

/// Reads a trace from bytes; `path` is used in messages.
pub fn read_trace_bytes(path: &str, raw: &[u8]) -> Result<Trace, TraceError> {
    let data = if raw.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::new();
        let mut gz = flate2::read::MultiGzDecoder::new(raw);
        if let Err(e) = gz.read_to_end(&mut out) {
            return Err(TraceError::new(
                path,
                Location::Byte(out.len() as u64),
                format!(
                    "broken gzip data ({e}) after {} decompressed bytes; is the file truncated?",
                    out.len()
                ),
            ));
        }
        out
    } else {
        raw.to_vec()
    };
    if data.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(TraceError::new(path, Location::File, "the file is empty"));
    }
    let trace = match detect(&data) {
        Some(Format::JsonLines) => crate::jsonl::parse(path, &data)?,
        Some(Format::SnapshotPickle) => crate::pickle::parse(path, &data)?,
        Some(Format::RmmCsv) => crate::rmm::parse(path, &data)?,
        None => {
            return Err(TraceError::new(
                path,
                Location::Byte(0),
                "not a trace: expected JSON lines, a PyTorch snapshot pickle, or an RMM log CSV",
            ))
        }
    };
    if trace.events.is_empty() {
        return Err(TraceError::new(path, Location::File, "the trace has no allocator events"));
    }
    Ok(trace)
}
