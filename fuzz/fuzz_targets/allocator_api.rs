//! Arbitrary sequences of allocator calls on a simulated GPU, under every policy; the
//! interpreter and its checks live with the library's tests, which replay what it found.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/gpumem/tests/fuzz_ops/mod.rs"]
mod fuzz_ops;

fuzz_target!(|data: &[u8]| fuzz_ops::run(data));
