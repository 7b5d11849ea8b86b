//! The SnapshotPickle reader alone, on arbitrary bytes: it must return a trace or an error, never
//! panic, hang or take memory out of proportion to its input.
#![no_main]
use gpumem_trace::{read_trace_as, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = read_trace_as("fuzz", Format::SnapshotPickle, data) {
        // messages are one line of printable text, however hostile the input
        let m = e.to_string();
        assert!(!m.contains('\n') && !m.chars().any(char::is_control), "{m:?}");
    }
});
