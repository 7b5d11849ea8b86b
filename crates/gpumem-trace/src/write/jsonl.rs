//! Writing the JSON-lines trace format that `read::jsonl` reads: one `{"a", "p", "s", "t"}`
//! object per event.

use crate::model::Event;
use serde::Serialize;
use std::io::Write;

#[derive(Serialize)]
struct OutLine {
    a: &'static str,
    p: u64,
    s: u64,
    t: u64,
}

/// Writes events as JSON lines (plain; pipe through gzip for `.gz`).
pub fn write_jsonl(events: &[Event], mut out: impl Write) -> std::io::Result<()> {
    for e in events {
        let line = OutLine { a: e.action.name(), p: e.addr, s: e.size, t: e.stream.0 };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}
