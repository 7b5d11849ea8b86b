//! Arbitrary bytes through format detection and gzip, as `gpumem replay FILE` reads them.
#![no_main]
use gpumem_trace::read_trace_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = read_trace_bytes("fuzz", data) {
        let m = e.to_string();
        assert!(!m.contains('\n') && !m.chars().any(char::is_control), "{m:?}");
    }
});
