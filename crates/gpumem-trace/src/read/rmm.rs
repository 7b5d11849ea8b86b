//! RAPIDS RMM's logging adaptor CSV: `Thread,Time,Action,Pointer,Size,Stream`, with actions
//! `allocate`, `free` and `allocate failure`, hex pointers and hex streams.
//!
//! The `csv` crate splits the records (quoted fields, CRLF line ends); the columns are then
//! checked here one by one, so that a bad field is an error naming its line and column
//! rather than a generic deserialization failure.

use super::{io_error, Limited};
use crate::error::{quote, Location, TraceError};
use crate::model::{Event, Trace};
use gpumem::{Action, StreamId};
use std::io::BufRead;

/// The columns RMM writes, in order.
const COLUMNS: usize = 6;

fn hex(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "(nil)" || s == "0" || s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// Reads the events of RMM log `data`; `path` is used in messages.
pub(super) fn parse<R: BufRead>(path: &str, src: Limited<'_, R>) -> Result<Trace, TraceError> {
    let allowance = src.allowance();
    let first = src.lines_skipped;
    let mut trace = Trace { path: path.to_string(), ..Default::default() };
    // `has_headers` skips the header line, already checked by detection; `flexible` leaves
    // the column count to the check below, whose message says what RMM writes
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(src);
    let mut record = csv::StringRecord::new();
    // the header first (already checked by detection), so that positions name the records
    if let Err(e) = reader.headers() {
        return Err(TraceError::new(path, Location::Line(first + 1), format!("malformed CSV header: {e}")));
    }
    loop {
        let at = first + reader.position().line() as usize;
        Limited::<R>::allow(&allowance, at, reader.position().byte());
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                let n = e.position().map_or(at, |p| first + p.line() as usize);
                let msg = e.to_string();
                return Err(match e.into_kind() {
                    csv::ErrorKind::Io(e) => io_error(path, Location::Line(n), e),
                    csv::ErrorKind::Utf8 { err, .. } => TraceError::new(
                        path,
                        Location::Line(n),
                        format!("not UTF-8 text (in field {})", err.field() + 1),
                    ),
                    _ => TraceError::new(path, Location::Line(n), format!("malformed CSV: {msg}")),
                });
            }
        }
        // a record's position is the line it starts on (1-based, the header being line 1)
        let n = record.position().map_or(at, |p| first + p.line() as usize);
        let bad = |m: String| TraceError::new(path, Location::Line(n), m);
        // the csv crate skips empty lines; a line of blanks is one blank field
        if record.len() == 1 && record[0].trim().is_empty() {
            continue;
        }
        if record.len() != COLUMNS {
            return Err(bad(format!(
                "expected {COLUMNS} columns (Thread,Time,Action,Pointer,Size,Stream), found {}",
                record.len()
            )));
        }
        let action = match record[2].trim() {
            "allocate" => Action::Alloc,
            "free" => Action::FreeRequested,
            "allocate failure" => Action::Oom,
            other => return Err(bad(format!("unknown action {}", quote(other)))),
        };
        let addr = hex(&record[3]).ok_or_else(|| bad(format!("bad pointer {}", quote(&record[3]))))?;
        let size = record[4].trim().parse::<u64>().map_err(|_| {
            bad(format!("bad size {} (a non-negative integer is expected)", quote(&record[4])))
        })?;
        let stream = hex(&record[5]).ok_or_else(|| bad(format!("bad stream {}", quote(&record[5]))))?;
        trace.events.push(Event { action, addr, size, stream: StreamId(stream), origin: Location::Line(n) });
        if action == Action::FreeRequested {
            // RMM frees at once: the free is also its completion
            trace.events.push(Event {
                action: Action::FreeCompleted,
                addr,
                size,
                stream: StreamId(stream),
                origin: Location::Line(n),
            });
        }
    }
    Ok(trace)
}
