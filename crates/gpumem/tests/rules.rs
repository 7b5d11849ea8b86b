//! Each rule of PyTorch's allocator, pinned to the numbers PyTorch gives.

use gpumem::{AllocError, Allocator, AllocatorConfig, Device, PolicyKind, SimDevice, StreamId};

const MIB: u64 = 1 << 20;
const S0: StreamId = StreamId(0);

fn setup(conf: &str) -> (SimDevice, Allocator<SimDevice>) {
    setup_cap(conf, 80 << 30)
}

/// The options `conf`, under PyTorch's algorithm unless they name another policy (the
/// library's default is the gpumem policy; these tests are about PyTorch's).
fn torch_config(conf: &str) -> AllocatorConfig {
    let mut c = AllocatorConfig::parse(conf).unwrap();
    c.settle_policy(PolicyKind::Torch).unwrap();
    c
}

fn setup_cap(conf: &str, cap: u64) -> (SimDevice, Allocator<SimDevice>) {
    let sim = SimDevice::new(cap);
    let a = Allocator::new(sim.clone(), torch_config(conf)).unwrap();
    (sim, a)
}

#[test]
fn one_mib_plus_one_takes_a_20_mib_segment() {
    let (sim, a) = setup("");
    let p = a.malloc(MIB + 1, S0).unwrap();
    assert_eq!(a.memory_reserved(), 20 * MIB);
    assert_eq!(sim.live_segments(), vec![(p, 20 * MIB)]);
    // rounded to 512 B; the rest of the segment stays cached as a split block
    assert_eq!(a.memory_allocated(), MIB + 512);
    let s = a.stats();
    assert_eq!(s.inactive_split.all().current, 1);
    assert_eq!(s.inactive_split_bytes.all().current as u64, 20 * MIB - (MIB + 512));
    a.check_stats().unwrap();
}

#[test]
fn ten_mib_takes_a_ten_mib_segment() {
    let (_, a) = setup("");
    a.malloc(10 * MIB, S0).unwrap();
    assert_eq!(a.memory_reserved(), 10 * MIB);
    a.malloc(10 * MIB + 1, S0).unwrap();
    assert_eq!(a.memory_reserved(), 22 * MIB);
}

#[test]
fn small_requests_share_2_mib_segments() {
    let (_, a) = setup("");
    let p = a.malloc(1, S0).unwrap();
    let q = a.malloc(1000, S0).unwrap();
    assert_eq!(q, p + 512);
    assert_eq!(a.memory_reserved(), 2 * MIB);
    assert_eq!(a.memory_allocated(), 512 + 1024);
    assert_eq!(a.stats().allocated_bytes.small().current, 1536);
    a.malloc(MIB, S0).unwrap();
    assert_eq!(a.memory_reserved(), 2 * MIB);
    a.check_stats().unwrap();
}

#[test]
fn best_fit_is_smallest_then_lowest_address() {
    let (_, a) = setup("");
    let big = a.malloc(30 * MIB, S0).unwrap();
    let mid = a.malloc(12 * MIB, S0).unwrap();
    let _keep = a.malloc(12 * MIB, S0).unwrap();
    a.free(big).unwrap();
    a.free(mid).unwrap();
    // 11 MiB fits both; the 12 MiB block is the smaller one
    let p = a.malloc(11 * MIB, S0).unwrap();
    assert_eq!(p, mid);
    a.check_stats().unwrap();
}

#[test]
fn large_blocks_split_only_with_more_than_1_mib_left() {
    let (_, a) = setup("");
    let p = a.malloc(12 * MIB, S0).unwrap();
    a.free(p).unwrap();
    // 12 MiB - 11.5 MiB leaves 0.5 MiB: not split, the whole block is handed out
    let q = a.malloc(11 * MIB + MIB / 2, S0).unwrap();
    assert_eq!(q, p);
    assert_eq!(a.memory_allocated(), 12 * MIB);
    a.free(q).unwrap();
    // 12 - 10 leaves 2 MiB: split
    let r = a.malloc(10 * MIB, S0).unwrap();
    assert_eq!(a.memory_allocated(), 10 * MIB);
    assert_eq!(r, p);
    a.check_stats().unwrap();
}

#[test]
fn freed_neighbours_coalesce() {
    let (_, a) = setup("");
    let x = a.malloc(4 * MIB, S0).unwrap();
    let y = a.malloc(4 * MIB, S0).unwrap();
    let z = a.malloc(4 * MIB, S0).unwrap();
    assert_eq!((y, z), (x + 4 * MIB, x + 8 * MIB));
    a.free(x).unwrap();
    a.free(z).unwrap();
    assert_eq!(a.stats().inactive_split.all().current, 2);
    a.free(y).unwrap();
    let s = a.stats();
    assert_eq!(s.inactive_split.all().current, 0);
    let snap = a.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].blocks.len(), 1);
    assert_eq!(snap[0].blocks[0].size, 20 * MIB);
    a.check_stats().unwrap();
}

