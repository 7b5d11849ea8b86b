//! Option strings (`GPUMEM_ALLOC_CONF`, `--policy P:OPTIONS`): parsed as options and as a
//! policy, and, when accepted, used to build an allocator that takes a few requests.
#![no_main]
use gpumem::{Allocator, AllocatorConfig, Policy, SimDevice, StreamId};
use libfuzzer_sys::fuzz_target;

fn exercise(alloc: &Allocator<SimDevice>) {
    let mut live = Vec::new();
    for size in [1, 512, (1 << 20) + 1, 25 << 20, 3 << 30] {
        if let Ok(p) = alloc.malloc(size, StreamId::DEFAULT) {
            live.push(p);
        }
    }
    alloc.check_stats().unwrap();
    for p in live {
        alloc.free(p).unwrap();
    }
    alloc.empty_cache().unwrap();
    assert_eq!(alloc.memory_reserved(), 0);
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(c) = AllocatorConfig::parse(s) {
        if let Ok(a) = Allocator::new(SimDevice::new(80 << 30), c) {
            exercise(&a);
        }
    }
    if let Ok(p) = Policy::parse(s) {
        let _ = p.to_string();
        if let Ok(a) = Allocator::with_policy(SimDevice::new(80 << 30), &p) {
            exercise(&a);
        }
    }
});
