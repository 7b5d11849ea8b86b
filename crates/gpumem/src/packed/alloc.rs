//! The request path of the `gpumem` policy: placing blocks, freeing them, events, and
//! `empty_cache`. See `packed/mod.rs` for the design.

use crate::common::{self, format_size, MAX_REQUEST, MIN_BLOCK_SIZE};
use crate::device::{Device, EventId, StreamId};
use crate::error::{fraction_hint, AllocError, OutOfMemory};
use crate::packed::plan_region::can_take_over;
use crate::packed::{chunk_len, Chunk, Packed, Piece, Used, MAX_CHUNK, MIN_CHUNK_CAP};
use crate::report::history::{no_frames, Action};
use crate::report::snapshot::{BlockInfo, BlockState, SegmentInfo};
use crate::report::stats::PoolKind;

/// Beyond this many pages (8 GiB of 2 MiB pages), a mapping's interior goes in large chunks
/// (Note [Chunk shapes]).
const MANY_PAGES: u64 = 4096;

/// The `gpumem` policy has one arena, not PyTorch's two pools: its stats appear under the
/// large pool (and "all").
const POOL: PoolKind = PoolKind::Large;

/// Where a block that needs new pages goes: `start`, with `[map_from, map_to)` to be mapped.
struct Placement {
    size: u64,
    start: u64,
    map_from: u64,
    map_to: u64,
}

impl Placement {
    /// The bytes to map.
    fn need(&self) -> u64 {
        self.map_to - self.map_from
    }

    /// Where the block will lie, mapped or not: recycling and compaction leave it alone.
    fn keep(&self) -> (u64, u64) {
        (self.start, self.map_to.max(self.start + self.size))
    }
}

impl<D: Device> Packed<D> {
    pub(crate) fn malloc(&mut self, orig: u64, stream: StreamId) -> Result<u64, AllocError> {
        if orig >= MAX_REQUEST {
            return Err(AllocError::TooLarge(orig));
        }
        self.process_events()?;
        let mut size = common::round_size(orig, self.config.roundup_power2_divisions_for(orig));
        if size > self.device_total || size > self.va_size / 4 {
            // no placement can fit it: say so before any bookkeeping grows with its size
            return Err(self.out_of_memory(orig, size, stream));
        }
        if self.growth.on_request(orig) {
            // Note [Buffers grown by copying]
            size = size.div_ceil(self.page) * self.page;
        }
        let search = self.config.packed.periodic_plan && self.plan.is_none();
        let seq = self.detector.on_alloc(size, stream.0, self.device_calls(), search);
        if let Some(addr) = self.place_planned(size, stream)? {
            self.install(addr, size, stream, orig, seq);
            return Ok(addr);
        }
        // Fast path: the best-fitting mapped hole of this stream.
        let mut hit = self.best_fit(stream, size);
        let factor = self.config.packed.compact_factor;
        if let Some(addr) = hit.filter(|_| factor > 0) {
            // Note [Splitting idle chunks]: with `compact_factor:N`, a block about to land in
            // an idle chunk more than N times its size would pin all of it; the chunk is
            // unmapped first, and the block gets pages of its own where it lands. This trades
            // device calls for memory (docs/policy.md has the figures).
            let victims = self.oversized_idle_chunks(addr, size, factor);
            if !victims.is_empty() {
                for c in victims {
                    self.unmap_chunk(c)?;
                }
                hit = self
                    .best_fit(stream, size)
                    .filter(|&a| self.oversized_idle_chunks(a, size, factor).is_empty());
            }
        }
        let addr = match hit {
            Some(addr) => addr,
            None => self.grow(size, stream, orig)?,
        };
        // At the start of the hole, not its end: the block then lies over the chunks it
        // shares with the block freed there before, which keeps chunks whole (measured: taking
        // the end instead costs up to 5 points of reserved memory on the shared traces).
        let addr = self.carve(addr, size, stream, orig, seq);
        if let Some(first) = self.detector.confirmed_start().filter(|_| search) {
            // A loop whose last period made no device call has settled under best fit: a
            // plan would only cost its taking over.
            if self.detector.last_period_made_no_call(self.device_calls()) {
                self.detector.restart();
                return Ok(addr);
            }
            let (holes, pinned) = self.long_lived_holes(first);
            let follow = |lower, least_live| can_take_over(lower, least_live);
            if let Some(plan) = self.detector.take_plan(MIN_BLOCK_SIZE, &holes, follow) {
                self.adopt(plan, &holes, pinned);
            }
        }
        Ok(addr)
    }