#[test]
fn live_block_pins_its_segment_through_empty_cache() {
    let (sim, a) = setup("");
    let p = a.malloc(2 * MIB, S0).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 20 * MIB);
    let s = a.stats();
    assert_eq!(s.inactive_split_bytes.all().current as u64, 18 * MIB, "non-releasable");
    assert_eq!(sim.live_segments().len(), 1);
    a.free(p).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
    assert_eq!(sim.used(), 0);
    assert_eq!(a.stats().num_device_free, 1);
}

#[test]
fn max_split_size_keeps_oversize_blocks_whole() {
    let (_, a) = setup("max_split_size_mb:64");
    let big = a.malloc(100 * MIB, S0).unwrap();
    a.free(big).unwrap();
    // a normal request never takes an oversize block
    let small = a.malloc(10 * MIB, S0).unwrap();
    assert_ne!(small, big);
    assert_eq!(a.memory_reserved(), 110 * MIB);
    // an oversize request takes it only within 20 MiB of its size
    let p = a.malloc(85 * MIB, S0).unwrap();
    assert_eq!(p, big);
    assert_eq!(a.memory_allocated(), 110 * MIB, "oversize blocks are not split");
    let s = a.stats();
    assert_eq!(s.oversize_allocations.current, 1);
    assert_eq!(s.oversize_segments.current, 1);
    a.free(p).unwrap();
    let q = a.malloc(80 * MIB, S0).unwrap();
    assert_ne!(q, big, "100 MiB >= 80 MiB + 20 MiB: too much slack");
    a.check_stats().unwrap();
}

#[test]
fn oom_frees_oversize_blocks_then_everything_then_reports() {
    let (_, a) = setup_cap("max_split_size_mb:64", 300 * MIB);
    let big = a.malloc(100 * MIB, S0).unwrap();
    let _live = a.malloc(150 * MIB, S0).unwrap();
    a.free(big).unwrap();
    // 60 MiB may not take the cached oversize block and does not fit beside it: step 1 frees
    // that one block (it is at least max_split_size) and the retry succeeds
    let _p = a.malloc(60 * MIB, S0).unwrap();
    let s = a.stats();
    assert_eq!((s.num_device_free, s.num_alloc_retries), (1, 0));
    assert_eq!(a.memory_reserved(), 210 * MIB);
    let c = a.malloc(30 * MIB, S0).unwrap();
    a.free(c).unwrap();
    // 70 MiB: no oversize block to free, so step 2 flushes the cached 30 MiB and retries
    let q = a.malloc(70 * MIB, S0).unwrap();
    let s = a.stats();
    assert_eq!((s.num_device_free, s.num_alloc_retries, s.num_sync_all_streams), (2, 1, 1));
    assert_eq!(a.memory_reserved(), 280 * MIB);
    let e = a.malloc(100 * MIB, S0).unwrap_err();
    let AllocError::OutOfMemory(oom) = &e else { panic!("expected out of memory, got {e}") };
    assert_eq!(oom.requested, 100 * MIB);
    assert_eq!(oom.allocated, 280 * MIB);
    assert_eq!(oom.free, 20 * MIB);
    let msg = e.to_string();
    assert!(msg.contains("100.00 MiB") && msg.contains("20.00 MiB is free"), "{msg}");
    assert_eq!(a.stats().num_ooms, 1);
    // it keeps working
    a.free(q).unwrap();
    let r = a.malloc(60 * MIB, S0).unwrap();
    a.free(r).unwrap();
    a.check_stats().unwrap();
}

#[test]
fn oom_message_points_at_fragmentation() {
    let (_, a) = setup_cap("", 100 * MIB);
    // 20 blocks of 5 MiB fill five 20 MiB segments, four to a segment
    let ps: Vec<u64> = (0..20).map(|_| a.malloc(5 * MIB, S0).unwrap()).collect();
    assert_eq!(a.memory_reserved(), 100 * MIB);
    // keep one block per segment: 75 MiB is free but pinned in pieces of 15 MiB
    for (i, p) in ps.iter().enumerate() {
        if i % 4 != 0 {
            a.free(*p).unwrap();
        }
    }
    let e = a.malloc(40 * MIB, S0).unwrap_err();
    let AllocError::OutOfMemory(oom) = &e else { panic!() };
    assert_eq!(oom.reserved_unallocated(), 75 * MIB);
    assert_eq!(oom.non_releasable, 75 * MIB);
    assert_eq!(oom.largest_free_block, 15 * MIB);
    let msg = e.to_string();
    assert!(msg.contains("expandable_segments:True"), "{msg}");
    assert!(msg.contains("reserved but unallocated"), "{msg}");
}

