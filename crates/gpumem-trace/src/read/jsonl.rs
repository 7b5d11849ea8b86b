//! Reading the JSON-lines trace format: `{"a": action, "p": address, "s": size, "t": stream, "us": time}`
//! per line; an optional last line `{"summary": {...}, "stats": {...}}`.

use crate::error::{Location, TraceError};
use crate::model::{Event, Trace};
use gpumem::{Action, StreamId};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Line {
    a: Option<String>,
    p: Option<serde_json::Value>,
    s: Option<serde_json::Value>,
    t: Option<serde_json::Value>,
    #[allow(dead_code)]
    us: Option<serde_json::Value>,
    stats: Option<BTreeMap<String, serde_json::Value>>,
    #[allow(dead_code)]
    summary: Option<serde_json::Value>,
}

fn unsigned(v: &Option<serde_json::Value>, field: &str) -> Result<u64, String> {
    match v {
        None => Err(format!("missing field \"{field}\"")),
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().ok_or_else(|| format!("field \"{field}\" must be a non-negative integer, not {n}"))
        }
        Some(other) => Err(format!("field \"{field}\" must be a non-negative integer, not {other}")),
    }
}

/// Reads the events (and the recorded run's stats, where the last line has them) of
/// JSON-lines `data`; `path` is used in messages.
pub(super) fn parse(path: &str, data: &[u8]) -> Result<Trace, TraceError> {
    let text = std::str::from_utf8(data)
        .map_err(|e| TraceError::new(path, Location::Byte(e.valid_up_to() as u64), "not UTF-8 text"))?;
    let mut trace = Trace { path: path.to_string(), ..Default::default() };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |m: String| TraceError::new(path, Location::Line(n), m);
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
        let action = Action::from_name(&a).ok_or_else(|| bad(format!("unknown action \"{a}\"")))?;
        let addr = unsigned(&l.p, "p").map_err(bad)?;
        let size = unsigned(&l.s, "s").map_err(bad)?;
        let stream = match &l.t {
            None => 0,
            Some(_) => unsigned(&l.t, "t").map_err(bad)?,
        };
        trace.events.push(Event { action, addr, size, stream: StreamId(stream), origin: Location::Line(n) });
    }
    Ok(trace)
}