    /// The address of the smallest free mapped piece of `stream` that holds `size` bytes.
    fn best_fit(&self, stream: StreamId, size: u64) -> Option<u64> {
        self.free.best_fit(stream.0, size)
    }

    /// Takes `size` bytes of the free piece at `addr` for a new block, at its start or, for a
    /// block of whole pages, at its first page boundary (Note [Blocks of whole pages]), and
    /// returns the block's address.
    fn carve(&mut self, addr: u64, size: u64, stream: StreamId, orig: u64, seq: u64) -> u64 {
        let (psize, kind) = self.spans[&addr];
        debug_assert!(matches!(kind, Piece::Free { .. }) && psize >= size);
        // Note [Blocks of whole pages]
        // ------------------------------
        // A block whose size is a whole number of pages, placed off a page boundary, lies
        // over one page more than it fills. While its neighbours live, that costs nothing: they
        // share the pages at its ends. Once they are gone, the block pins two half-used pages
        // that compaction cannot give back. Tensors of whole pages are common (a 24 MiB
        // attention input, a 32 MiB score matrix), and long-lived ones among them outlive
        // their neighbours: in decoding with a KV cache, the prompt's twelve cached 24 MiB
        // blocks each held 26 MiB, 2.9% of the peak. So where its hole has room, such a block
        // starts at the hole's first page boundary; what lies before it is less than a page, in
        // a page its neighbour already holds. Measured: decoding 1.029× → 1.017×; the
        // transformer LM 1.0075 → 1.0006, U-Net 1.0055 → 1.0012, no trace worse by more than
        // 0.0013. Aligning blocks of any size of a page or more instead (where that saves a
        // page) did better on decoding (1.002×) but shifted the rest of their holes, so that
        // blocks that fitted them before no longer did: ViT 1.020×, 1.022× over 24 steps.
        let page = self.page;
        let aligned = addr.div_ceil(page) * page;
        let at = if size >= page
            && size.is_multiple_of(page)
            && aligned > addr
            && aligned + size <= addr + psize
        {
            aligned
        } else {
            addr
        };
        if at > addr {
            self.resize_piece(addr, at - addr);
            if at + size < addr + psize {
                self.set_piece(at + size, addr + psize - at - size, kind);
            }
        } else if psize > size {
            self.advance_piece(addr, size);
        } else {
            self.take_piece(addr);
        }
        self.install(at, size, stream, orig, seq);
        at
    }

    /// Records a new live block at `addr`.
    pub(crate) fn install(&mut self, addr: u64, size: u64, stream: StreamId, orig: u64, seq: u64) {
        self.growth.on_install(orig, addr);
        self.add_users(addr, size);
        self.live.insert(
            addr,
            Used {
                size,
                requested: orig,
                stream,
                allocated: true,
                event_count: 0,
                stream_uses: Vec::new(),
                seq,
            },
        );
        let k = POOL;
        let s = &mut self.stats;
        s.allocation.increase(k, 1);
        s.allocated_bytes.increase(k, size);
        s.active.increase(k, 1);
        s.active_bytes.increase(k, size);
        s.requested_bytes.increase(k, orig);
        self.history.record(Action::Alloc, addr, orig, stream);
    }

