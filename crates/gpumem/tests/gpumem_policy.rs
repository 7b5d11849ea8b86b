//! The gpumem policy's rules: byte-granular packing, pages mapped only under blocks, idle
//! chunks recycled instead of reserving more, and everything PyTorch users rely on still
//! meaningful (stats, summary, empty_cache, out of memory).

use gpumem::{AllocError, Allocator, AllocatorConfig, Device, PolicyKind, SimDevice, StreamId};

const MIB: u64 = 1 << 20;
const S0: StreamId = StreamId(0);

fn setup_cap(conf: &str, cap: u64) -> (SimDevice, Allocator<SimDevice>) {
    let sim = SimDevice::new(cap);
    let config =
        AllocatorConfig::parse(&format!("policy:gpumem{}{conf}", if conf.is_empty() { "" } else { "," }))
            .unwrap();
    let a = Allocator::new(sim.clone(), config).unwrap();
    assert_eq!(a.policy(), PolicyKind::Gpumem);
    (sim, a)
}

fn setup() -> (SimDevice, Allocator<SimDevice>) {
    setup_cap("", 80 << 30)
}

fn consistent(a: &Allocator<SimDevice>, sim: &SimDevice) {
    a.check_stats().unwrap();
    assert_eq!(a.memory_reserved(), sim.used(), "reserved is the physical memory mapped");
}

#[test]
fn blocks_are_packed_to_512_bytes_and_share_pages() {
    let (sim, a) = setup();
    let p = a.malloc(1000, S0).unwrap();
    let q = a.malloc(5 * MIB, S0).unwrap();
    assert_eq!(q, p + 1024, "the next block starts right after the first");
    assert_eq!(a.memory_allocated(), 1024 + 5 * MIB);
    // 5 MiB + 1 KiB spans three 2 MiB pages
    assert_eq!(a.memory_reserved(), 6 * MIB);
    let r = a.malloc(MIB + 1, S0).unwrap();
    assert_eq!(r, q + 5 * MIB);
    assert_eq!(a.memory_allocated(), 1024 + 5 * MIB + MIB + 512, "no 20 MiB segment, no 2 MiB rounding");
    consistent(&a, &sim);
}

#[test]
fn the_tutorial_tensor_is_allocated_exactly() {
    let (sim, a) = setup();
    let (free0, _) = sim.mem_get_info().unwrap();
    let x = a.malloc(400_000_000, S0).unwrap();
    assert_eq!(a.memory_allocated(), 400_000_000);
    assert_eq!(a.memory_reserved(), 191 * 2 * MIB, "the pages under it");
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 191 * 2 * MIB, "a live tensor's pages stay");
    a.free(x).unwrap();
    assert_eq!(a.memory_allocated(), 0);
    assert_eq!(a.memory_reserved(), 191 * 2 * MIB, "cached for the next tensor");
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
    assert_eq!(sim.mem_get_info().unwrap().0, free0);
}

#[test]
fn a_freed_block_is_reused_without_device_calls() {
    let (sim, a) = setup();
    let p = a.malloc(64 * MIB, S0).unwrap();
    a.free(p).unwrap();
    let before = sim.counters();
    for _ in 0..100 {
        let q = a.malloc(64 * MIB, S0).unwrap();
        assert_eq!(q, p);
        a.free(q).unwrap();
    }
    assert_eq!(sim.counters().maps, before.maps);
    assert_eq!(sim.counters().unmaps, before.unmaps);
}

#[test]
fn idle_memory_is_recycled_instead_of_reserving_more() {
    let (sim, a) = setup();
    let p = a.malloc(100 * MIB, S0).unwrap();
    a.free(p).unwrap();
    // 150 MiB does not fit the cached 100 MiB: PyTorch would reserve 250 MiB; here the new
    // block takes the idle pages and only 50 MiB more
    let q = a.malloc(150 * MIB, S0).unwrap();
    assert_eq!(q, p, "it grows in place over the idle pages");
    assert_eq!(a.memory_reserved(), 150 * MIB);
    assert_eq!(a.max_memory_reserved(), 150 * MIB);
    // elsewhere, idle pages are unmapped and mapped again where they are needed
    let small = a.malloc(MIB, S0).unwrap();
    a.free(q).unwrap();
    let unmaps = sim.counters().unmaps;
    let r = a.malloc(152 * MIB, S0).unwrap();
    assert!(sim.counters().unmaps > unmaps, "the idle chunk was recycled");
    assert!(a.max_memory_reserved() <= 156 * MIB, "peak {}", a.max_memory_reserved());
    a.free(r).unwrap();
    a.free(small).unwrap();
    consistent(&a, &sim);
}

