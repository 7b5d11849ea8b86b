//! memory_summary() for a known scenario, line by line against the table worked out by hand
//! from PyTorch's rules.

use gpumem::{Allocator, SimDevice, StreamId};

const EXPECTED: &str = "\
|===========================================================================|
|                  PyTorch CUDA memory summary, device ID 0                 |
|---------------------------------------------------------------------------|
|            CUDA OOMs: 0            |        cudaMalloc retries: 0         |
|===========================================================================|
|        Metric         | Cur Usage  | Peak Usage | Tot Alloc  | Tot Freed  |
|---------------------------------------------------------------------------|
| Allocated memory      |   5120 KiB |   5121 KiB |   5121 KiB |   1024 B   |
|       from large pool |   5120 KiB |   5120 KiB |   5120 KiB |      0 B   |
|       from small pool |      0 KiB |      1 KiB |      1 KiB |   1024 B   |
|---------------------------------------------------------------------------|
| Active memory         |   5120 KiB |   5121 KiB |   5121 KiB |   1024 B   |
|       from large pool |   5120 KiB |   5120 KiB |   5120 KiB |      0 B   |
|       from small pool |      0 KiB |      1 KiB |      1 KiB |   1024 B   |
|---------------------------------------------------------------------------|
| Requested memory      |   5120 KiB |   5120 KiB |   5120 KiB |   1000 B   |
|       from large pool |   5120 KiB |   5120 KiB |   5120 KiB |      0 B   |
|       from small pool |      0 KiB |      0 KiB |      0 KiB |   1000 B   |
|---------------------------------------------------------------------------|
| GPU reserved memory   |  22528 KiB |  22528 KiB |  22528 KiB |      0 B   |
|       from large pool |  20480 KiB |  20480 KiB |  20480 KiB |      0 B   |
|       from small pool |   2048 KiB |   2048 KiB |   2048 KiB |      0 B   |
|---------------------------------------------------------------------------|
| Non-releasable memory |  15360 KiB |  17407 KiB |  17407 KiB |   2047 KiB |
|       from large pool |  15360 KiB |  15360 KiB |  15360 KiB |      0 KiB |
|       from small pool |      0 KiB |   2047 KiB |   2047 KiB |   2047 KiB |
|---------------------------------------------------------------------------|
| Allocations           |       1    |       2    |       2    |       1    |
|       from large pool |       1    |       1    |       1    |       0    |
|       from small pool |       0    |       1    |       1    |       1    |
|---------------------------------------------------------------------------|
| Active allocs         |       1    |       2    |       2    |       1    |
|       from large pool |       1    |       1    |       1    |       0    |
|       from small pool |       0    |       1    |       1    |       1    |
|---------------------------------------------------------------------------|
| GPU reserved segments |       2    |       2    |       2    |       0    |
|       from large pool |       1    |       1    |       1    |       0    |
|       from small pool |       1    |       1    |       1    |       0    |
|---------------------------------------------------------------------------|
| Non-releasable allocs |       1    |       2    |       2    |       1    |
|       from large pool |       1    |       1    |       1    |       0    |
|       from small pool |       0    |       1    |       1    |       1    |
|---------------------------------------------------------------------------|
| Oversize allocations  |       0    |       0    |       0    |       0    |
|---------------------------------------------------------------------------|
| Oversize GPU segments |       0    |       0    |       0    |       0    |
|===========================================================================|
";

#[test]
fn summary_of_a_known_scenario() {
    let a = Allocator::with_policy(SimDevice::default(), &"torch".parse().unwrap()).unwrap();
    // 1000 B: a 2 MiB small segment, split; 5 MiB: a 20 MiB segment, split; then free the small one
    let small = a.malloc(1000, StreamId::DEFAULT).unwrap();
    a.malloc(5 << 20, StreamId::DEFAULT).unwrap();
    a.free(small).unwrap();
    let got = a.memory_summary(false);
    for (i, (g, w)) in got.lines().zip(EXPECTED.lines()).enumerate() {
        assert_eq!(g, w, "line {}", i + 1);
    }
    assert_eq!(got, EXPECTED);
}

#[test]
fn abbreviated_summary_drops_the_pool_rows() {
    let a = Allocator::with_policy(SimDevice::default(), &"torch".parse().unwrap()).unwrap();
    a.malloc(5 << 20, StreamId::DEFAULT).unwrap();
    let s = a.memory_summary(true);
    assert!(!s.contains("from large pool"));
    assert_eq!(s.lines().count(), 6 + 9 * 2 + 2 * 2 + 1);
}