    /// Finds room that needs new pages, recycles idle chunks if the mapping would raise the
    /// peak, maps, and returns the address of a free piece now large enough.
    fn grow(&mut self, size: u64, stream: StreamId, orig: u64) -> Result<u64, AllocError> {
        let mut place = self.placement(size, stream);
        if self.frontier_would_overflow(&place) {
            return Err(self.out_of_memory(orig, place.need(), stream));
        }
        // Each step can move the best place (recycling opens holes, compaction unmaps pages),
        // and a new place can make idle chunks recyclable that the old one overlapped: so
        // the steps repeat while they change something (three rounds at most).
        for _ in 0..3 {
            if !self.exceeds(&place, self.gather_limit(place.size)) {
                break;
            }
            let before = (self.mapped_bytes, place.start, place.need());
            place = self.gather(place, stream)?;
            // Note [Idle chunks a block would pin]: landing partly on an idle chunk, the block
            // would pin the rest of it; unmapped first, the chunk's pages come back in the
            // block's own shapes (two device calls, paid only when the peak would rise).
            if self.exceeds(&place, self.gather_limit(place.size)) {
                let partial = self.partly_covered_idle_chunks(place.start, size);
                if !partial.is_empty() {
                    for c in partial {
                        self.unmap_chunk(c)?;
                    }
                    place = self.placement(size, stream);
                }
            }
            if (self.mapped_bytes, place.start, place.need()) == before {
                break;
            }
        }
        if self.plan_costs_memory(place.need()) {
            // the plan's idle memory is ordinary memory now: gather it first
            place = self.gather(place, stream)?;
        }
        if let Some(max) = self.allowed_memory_maximum {
            if self.exceeds(&place, max) && self.plan.is_some() {
                // under a cap, the plan's idle memory must be usable: the plan goes
                self.dissolve_plan();
                place = self.placement(size, stream);
            }
            if self.exceeds(&place, max) {
                self.recycle(place.need(), max, place.keep())?;
                if self.config.packed.compaction && self.exceeds(&place, max) {
                    self.compact(place.need(), max, place.keep())?;
                }
                // Recycling may have moved the frontier down under the old place, or merged
                // it with the unmapped space around: place anew (a fuzzer found the stale place
                // mapped where no piece was, after a memory fraction far below the peak).
                place = self.placement(size, stream);
                if self.exceeds(&place, max) {
                    return Err(self.out_of_memory(orig, place.need(), stream));
                }
            }
        }
        if !self.map_range(&place, stream)? {
            // The device is full: give back every idle chunk (the plan's too) and try once more.
            self.dissolve_plan();
            self.synchronize_and_free_events()?;
            self.stats.num_alloc_retries += 1;
            self.recycle(place.need(), 0, place.keep())?;
            if self.config.packed.compaction {
                self.compact(place.need(), 0, place.keep())?;
            }
            place = self.placement(size, stream);
            if !self.map_range(&place, stream)? {
                return Err(self.out_of_memory(orig, place.need(), stream));
            }
        }
        Ok(place.start)
    }

    /// Recycles idle chunks, then compacts chunks, for what `place` needs under the peak,
    /// and returns the best place after each (recycling may open a better place or move the
    /// frontier down; compaction unmaps pages).
    fn gather(&mut self, place: Placement, stream: StreamId) -> Result<Placement, AllocError> {
        let size = place.size;
        let limit = self.gather_limit(place.size);
        self.recycle(place.need(), limit, place.keep())?;
        let place = self.placement(size, stream);
        if self.config.packed.compaction
            && self.exceeds(&place, limit)
            && self.compact(place.need(), limit, place.keep())?
        {
            return Ok(self.placement(size, stream));
        }
        Ok(place)
    }