#[test]
fn misuse_is_an_error_that_changes_nothing() {
    let (_, a) = setup("");
    let p = a.malloc(MIB, S0).unwrap();
    let before = a.memory_stats();
    assert!(matches!(a.free(p + 512), Err(AllocError::InvalidPointer(_))));
    assert!(matches!(a.free(0xdead_beef), Err(AllocError::InvalidPointer(_))));
    assert!(a.record_stream(0x1234, StreamId(7)).is_err());
    assert_eq!(a.memory_stats(), before);
    a.free(p).unwrap();
    let after = a.memory_stats();
    assert!(matches!(a.free(p), Err(AllocError::InvalidPointer(_))), "double free");
    assert_eq!(a.memory_stats(), after);
    assert!(matches!(a.malloc(1 << 62, S0), Err(AllocError::TooLarge(_))));
    assert_eq!(a.malloc(0, S0).unwrap(), 0);
    a.free(0).unwrap();
    a.check_stats().unwrap();
}

#[test]
fn streams_have_their_own_free_lists() {
    let (_, a) = setup("");
    let p = a.malloc(MIB, StreamId(1)).unwrap();
    a.free(p).unwrap();
    let q = a.malloc(MIB, StreamId(2)).unwrap();
    assert_ne!(q, p);
    assert_eq!(a.memory_reserved(), 4 * MIB);
    let r = a.malloc(MIB, StreamId(1)).unwrap();
    assert_eq!(r, p);
}

#[test]
fn record_stream_delays_reuse_until_the_event_completes() {
    let (sim, a) = setup("");
    let side = StreamId(9);
    let p = a.malloc(8 * MIB, S0).unwrap();
    a.record_stream(p, side).unwrap();
    a.free(p).unwrap();
    let s = a.stats();
    assert_eq!(s.allocated_bytes.all().current, 0);
    assert_eq!(s.active_bytes.all().current as u64, 8 * MIB, "pending free stays active");
    assert_eq!(a.snapshot()[0].blocks[0].state, gpumem::BlockState::ActivePendingFree);
    a.check_stats().unwrap();
    let q = a.malloc(8 * MIB, S0).unwrap();
    assert_ne!(q, p, "the side stream may still read p");
    sim.complete_stream(side);
    a.free(q).unwrap();
    let r = a.malloc(8 * MIB, S0).unwrap();
    assert_eq!(r, p, "after the event completes, p is reused");
    assert_eq!(a.stats().active_bytes.all().current as u64, 8 * MIB);
    a.check_stats().unwrap();
}

#[test]
fn empty_cache_waits_for_pending_frees() {
    let (sim, a) = setup("");
    let p = a.malloc(8 * MIB, S0).unwrap();
    a.record_stream(p, StreamId(3)).unwrap();
    a.free(p).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
    assert_eq!(a.stats().num_sync_all_streams, 1);
    assert_eq!(sim.used(), 0);
}

#[test]
fn memory_fraction_caps_reserved_memory() {
    let (_, a) = setup_cap("", 1000 * MIB);
    a.set_per_process_memory_fraction(0.5).unwrap();
    let p = a.malloc(400 * MIB, S0).unwrap();
    let e = a.malloc(200 * MIB, S0).unwrap_err();
    let AllocError::OutOfMemory(oom) = &e else { panic!() };
    assert_eq!(oom.allowed, Some(500 * MIB));
    assert!(e.to_string().contains("fraction"), "{e}");
    a.free(p).unwrap();
    assert!(a.set_per_process_memory_fraction(1.5).is_err());
}

#[test]
fn garbage_collection_frees_old_cached_segments() {
    let (sim, a) = setup_cap("garbage_collection_threshold:0.5", 1000 * MIB);
    a.set_per_process_memory_fraction(1.0).unwrap();
    let x = a.malloc(300 * MIB, S0).unwrap();
    a.free(x).unwrap();
    // 350 MiB does not fit the cached 300 MiB; 300 MiB reserved is under the 500 MiB threshold
    let y = a.malloc(350 * MIB, S0).unwrap();
    a.free(y).unwrap();
    assert_eq!(a.memory_reserved(), 650 * MIB);
    // now 650 > 500: before allocating, the GC frees the blocks older than the mean age
    // (x, cached two searches ago; y only one), without any retry
    let z = a.malloc(400 * MIB, S0).unwrap();
    assert_eq!(a.memory_reserved(), 750 * MIB);
    let s = a.stats();
    assert_eq!((s.num_device_free, s.num_alloc_retries), (1, 0));
    assert_eq!(a.snapshot().iter().map(|s| s.total_size).collect::<Vec<_>>().len(), 2);
    a.free(z).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(sim.used(), 0);
}