#[test]
fn one_wait_covers_every_chunk_a_call_unmaps() {
    let (sim, a) = setup();
    for round in 0..2 {
        let blocks: Vec<u64> = (0..3).map(|_| a.malloc(64 * MIB, S0).unwrap()).collect();
        for b in blocks {
            a.free(b).unwrap();
        }
        let before = sim.counters();
        a.empty_cache().unwrap();
        let after = sim.counters();
        assert!(after.unmaps >= before.unmaps + 3, "round {round}: several chunks went back");
        // Note [One wait per call]: the first unmap waits, the others need not; and the next
        // call, after which the program may have launched more work, waits again
        assert_eq!(after.synchronizes, before.synchronizes + 1, "round {round}");
        assert_eq!(a.memory_reserved(), 0);
    }
    // a chunk used on another stream waits for the whole device, even after a wait for the
    // default stream in the same call
    let p = a.malloc(64 * MIB, S0).unwrap();
    let q = a.malloc(64 * MIB, StreamId(1)).unwrap();
    a.free(p).unwrap();
    a.free(q).unwrap();
    let before = sim.counters().synchronizes;
    a.empty_cache().unwrap();
    assert_eq!(sim.counters().synchronizes, before + 2);
    consistent(&a, &sim);
}

#[test]
fn a_compaction_with_no_page_to_give_back_does_not_wait() {
    let (sim, a) = setup();
    // one chunk of two pages, with a small live block on each page and no page wholly free
    let b = a.malloc(4 * MIB, S0).unwrap();
    a.free(b).unwrap();
    let x = a.malloc(1024, S0).unwrap();
    let filler = a.malloc(2 * MIB - 1024, S0).unwrap();
    let y = a.malloc(1024, S0).unwrap();
    a.free(filler).unwrap();
    assert_eq!((x, y), (b, b + 2 * MIB));
    let before = sim.counters();
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 4 * MIB, "both pages hold a live block");
    assert_eq!(sim.counters().synchronizes, before.synchronizes, "nothing to wait for");
    assert_eq!(sim.counters().unmaps, before.unmaps);
    consistent(&a, &sim);
}

#[test]
fn empty_cache_gives_back_idle_chunks_and_keeps_live_ones() {
    let (sim, a) = setup();
    let big = a.malloc(64 * MIB, S0).unwrap();
    let small = a.malloc(3 * MIB, S0).unwrap();
    a.free(big).unwrap();
    a.empty_cache().unwrap();
    // the big block's own pages go; the pages under the small one stay
    assert!(a.memory_reserved() <= 6 * MIB, "reserved {}", a.memory_reserved());
    assert!(a.memory_reserved() >= 3 * MIB);
    consistent(&a, &sim);
    a.free(small).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
    assert!(sim.live_mappings().is_empty());
}

#[test]
fn streams_do_not_share_freed_memory() {
    let (sim, a) = setup();
    let p = a.malloc(8 * MIB, StreamId(1)).unwrap();
    a.free(p).unwrap();
    let (syncs, unmaps) = (sim.counters().synchronizes, sim.counters().unmaps);
    let q = a.malloc(8 * MIB, StreamId(2)).unwrap();
    if q == p {
        // the same address may come back only as fresh memory: unmapped after waiting for
        // stream 1, then mapped again
        assert!(sim.counters().synchronizes > syncs && sim.counters().unmaps > unmaps);
    }
    let r = a.malloc(8 * MIB, StreamId(1)).unwrap();
    assert_ne!(r, q);
    consistent(&a, &sim);
}