    /// Reserved memory that growing for a request of `size` bytes may reach before idle
    /// memory is gathered: the peak reserved so far, or with `recycle_slack:f` (1 + f) times
    /// the live bytes if that is more, counting the request (a request that makes a new peak
    /// of live bytes is owed its own memory) or the peak of live bytes so far, whichever is
    /// more. Measured (docs/policy.md): at 0.01, 12% fewer device calls over the bundled
    /// traces, the tightest traces reserving up to 1.0098x their live bytes instead of
    /// 1.0006-1.0059x. Counting only the peak so far saved half as many calls.
    ///
    /// With `recycle_above_mb:N`, never less than N MiB: a program that knows the memory it
    /// may take need not pay for gathering below it. Measured (docs/policy.md, "Gathering
    /// before the final peak"): with N at the trace's own final peak, bert makes 365 device
    /// calls instead of 719 at the same peak.
    fn gather_limit(&self, size: u64) -> u64 {
        let floor = self.high_water.max(self.config.packed.recycle_above);
        let slack = self.config.packed.recycle_slack;
        if slack <= 0.0 {
            return floor;
        }
        let stats = &self.stats.allocated_bytes.all();
        let live = (stats.peak.max(0) as u64).max(stats.current.max(0) as u64 + size);
        floor.max(live + (live as f64 * slack) as u64)
    }

    /// Whether mapping what `place` needs would take reserved memory over `limit`.
    fn exceeds(&self, place: &Placement, limit: u64) -> bool {
        self.mapped_bytes + place.need() > limit
    }

    /// Idle chunks under `[addr, addr + size)` with a page or more outside the block's pages:
    /// the block would pin that free memory.
    fn partly_covered_idle_chunks(&self, addr: u64, size: u64) -> Vec<u32> {
        let page = self.page;
        let (lo, hi) = (addr / page * page, (addr + size).div_ceil(page) * page);
        self.idle_chunks_under(addr, size, |ch| ch.start < lo || ch.start + ch.size > hi)
    }

    /// Idle chunks under `[addr, addr + size)` more than `f` times larger than the block.
    fn oversized_idle_chunks(&self, addr: u64, size: u64, f: u64) -> Vec<u32> {
        self.idle_chunks_under(addr, size, |ch| ch.size > f.saturating_mul(size) && ch.size > 4 * self.page)
    }

    /// The idle chunks under `[addr, addr + size)` (unmapped pages skipped) that `pick` says.
    fn idle_chunks_under(&self, addr: u64, size: u64, pick: impl Fn(&Chunk) -> bool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut p = addr;
        while p < addr + size {
            let Some(c) = self.chunk_at(p) else {
                p = (p / self.page + 1) * self.page;
                continue;
            };
            let ch = self.chunks[c as usize].as_ref().unwrap();
            if ch.users == 0 && pick(ch) {
                out.push(c);
            }
            p = ch.start + ch.size;
        }
        out
    }

    /// The largest chunk `map_range` maps now (Note [Chunk shapes]).
    fn chunk_cap(&self) -> u64 {
        (self.high_water / 16).clamp(MIN_CHUNK_CAP, MAX_CHUNK) / self.page * self.page
    }

    fn frontier_would_overflow(&self, place: &Placement) -> bool {
        place.map_to > self.base + self.va_size
    }

