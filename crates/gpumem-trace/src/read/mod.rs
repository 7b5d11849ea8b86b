//! Reading a trace from any supported format, told apart by its content.
//!
//! Each format has its own module that turns the (decompressed) bytes into a
//! [`Trace`]; this one only decompresses, detects and dispatches, and checks what holds for
//! every format (not empty, has allocator events).

mod jsonl;
mod pickle;
mod rmm;

use crate::error::{Location, TraceError};
use crate::model::{Format, Trace};
use std::io::Read;

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
        Some(Format::JsonLines) => jsonl::parse(path, &data)?,
        Some(Format::SnapshotPickle) => pickle::parse(path, &data)?,
        Some(Format::RmmCsv) => rmm::parse(path, &data)?,
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