/// Note [Which wait before unmapping]: pages another stream freed are unmapped after waiting
/// for an event recorded on that stream at the free, never for the whole device (a wait
/// under the allocator's lock that every other thread's cache hit would queue behind).
#[test]
fn pages_freed_on_another_stream_wait_for_its_event_not_the_device() {
    let (sim, a) = setup();
    let s1 = StreamId(1);
    let side = a.malloc(64 * MIB, s1).unwrap();
    a.free(side).unwrap();
    assert_eq!(sim.pending_events(), 1, "an event of stream 1 marks its last use of the pages");
    // a request of stream 0 beyond the peak recycles stream 1's idle pages
    let x = a.malloc(64 * MIB, S0).unwrap();
    assert_eq!(a.max_memory_reserved(), 64 * MIB, "recycled, not reserved anew");
    assert_eq!(sim.pending_events(), 0, "the event was waited for");
    assert_eq!(sim.counters().device_synchronizes, 0, "no device-wide wait");
    consistent(&a, &sim);
    a.free(x).unwrap();
}

#[test]
fn a_block_pending_on_another_stream_is_not_recycled() {
    let (sim, a) = setup_cap("", 100 * MIB);
    let p = a.malloc(60 * MIB, S0).unwrap();
    a.record_stream(p, StreamId(9)).unwrap();
    a.free(p).unwrap();
    // its pages are still in use on stream 9: they can be neither reused nor recycled until
    // the device is full; then the allocator waits for stream 9 and recycles them
    assert_eq!(sim.pending_events(), 1);
    let q = a.malloc(60 * MIB, S0).unwrap();
    assert_eq!(sim.pending_events(), 0);
    assert_eq!(a.stats().num_sync_all_streams, 1);
    assert_eq!(a.stats().num_alloc_retries, 1);
    a.free(q).unwrap();
    consistent(&a, &sim);
}

#[test]
fn out_of_memory_is_typed_and_the_allocator_recovers() {
    let (sim, a) = setup_cap("", 100 * MIB);
    let p = a.malloc(60 * MIB, S0).unwrap();
    let e = a.malloc(60 * MIB, S0).unwrap_err();
    let AllocError::OutOfMemory(oom) = &e else { panic!("{e}") };
    assert_eq!(oom.requested, 60 * MIB);
    assert_eq!(oom.allocated, 60 * MIB);
    assert_eq!(a.stats().num_ooms, 1);
    a.free(p).unwrap();
    let q = a.malloc(90 * MIB, S0).unwrap(); // the idle 60 MiB is recycled under it
    a.free(q).unwrap();
    consistent(&a, &sim);
}

#[test]
fn torch_only_options_are_refused() {
    let e = refusal("policy:gpumem,max_split_size_mb:128");
    assert!(e.contains("max_split_size_mb"), "{e}");
}

/// The error of an allocator made with options `conf`, which must be refused.
fn refusal(conf: &str) -> String {
    let c = AllocatorConfig::parse(conf).unwrap();
    Allocator::new(SimDevice::new(1 << 30), c).err().expect("refused").to_string()
}

#[test]
fn summary_and_snapshot_stay_meaningful() {
    let (sim, a) = setup();
    let p = a.malloc(10 * MIB, S0).unwrap();
    let _q = a.malloc(3000, S0).unwrap();
    a.free(p).unwrap();
    let s = a.memory_summary(false);
    assert!(s.contains("Allocated memory") && s.contains("GPU reserved memory"));
    let snap = a.snapshot();
    assert!(snap.iter().all(|seg| seg.is_expandable));
    assert_eq!(snap.iter().map(|seg| seg.total_size).sum::<u64>(), a.memory_reserved());
    consistent(&a, &sim);
}

#[test]
fn a_request_larger_than_the_device_maps_nothing() {
    let (sim, a) = setup_cap("", 600 * MIB);
    // larger than the device: refused before anything is mapped
    let e = a.malloc(1 << 30, S0).unwrap_err();
    assert!(e.is_out_of_memory());
    assert_eq!(a.memory_reserved(), 0);
    // larger than what is left: the device runs out halfway through mapping its pages, and
    // what was mapped for it goes back
    let held = a.malloc(200 * MIB, S0).unwrap();
    let e = a.malloc(500 * MIB, S0).unwrap_err();
    assert!(e.is_out_of_memory());
    assert_eq!(a.memory_reserved(), 200 * MIB);
    assert_eq!(sim.used(), 200 * MIB);
    a.free(held).unwrap();
    let p = a.malloc(500 * MIB, S0).unwrap();
    consistent(&a, &sim);
    a.free(p).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(sim.used(), 0);
}