    /// Maps `[map_from, map_to)` and turns it into free space of `stream` joined to the free
    /// space around it.
    fn map_range(&mut self, place: &Placement, stream: StreamId) -> Result<bool, AllocError> {
        let (from, to) = (place.map_from, place.map_to);
        // Note [Chunk shapes]: with compaction, one chunk per mapped range, split at a
        // sixteenth of the peak reserved so far (32-256 MiB): compaction gives back what a
        // neighbour pins (Note [Compaction]), but only where the chunk's live bytes can wait
        // somewhere meanwhile (Note [The copy's memory]), so a chunk must stay small beside the
        // footprint. Measured: with chunks of up to 256 MiB whatever the footprint, a GAN of
        // 1.5 GB reserved 1.049x its live bytes and decoding with a growing KV cache (0.8 GB)
        // 1.082x: blocks landed in a 110 MB chunk freed by a weight converted to fp16, and the
        // 21.5 MB they left free could not be compacted without copying 97 MB above the peak.
        // With the cap, 1.011x and 1.056x, for 12% more device calls over all traces (2% in
        // their second halves). Measured again once copies were staged: without the cap the
        // GANs 1.0325x and 1.0415x (1.0124x, 1.0104x with it), decoding 1.0289x (1.0021x).
        //
        // Without compaction (the default: Note [Nothing moves under a live block] in
        // `packed/compact.rs`), every page is a chunk of its own, so that a live block pins
        // only the pages it touches, and whatever else is free can be unmapped page by page.
        // It costs device calls: 8-50x as many over a whole replay of the bundled traces, none
        // where a periodic plan is followed. Measured, with every page a chunk, reserved memory
        // stays within 1.015x the live peak on every bundled trace; with the pages wholly
        // inside a block mapped as one chunk (the earlier shape), a chunk that a later small
        // block pinned cost up to 1.22x (diffusion sampling). docs/policy.md has the figures.
        let page = self.page;
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        if self.config.packed.compaction {
            let (mut at, cap) = (from, self.chunk_cap());
            while at < to {
                let n = chunk_len(to - at, cap);
                pieces.push((at, n));
                at += n;
            }
        } else if (to - from) / page <= MANY_PAGES {
            pieces.extend((from..to).step_by(page as usize).map(|at| (at, page)));
        } else {
            // A block of more than 8 GiB: the pages wholly inside it go in chunks of up to
            // MAX_CHUNK (idle exactly when it is gone), so that a huge request (a simulated
            // device may claim terabytes) costs thousands of calls and chunk records, not
            // millions. No bundled trace has a block this large.
            let lo = (place.start.div_ceil(page) * page).clamp(from, to);
            let hi = ((place.start + place.size) / page * page).clamp(lo, to);
            pieces.extend((from..lo).step_by(page as usize).map(|at| (at, page)));
            let mut at = lo;
            while at < hi {
                let n = (hi - at).min(MAX_CHUNK);
                pieces.push((at, n));
                at += n;
            }
            pieces.extend((hi..to).step_by(page as usize).map(|at| (at, page)));
        }
        let mut mapped = Vec::with_capacity(pieces.len());
        for (at, n) in pieces {
            match self.map_chunk(at, n, stream) {
                Ok(Some(c)) => mapped.push(c),
                failed => {
                    // all or nothing: give back what this call mapped
                    for c in mapped {
                        self.unmap_fresh_chunk(c)?;
                    }
                    return failed.map(|_| false);
                }
            }
        }
        let mapped = Piece::Free { stream: stream.0 };
        if from == self.frontier {
            self.frontier = to;
            self.insert_free(from, to - from, mapped);
        } else {
            // the mapped part of the unmapped piece that holds it
            self.retype_part(from, to, mapped);
        }
        Ok(true)
    }

    /// The best place for a block that needs new pages: the unmapped hole (with the free
    /// mapped space of this stream on either side) that fits it most tightly, else the top.
    fn placement(&self, size: u64, stream: StreamId) -> Placement {
        let page = self.page;
        let mine = Piece::Free { stream: stream.0 };
        let free_before = |addr: u64| match self.piece_ending_at(addr) {
            Some((a, s, k)) if k == mine => Some((a, s)),
            _ => None,
        };
        let mut best: Option<(u64, Placement)> = None;
        for &ua in &self.unmapped {
            let (us, _) = self.spans[&ua];
            let before = free_before(ua);
            let after = match self.spans.get(&(ua + us)) {
                Some(&(s, k)) if k == mine => s,
                _ => 0,
            };
            let room = before.map_or(0, |b| b.1) + us + after;
            if room < size {
                continue;
            }
            let start = before.map_or(ua, |b| b.0);
            let map_to = (start + size).div_ceil(page).max(ua / page + 1) * page;
            let waste = room - size;
            if best.as_ref().is_none_or(|b| waste < b.0) {
                best = Some((waste, Placement { size, start, map_from: ua, map_to: map_to.min(ua + us) }));
            }
        }
        if let Some((_, p)) = best {
            return p;
        }
        let top = self.frontier;
        let start = free_before(top).map_or(top, |b| b.0);
        let map_to = ((start + size).div_ceil(page) * page).max(top + page);
        Placement { size, start, map_from: top, map_to }
    }

