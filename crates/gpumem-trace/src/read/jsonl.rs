//! Reading the JSON-lines trace format: `{"a": action, "p": address, "s": size, "t": stream, "us": time}`
//! per line; an optional last line `{"summary": {...}, "stats": {...}}`.

use super::{io_error, Limited};
use crate::error::{quote, Location, TraceError};
use crate::model::{Event, Trace};
use gpumem::{Action, StreamId};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};

#[derive(Deserialize)]
struct Line {
    a: Option<String>,
    p: Option<serde_json::Value>,
    s: Option<serde_json::Value>,
    t: Option<serde_json::Value>,
    us: Option<serde_json::Value>,
    stats: Option<BTreeMap<String, serde_json::Value>>,
    #[allow(dead_code)]
    summary: Option<serde_json::Value>,
}

fn unsigned(v: &Option<serde_json::Value>, field: &str) -> Result<u64, String> {
    let not = |v: &dyn std::fmt::Display| {
        format!("field \"{field}\" must be a non-negative integer, not {}", cut(&v.to_string()))
    };
    match v {
        None => Err(format!("missing field \"{field}\"")),
        Some(serde_json::Value::Number(n)) => n.as_u64().ok_or_else(|| not(n)),
        Some(other) => Err(not(other)),
    }
}

/// A JSON value as the file has it, for a message: cut short where it is long.
fn cut(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Reads the events (and the recorded run's stats, where the last line has them) of
/// JSON-lines `src`, line by line, stopping at the first bad line; `path` is used in
/// messages.
pub(super) fn parse<R: BufRead>(path: &str, src: Limited<'_, R>) -> Result<Trace, TraceError> {
    let allowance = src.allowance();
    let first = src.lines_skipped;
    let mut src = BufReader::new(src);
    let mut trace = Trace { path: path.to_string(), ..Default::default() };
    let (mut buf, mut offset) = (Vec::new(), 0u64);
    let mut all_times = true;
    for n in first + 1.. {
        Limited::<R>::allow(&allowance, n, offset);
        buf.clear();
        let len = src.read_until(b'\n', &mut buf).map_err(|e| io_error(path, Location::Line(n), e))?;
        if len == 0 {
            break;
        }
        offset += len as u64;
        let bad = |m: String| TraceError::new(path, Location::Line(n), m);
        let line = std::str::from_utf8(&buf)
            .map_err(|e| bad(format!("not UTF-8 text (at byte {} of the line)", e.valid_up_to())))?
            .trim();
        if line.is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if let Some(stats) = l.stats {
            let mut m = BTreeMap::new();
            for (k, v) in stats {
                if let Some(x) = v.as_i64() {
                    m.insert(k, x);
                }
            }
            trace.stats = Some(m);
            continue;
        }
        let Some(a) = l.a else {
            return Err(bad("missing field \"a\" (the action)".into()));
        };
        let action = Action::from_name(&a).ok_or_else(|| bad(format!("unknown action {}", quote(&a))))?;
        let addr = unsigned(&l.p, "p").map_err(bad)?;
        let size = unsigned(&l.s, "s").map_err(bad)?;
        let stream = match &l.t {
            None => 0,
            Some(_) => unsigned(&l.t, "t").map_err(bad)?,
        };
        trace.events.push(Event { action, addr, size, stream: StreamId(stream), origin: Location::Line(n) });
        // times are optional: kept where every event has one
        match l.us.as_ref().and_then(|v| v.as_u64()) {
            Some(t) if all_times => trace.times_us.push(t),
            _ => all_times = false,
        }
    }
    if !all_times {
        trace.times_us.clear();
    }
    Ok(trace)
}