/// A device that claims more memory than any GPU has (a simulated one can): a huge request
/// is a typed error, not bookkeeping that grows with its size, and the address range stays
/// within what a GPU can address.
#[test]
fn a_huge_device_and_a_huge_request_are_handled() {
    let (sim, a) = setup_cap("", u64::MAX / 2);
    let e = a.malloc(1 << 59, S0).unwrap_err();
    assert!(e.is_out_of_memory() || matches!(e, AllocError::TooLarge(_)), "{e}");
    let p = a.malloc(64 * MIB, S0).unwrap();
    consistent(&a, &sim);
    a.free(p).unwrap();
}

/// A 64 MiB chunk freed and then pinned by one small block at its start, its free space
/// closed by a guard block after it: the situation compaction exists for. Returns the small
/// block (tagged `7` on the simulated device) and the guard.
fn pinned_chunk(sim: &SimDevice, a: &Allocator<SimDevice>) -> (u64, u64) {
    let big = a.malloc(64 * MIB, S0).unwrap();
    let guard = a.malloc(3 * MIB / 2, S0).unwrap();
    a.free(big).unwrap();
    let small = a.malloc(MIB, S0).unwrap();
    assert_eq!(small, big, "best fit puts it in the freed chunk");
    sim.write_tag(small, 7).unwrap();
    sim.write_tag(small + MIB - 1, 7).unwrap();
    assert_eq!(a.memory_reserved(), 66 * MIB);
    (small, guard)
}

#[test]
fn empty_cache_gives_back_the_free_pages_of_a_chunk_holding_a_live_block() {
    let (sim, a) = setup_cap("compaction:True", 80 << 30);
    let (small, guard) = pinned_chunk(&sim, &a);
    a.empty_cache().unwrap();
    // only the pages under the live blocks stay, with their contents
    assert_eq!(a.memory_reserved(), 4 * MIB);
    assert_eq!(sim.counters().remaps, 1);
    assert_eq!((sim.read_tag(small), sim.read_tag(small + MIB - 1)), (Some(7), Some(7)));
    consistent(&a, &sim);
    a.free(small).unwrap();
    a.free(guard).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(sim.used(), 0);

    // without compaction (the default) every page is a chunk of its own: the free pages go
    // back without moving the live ones
    let (sim, a) = setup();
    let (small, _guard) = pinned_chunk(&sim, &a);
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 4 * MIB);
    assert_eq!(sim.counters().remaps + sim.counters().staged_remaps, 0);
    assert_eq!((sim.read_tag(small), sim.read_tag(small + MIB - 1)), (Some(7), Some(7)));
    consistent(&a, &sim);
}

#[test]
fn compaction_keeps_growth_under_the_peak() {
    // with compaction the pinned chunk's free pages are given back by copying the live page;
    // without it (the default) they are pages of their own, recycled without moving anything
    for (conf, peak_at_most, peak_at_least) in
        [("compaction:True", 2 + 2 + 100 + 2, 0), ("", 2 + 2 + 100 + 2, 0)]
    {
        let (sim, a) = setup_cap(conf, 80 << 30);
        let (small, guard) = pinned_chunk(&sim, &a);
        // 100 MiB fits no hole. Rather than raise the peak, the allocator gives back the 62
        // free pages of the pinned chunk (copying the page under the small block to a page of
        // its own) and maps the request with that memory.
        let big = a.malloc(100 * MIB, S0).unwrap();
        let peak = a.max_memory_reserved() / MIB;
        assert!(peak <= peak_at_most && peak >= peak_at_least, "{conf}: peak {peak} MiB");
        assert_eq!(sim.read_tag(small), Some(7), "{conf}: the pinned block kept its contents");
        assert_eq!(sim.read_tag(small + MIB - 1), Some(7));
        consistent(&a, &sim);
        for p in [small, guard, big] {
            a.free(p).unwrap();
        }
    }
}
#[test]
fn compaction_options_belong_to_the_gpumem_policy() {
    let c = AllocatorConfig::parse("compaction:False").unwrap();
    assert!(!c.packed.compaction);
    assert!(AllocatorConfig::parse("compaction:maybe").is_err());
    let e = refusal("policy:torch,compaction:True");
    assert!(e.contains("compaction applies to the gpumem policy only"), "{e}");
}