    pub(crate) fn free(&mut self, ptr: u64) -> Result<(), AllocError> {
        // Taken out of `live` at once: a block no other stream used goes straight back to the
        // free pieces, with one map operation instead of a lookup and a removal.
        let mut u = self.live.remove(&ptr).ok_or(AllocError::InvalidPointer(ptr))?;
        if !u.allocated {
            // freed already, waiting for other streams
            self.live.insert(ptr, u);
            return Err(AllocError::InvalidPointer(ptr));
        }
        u.allocated = false;
        let (size, requested, stream) = (u.size, u.requested, u.stream);
        self.growth.on_free(requested, ptr);
        let uses = std::mem::take(&mut u.stream_uses);
        self.detector.on_free(u.seq);
        let k = POOL;
        self.stats.allocation.decrease(k, 1);
        self.stats.allocated_bytes.decrease(k, size);
        self.history.record(Action::FreeRequested, ptr, requested, stream);
        if stream != StreamId::DEFAULT {
            self.note_stream_free(ptr, size, stream);
        }
        if uses.is_empty() {
            self.complete(ptr, u);
            return Ok(());
        }
        self.live.insert(ptr, u);
        for s in uses {
            self.pending.record(&self.device, s, ptr)?;
            self.live.get_mut(&ptr).unwrap().event_count += 1;
        }
        Ok(())
    }

    fn free_completed(&mut self, ptr: u64) {
        let u = self.live.remove(&ptr).expect("a live block");
        self.complete(ptr, u);
    }

    /// Returns the block `u` at `ptr`, already out of `live`, to the free pieces.
    fn complete(&mut self, ptr: u64, u: Used) {
        self.history.record(Action::FreeCompleted, ptr, u.requested, u.stream);
        let k = POOL;
        self.stats.active.decrease(k, 1);
        self.stats.active_bytes.decrease(k, u.size);
        self.stats.requested_bytes.decrease(k, u.requested);
        self.remove_users(ptr, u.size);
        self.release_block(ptr, u.size, u.stream);
    }

    pub(crate) fn record_stream(&mut self, ptr: u64, stream: StreamId) -> Result<(), AllocError> {
        let u = self.live.get_mut(&ptr).filter(|u| u.allocated).ok_or(AllocError::InvalidPointer(ptr))?;
        if stream != u.stream && !u.stream_uses.contains(&stream) {
            u.stream_uses.push(stream);
        }
        Ok(())
    }

