//! RAPIDS RMM's logging adaptor CSV: `Thread,Time,Action,Pointer,Size,Stream`, with actions
//! `allocate`, `free` and `allocate failure`, hex pointers and hex streams.

use crate::error::{Location, TraceError};
use crate::model::{Event, Trace};
use gpumem::{Action, StreamId};

fn hex(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "(nil)" || s == "0" || s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// Reads the events of RMM log `data`; `path` is used in messages.
pub(super) fn parse(path: &str, data: &[u8]) -> Result<Trace, TraceError> {
    let text = std::str::from_utf8(data)
        .map_err(|e| TraceError::new(path, Location::Byte(e.valid_up_to() as u64), "not UTF-8 text"))?;
    let mut trace = Trace { path: path.to_string(), ..Default::default() };
    let mut lines = text.lines().enumerate();
    lines.next(); // the header, already checked by detection
    for (i, line) in lines {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| TraceError::new(path, Location::Line(n), m);
        let cols: Vec<&str> = line.split(',').collect();
        if cols.len() != 6 {
            return Err(bad(format!(
                "expected 6 columns (Thread,Time,Action,Pointer,Size,Stream), found {}",
                cols.len()
            )));
        }
        let action = match cols[2].trim() {
            "allocate" => Action::Alloc,
            "free" => Action::FreeRequested,
            "allocate failure" => Action::Oom,
            other => return Err(bad(format!("unknown action \"{other}\""))),
        };
        let addr = hex(cols[3]).ok_or_else(|| bad(format!("bad pointer \"{}\"", cols[3])))?;
        let size = cols[4]
            .trim()
            .parse::<u64>()
            .map_err(|_| bad(format!("bad size \"{}\" (a non-negative integer is expected)", cols[4])))?;
        let stream = hex(cols[5]).ok_or_else(|| bad(format!("bad stream \"{}\"", cols[5])))?;
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