/// Under options `conf`: 100 MiB live at the peak, 60 of them freed, then a 64 MiB request
/// that fits no hole, then 150 MiB more that fit none either. Returns whether the 64 MiB
/// request recycled idle memory, the peak reserved after it, and whether anything was
/// recycled by the end.
fn gathering_after_a_freed_peak(conf: &str) -> (bool, u64, bool) {
    let (sim, a) = setup_cap(conf, 80 << 30);
    let x = a.malloc(60 * MIB, S0).unwrap();
    let y = a.malloc(40 * MIB, S0).unwrap();
    a.free(x).unwrap();
    let unmaps = sim.counters().unmaps;
    let z = a.malloc(64 * MIB, S0).unwrap();
    let recycled = sim.counters().unmaps > unmaps;
    let peak = a.max_memory_reserved();
    let w = a.malloc(150 * MIB, S0).unwrap();
    let later = sim.counters().unmaps > unmaps;
    for p in [z, y, w] {
        a.free(p).unwrap();
    }
    consistent(&a, &sim);
    (recycled, peak, later)
}

#[test]
fn recycle_slack_trades_memory_for_device_calls() {
    let run = |conf: &str| {
        let (recycled, peak, _) = gathering_after_a_freed_peak(conf);
        (recycled, peak)
    };
    // by default the peak reserved so far bounds growth: the idle 60 MiB are recycled
    assert_eq!(run(""), (true, 104 * MIB));
    // 70% above the live peak allows 170 MiB: nothing is unmapped, and 164 MiB reserved
    assert_eq!(run("recycle_slack:0.7"), (false, 164 * MIB));
    assert!(AllocatorConfig::parse("recycle_slack:1.5").is_err());
    assert!(AllocatorConfig::parse("recycle_slack:-0.1").is_err());
    let e = refusal("policy:torch,recycle_slack:0.01");
    assert!(e.contains("recycle_slack applies to the gpumem policy only"), "{e}");
}

#[test]
fn recycle_above_maps_fresh_pages_below_the_floor() {
    assert_eq!(gathering_after_a_freed_peak(""), (true, 104 * MIB, true));
    // under a floor of 200 MiB the idle 60 MiB stay mapped and 64 fresh MiB are mapped; beyond
    // the floor (the 150 MiB) the policy gathers again
    assert_eq!(gathering_after_a_freed_peak("recycle_above_mb:200"), (false, 164 * MIB, true));
    assert!(AllocatorConfig::parse("recycle_above_mb:-1").is_err());
    assert_eq!(AllocatorConfig::parse("recycle_above_mb:4096").unwrap().packed.recycle_above, 4 << 30);
    let e = refusal("policy:torch,recycle_above_mb:1024");
    assert!(e.contains("recycle_above_mb applies to the gpumem policy only"), "{e}");
}

#[test]
fn compaction_turns_an_out_of_memory_into_a_success() {
    // 100 MiB of device: a 64 MiB chunk pinned by 1 MiB leaves no room for 90 MiB more
    // (without compaction, the default, the chunk's pages are chunks of their own: it fits too)
    for (conf, fits) in [("compaction:True", true), ("", true)] {
        let (sim, a) = setup_cap(conf, 100 * MIB);
        let (small, _guard) = pinned_chunk(&sim, &a);
        let r = a.malloc(90 * MIB, S0);
        assert_eq!(r.is_ok(), fits, "{conf}: {r:?}");
        assert_eq!(sim.read_tag(small), Some(7));
        consistent(&a, &sim);
    }
}