    pub(crate) fn process_events(&mut self) -> Result<(), AllocError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        for ptr in self.pending.completed(&self.device)? {
            self.event_done(ptr);
        }
        Ok(())
    }

    fn event_done(&mut self, ptr: u64) {
        let u = self.live.get_mut(&ptr).expect("a pending block");
        u.event_count -= 1;
        if u.event_count == 0 {
            self.free_completed(ptr);
        }
    }

    pub(crate) fn synchronize_and_free_events(&mut self) -> Result<(), AllocError> {
        self.stats.num_sync_all_streams += 1;
        for ptr in self.pending.wait_all(&self.device)? {
            self.event_done(ptr);
        }
        Ok(())
    }

    /// `empty_cache()`: waits for pending frees, unmaps every idle chunk, and with compaction
    /// gives back the wholly free pages of the chunks that still hold live blocks.
    pub(crate) fn empty_cache(&mut self) -> Result<(), AllocError> {
        // the plan's region is held only while it saves device calls; here memory comes first
        self.dissolve_plan();
        self.synchronize_and_free_events()?;
        for c in self.idle_chunks() {
            self.unmap_chunk(c)?;
        }
        if self.config.packed.compaction {
            self.compact_all()?;
        }
        // What is left mapped is the new baseline for recycling.
        self.high_water = self.mapped_bytes;
        Ok(())
    }

    /// One segment per contiguous mapped range, as PyTorch reports expandable segments.
    pub(crate) fn snapshot(&self) -> Vec<SegmentInfo> {
        let mut pieces: Vec<(u64, u64, Piece)> = self.spans.iter().map(|(&a, &(s, k))| (a, s, k)).collect();
        pieces.extend(self.live.iter().map(|(&a, u)| (a, u.size, Piece::Used)));
        pieces.sort_unstable_by_key(|p| p.0);
        let mut out: Vec<SegmentInfo> = Vec::new();
        let mut open = false;
        for (addr, size, kind) in pieces {
            let block = match kind {
                Piece::Unmapped | Piece::Reserved => {
                    open = false;
                    continue;
                }
                Piece::Free { .. } | Piece::Planned => BlockInfo {
                    address: addr,
                    size,
                    requested_size: 0,
                    state: BlockState::Inactive,
                    frames: no_frames(),
                },
                Piece::Used => {
                    let u = &self.live[&addr];
                    let state =
                        if u.allocated { BlockState::ActiveAllocated } else { BlockState::ActivePendingFree };
                    BlockInfo { address: addr, size, requested_size: u.requested, state, frames: no_frames() }
                }
            };
            if !open {
                out.push(SegmentInfo {
                    address: addr,
                    total_size: 0,
                    allocated_size: 0,
                    active_size: 0,
                    requested_size: 0,
                    stream: StreamId::DEFAULT,
                    pool: PoolKind::Large,
                    is_expandable: true,
                    blocks: Vec::new(),
                });
                open = true;
            }
            let seg = out.last_mut().unwrap();
            seg.total_size += size;
            if block.state == BlockState::ActiveAllocated {
                seg.allocated_size += size;
            }
            if block.state != BlockState::Inactive {
                seg.active_size += size;
                seg.requested_size += block.requested_size;
            }
            seg.blocks.push(block);
        }
        out
    }
}

impl<D: Device> Packed<D> {
    pub(crate) fn out_of_memory(&mut self, orig: u64, need: u64, stream: StreamId) -> AllocError {
        let (free, total) = self.device.mem_get_info().unwrap_or((0, self.device_total));
        self.history.record(Action::Oom, free, orig, stream);
        self.stats.num_ooms += 1;
        let allocated = self.stats.allocated_bytes.all().current as u64;
        let active = self.stats.active_bytes.all().current as u64;
        let reserved = self.mapped_bytes;
        let largest_free_block = self.free.largest();
        let non_releasable = reserved.saturating_sub(active + self.idle_bytes);
        let hint = match fraction_hint(self.allowed_memory_maximum, need, free, total) {
            Some(h) => h,
            None if reserved > allocated + allocated / 10 => format!(
                "{} of the reserved memory is free but lies in pages shared with live tensors, in pieces too small for this request: free tensors you no longer need, or use a smaller batch.",
                format_size(non_releasable)
            ),
            None => "Live tensors hold nearly all of this memory: free tensors you no longer need, use a smaller batch, or look for leaks with a snapshot.".to_string(),
        };
        AllocError::OutOfMemory(Box::new(OutOfMemory {
            device: self.device.index(),
            requested: orig,
            alloc_size: need,
            total,
            free,
            allowed: self.allowed_memory_maximum,
            allocated,
            reserved,
            largest_free_block,
            non_releasable,
            hint,
            sites: Vec::new(),
        }))
    }
}

impl<D: Device> Drop for Packed<D> {
    /// Unmaps everything and gives the address range back (blocks still allocated go with it).
    fn drop(&mut self) {
        let _ = self.synchronize_and_free_events();
        let _ = self.device.synchronize_device();
        for ch in self.chunks.drain(..).flatten() {
            let _ = self.device.unmap(ch.start, ch.size);
        }
        let _ = self.device.unreserve(self.base, self.va_size);
        self.pending.destroy(&self.device);
        let held: Vec<EventId> = self.event_refs.keys().map(|&e| EventId(e)).collect();
        for e in self.spare_events.drain(..).chain(held) {
            let _ = self.device.destroy_event(e);
        }
    }
}