#[test]
fn roundup_power2_divisions_round_requests() {
    let (_, a) = setup("roundup_power2_divisions:4");
    a.malloc(5 * MIB + 1, S0).unwrap();
    assert_eq!(a.memory_allocated(), 6 * MIB);
}

#[test]
fn expandable_segments_grow_by_pages_and_unmap_free_pages() {
    let (sim, a) = setup("expandable_segments:True");
    let p = a.malloc(30 * MIB, S0).unwrap();
    // one 40 MiB mapping (two 20 MiB pages), in a reserved range
    assert_eq!(a.memory_reserved(), 40 * MIB);
    assert_eq!(sim.live_mappings().len(), 2);
    assert_eq!(sim.live_segments().len(), 0);
    let q = a.malloc(30 * MIB, S0).unwrap();
    assert_eq!(q, p + 30 * MIB, "the segment grows in place");
    assert_eq!(a.memory_reserved(), 60 * MIB);
    let s = a.stats();
    assert_eq!(s.segment.all().current, 0, "expandable memory is not counted as segments");
    assert_eq!(s.num_device_alloc, 2);
    a.check_stats().unwrap();
    a.free(p).unwrap();
    a.empty_cache().unwrap();
    // p covered [0, 30): page 0 is wholly free and is unmapped; page 1 still holds q's start
    assert_eq!(a.memory_reserved(), 40 * MIB);
    a.check_stats().unwrap();
    a.free(q).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
    assert!(sim.live_mappings().is_empty());
    assert!(sim.live_reservations().is_empty());
    assert_eq!(sim.used(), 0);
}

#[test]
fn history_records_pytorch_actions() {
    let (_, a) = setup("");
    a.record_history(true, 100);
    let p = a.malloc(100, S0).unwrap();
    a.free(p).unwrap();
    a.empty_cache().unwrap();
    let names: Vec<_> = a.history().iter().map(|e| e.action.name()).collect();
    assert_eq!(names, ["segment_alloc", "alloc", "free_requested", "free_completed", "segment_free"]);
}

#[test]
fn reset_peak_and_accumulated() {
    let (_, a) = setup("");
    let p = a.malloc(10 * MIB, S0).unwrap();
    a.free(p).unwrap();
    assert_eq!(a.max_memory_allocated(), 10 * MIB);
    a.reset_peak_memory_stats();
    assert_eq!(a.max_memory_allocated(), 0);
    assert_eq!(a.max_memory_reserved(), 10 * MIB);
    a.reset_accumulated_memory_stats();
    let m = a.memory_stats();
    assert_eq!(m["allocated_bytes.all.allocated"], 0);
    assert_eq!(m["num_device_alloc"], 0);
    assert_eq!(m["reserved_bytes.all.current"], (10 * MIB) as i64);
}

#[test]
fn the_pytorch_tutorial_on_the_simulated_device() {
    let (sim, a) = setup("");
    let (free0, _) = sim.mem_get_info().unwrap();
    // 1. x = torch.randn(10000, 10000, device='cuda')
    // 400,000,000 bytes take a segment rounded to 2 MiB, 400,556,032 bytes; the 556,032-byte
    // tail is under 1 MiB, so PyTorch does not split it off and counts it as allocated too.
    // (torch.cuda.memory_allocated() prints 400556032 here.)
    let x = a.malloc(10000 * 10000 * 4, S0).unwrap();
    assert_eq!(a.stats().requested_bytes.all().current, 400_000_000);
    assert_eq!(a.memory_allocated(), 400_556_032);
    assert_eq!(a.memory_reserved(), 400_556_032);
    // 2. empty_cache while x lives frees nothing
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 400_556_032);
    assert_eq!(sim.mem_get_info().unwrap().0, free0 - 400_556_032);
    // 3. del x: allocated 0, reserved stays
    a.free(x).unwrap();
    assert_eq!(a.memory_allocated(), 0);
    assert_eq!(a.memory_reserved(), 400_556_032);
    // 4. empty_cache: reserved 0, the device's free memory is back
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
    assert_eq!(sim.mem_get_info().unwrap().0, free0);
}

#[test]
fn dropping_an_allocator_gives_everything_back() {
    for conf in ["", "expandable_segments:True", "policy:gpumem"] {
        let (sim, a) = setup(conf);
        let p = a.malloc(30 * MIB, S0).unwrap();
        a.record_stream(p, StreamId(5)).unwrap();
        a.free(p).unwrap();
        a.malloc(3 * MIB, S0).unwrap();
        a.malloc(700, S0).unwrap();
        assert!(sim.used() > 0);
        drop(a);
        assert_eq!(sim.used(), 0, "{conf}");
        assert!(sim.live_segments().is_empty() && sim.live_mappings().is_empty(), "{conf}");
        assert!(sim.live_reservations().is_empty(), "{conf}");
    }
}