/// Note [The copy's memory]: at the peak, the live bytes of a chunk being compacted wait in
/// free memory elsewhere (of any stream: the device is synchronized first), so compaction
/// does not lift the peak by the pages it keeps.
#[test]
fn compaction_at_the_peak_stages_the_copy_in_free_memory() {
    let (sim, a) = setup_cap("compaction:True", 80 << 30);
    let s1 = StreamId(1);
    let big = a.malloc(32 * MIB, S0).unwrap(); // one chunk
    let guard = a.malloc(3 * MIB / 2, S0).unwrap();
    let other = a.malloc(MIB, s1).unwrap(); // leaves 1 MiB free in a page of its stream
    a.free(big).unwrap();
    let x = a.malloc(16 * MIB, S0).unwrap();
    let small = a.malloc(MIB, S0).unwrap();
    assert_eq!(small, big + 16 * MIB);
    a.free(x).unwrap();
    sim.write_tag(small, 7).unwrap();
    sim.write_tag(small + MIB - 8, 8).unwrap();
    assert_eq!(a.memory_reserved(), 36 * MIB);
    // 20 MiB fit neither hole of the chunk `small` pins; the chunk gives back its 15 free
    // pages, and the MiB under `small` waits in the other stream's page meanwhile: the peak
    // stays where it was (copied on the device, the page it keeps would have lifted it)
    let grown = a.malloc(20 * MIB, S0).unwrap();
    assert_eq!(a.max_memory_reserved(), 36 * MIB);
    assert_eq!(sim.counters().staged_remaps, 1);
    assert_eq!((sim.read_tag(small), sim.read_tag(small + MIB - 8)), (Some(7), Some(8)));
    consistent(&a, &sim);
    for p in [small, guard, other, grown] {
        a.free(p).unwrap();
    }
}

/// Note [Blocks of whole pages]: a block of whole pages starts at its hole's first page
/// boundary, so that once its neighbours are gone it holds no more pages than it fills.
#[test]
fn a_block_of_whole_pages_is_laid_on_whole_pages() {
    let (sim, a) = setup();
    let head = a.malloc(MIB / 2, S0).unwrap();
    let hole = a.malloc(40 * MIB + MIB / 2, S0).unwrap();
    let tail = a.malloc(MIB, S0).unwrap();
    a.free(hole).unwrap();
    let kv = a.malloc(24 * MIB, S0).unwrap();
    let odd = a.malloc(3 * MIB + 4096, S0).unwrap();
    assert_eq!(kv % (2 * MIB), 0, "whole pages start on a page");
    assert_eq!(kv, hole + 3 * MIB / 2);
    assert_eq!(odd, kv + 24 * MIB, "other blocks go where best fit puts them");
    a.free(head).unwrap();
    a.free(tail).unwrap();
    a.free(odd).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 24 * MIB, "once alone, the block holds just its pages");
    consistent(&a, &sim);
}

/// Note [Buffers grown by copying]: a KV cache that `torch.cat` makes one token longer at
/// every step (24 buffers, 16 KiB more each per token) takes whole pages once the chain is
/// recognised, so each token's buffers land in the pages the previous token's left: device
/// calls only where the size crosses a page (without the rule: 808 in the last 128 tokens),
/// and reserved memory stays within a page per buffer of the live bytes.
#[test]
fn a_cache_grown_by_copying_reuses_its_own_pages() {
    // with every page a chunk (the default), a buffer that crosses a page maps and unmaps
    // page by page: more calls, still only where the size crosses a page
    for (conf, most_calls) in [("compaction:True", 4 * 24), ("", 8 * 24)] {
        let (sim, a) = setup_cap(conf, 80 << 30);
        let calls = |a: &Allocator<SimDevice>| {
            let s = a.stats();
            s.num_device_alloc + s.num_device_free
        };
        let mut size = 10 * MIB;
        let mut bufs: Vec<u64> = (0..24).map(|_| a.malloc(size, S0).unwrap()).collect();
        let mut before = 0;
        for token in 0..256 {
            if token == 128 {
                before = calls(&a);
            }
            size += 16 << 10;
            for b in bufs.iter_mut() {
                let grown = a.malloc(size, S0).unwrap();
                a.free(*b).unwrap();
                *b = grown;
            }
        }
        // 128 tokens add 2 MiB: the size crosses one page, where each buffer moves once
        let late = calls(&a) - before;
        assert!(late <= most_calls, "{conf}: {late} device calls in the last 128 tokens");
        // at most 25 buffers live at once (24 and the one being copied), each on whole pages
        let pages = size.next_multiple_of(2 * MIB);
        assert!(a.max_memory_reserved() <= 25 * pages + 2 * MIB, "{conf}: peak {}", a.max_memory_reserved());
        consistent(&a, &sim);
    }
}
