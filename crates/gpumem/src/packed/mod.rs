//! The `gpumem` policy: byte-granular packing in one virtual address range, with physical
//! pages mapped where blocks need them and recycled where they are wholly free.
//!
//! Note [Why packing and recycling]
//! --------------------------------
//! PyTorch reserves 1.12-1.73× the live bytes on real training traces. The waste has two
//! sources. Rounding: a 5 MiB request takes a block of a 20 MiB segment, a 10.1 MiB request a
//! 12 MiB segment. Pinning: a segment holding one small live block cannot be given back, so
//! its free space is reserved but unusable for anything larger than its holes. Here:
//! - every block is placed at byte granularity (512 B) by best fit in one huge virtual
//!   address range, so neighbouring tensors share physical pages and no request is rounded
//!   beyond 512 B;
//! - physical memory is mapped in chunks only under blocks that need it; a chunk no live
//!   block touches is *idle*, and when new memory is needed beyond the peak so far, idle
//!   chunks are unmapped first and their memory mapped where the request lands (recycled),
//!   instead of reserving more. Virtual address space is plentiful; physical memory is not;
//! - by default every page is a chunk of its own, so a live block pins only the pages it
//!   touches (Note [Nothing moves under a live block] in `packed/compact.rs`); with
//!   `compaction:True` chunks are large, and one that still holds a few live blocks among free
//!   pages is compacted when that memory is needed: the pages under the blocks move to
//!   allocations of their own at the same addresses, and the rest goes back (Note
//!   [Compaction]).
//!
//! Note [Why the peak decides when to recycle]
//! -------------------------------------------
//! Unmapping must first wait for the work that used the pages (Note [Which wait before
//! unmapping] in `packed/waits.rs`) and costs 40-700 µs per chunk on an H100; mapping
//! 50-140 µs.
//! A loop whose layout repeats finds every block a mapped hole after its first iteration and
//! makes no device calls at all. While the footprint grows, mapping fresh memory below the
//! peak reserved so far costs nothing in peak memory, so idle chunks are recycled (and, with
//! compaction, chunks compacted) only when a mapping would raise the peak. `empty_cache`
//! unmaps every idle chunk (and, with compaction, compacts the rest).
//!
//! Note [Streams]
//! --------------
//! Free mapped memory belongs to the stream that freed it, as in PyTorch: only that stream
//! reuses it without synchronization. Unmapped address space carries no pending work, so it
//! belongs to no stream, and freshly mapped pages go to whichever stream asked.
//! A block used on other streams (`record_stream`) waits for their events before it is free.

mod alloc;
mod compact;
mod free_index;
mod growth;
mod interface;
mod plan;
mod plan_region;
mod waits;

use crate::common::PtrMap;
use crate::config::AllocatorConfig;
use crate::device::events::PendingFrees;
use crate::device::{Device, DeviceError, EventId, StreamId};
use crate::error::AllocError;
use crate::packed::free_index::FreeIndex;
use crate::packed::growth::Growth;
use crate::packed::plan::Detector;
use crate::packed::plan_region::ActivePlan;
use crate::report::history::{Action, History};
use crate::report::stats::{DeviceStats, PoolKind};
use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};

/// A live (allocated or pending) block.
pub(crate) struct Used {
    pub size: u64,
    pub requested: u64,
    pub stream: StreamId,
    pub allocated: bool,
    pub event_count: u32,
    pub stream_uses: Vec<StreamId>,
    /// The request's sequence number, for the period detector (Note [Periodic plans]).
    pub seq: u64,
}

/// A piece of the address range: a live block, or free space (mapped, with its owning
/// stream, or unmapped), or free space of the plan's region (mapped or not), which only
/// planned blocks use (Note [Periodic plans] in `packed/plan.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    Used,
    Free { stream: u64 },
    Unmapped,
    Planned,
    Reserved,
}

/// One physical allocation mapped at `start..start + size`.
pub(crate) struct Chunk {
    pub start: u64,
    pub size: u64,
    /// Live blocks overlapping the chunk.
    pub users: u32,
    /// Bytes of the chunk under live blocks: what compaction could not give back.
    pub live_bytes: u64,
    /// For each stream other than the default one whose blocks on the chunk were freed since
    /// it was mapped, an event recorded on it at the latest such free (Note [Which wait
    /// before unmapping]).
    pub waits: Vec<(StreamId, EventId)>,
    /// Whether such an event could not be recorded: unmapping the chunk then waits for the
    /// whole device.
    pub wait_device: bool,
    /// When the chunk last became idle (for least-recently-used recycling).
    pub idle_since: u64,
}

/// The most address space the policy reserves: 128 TiB, what 47 bits of virtual address
/// hold.
const MAX_ADDRESS_SPACE: u64 = 1 << 47;

/// The largest chunk mapped in one call (Note [Chunk shapes]).
pub(crate) const MAX_CHUNK: u64 = 256 << 20;
/// The smallest cap on a chunk's size, however small the footprint.
pub(crate) const MIN_CHUNK_CAP: u64 = 32 << 20;

/// The length of the next chunk of a range of `left` bytes, for chunks of at most `cap`:
/// a short tail (under a quarter of `cap`) joins the chunk before it, which saves a device
/// call for each block a little over a multiple of `cap`.
pub(crate) fn chunk_len(left: u64, cap: u64) -> u64 {
    if left < cap + cap / 4 {
        left
    } else {
        cap
    }
}

pub(crate) struct Packed<D: Device> {
    pub device: D,
    pub config: AllocatorConfig,
    pub stats: DeviceStats,
    pub history: History,
    pub device_total: u64,
    pub allowed_memory_maximum: Option<u64>,
    /// The reserved address range and the physical page size.
    pub base: u64,
    pub va_size: u64,
    pub page: u64,
    /// Address space above this was never used.
    pub frontier: u64,
    /// Free and unmapped pieces by address: (size, kind). With the live blocks they tile the
    /// range below the frontier. Hash maps by start and by end find a freed block's
    /// neighbours without a tree search (boundary tags).
    pub spans: PtrMap<(u64, Piece)>,
    pub span_end: PtrMap<u64>,
    /// Where free or unmapped pieces start, for the rare walks by address. A walk brings it
    /// up to date, which is why it sits in a cell: walks take `&self`.
    pub starts: RefCell<Starts>,
    /// Free mapped pieces by stream, size and address, for best fit.
    pub free: FreeIndex,
    /// Unmapped pieces by address (page-aligned).
    pub unmapped: BTreeSet<u64>,
    /// Live blocks by address.
    pub live: PtrMap<Used>,
    /// Large requests seen, to recognise buffers grown by copying (Note [Buffers grown by
    /// copying] in `packed/growth.rs`).
    pub growth: Box<Growth>,
    /// The chunk mapped at each page (index + 1), 0 where unmapped.
    pub page_chunk: Vec<u32>,
    pub chunks: Vec<Option<Chunk>>,
    pub vacant_chunks: Vec<u32>,
    /// Chunks that became idle, oldest first, as (idle_since, index). Entries go stale when
    /// their chunk is used again or unmapped (see `is_idle_entry`); they are skipped then,
    /// which keeps a free and an allocation free of tree updates.
    pub idle: VecDeque<(u64, u32)>,
    pub idle_bytes: u64,
    pub tick: u64,
    pub mapped_bytes: u64,
    /// The most ever mapped at once: recycling keeps mappings under it.
    pub high_water: u64,
    /// Frees waiting for other streams, by block address.
    pub pending: PendingFrees<u64>,
    /// Watches the requests for a training loop's period (Note [Periodic plans]).
    pub detector: Box<Detector>,
    /// The plan being followed, and its region.
    pub plan: Option<Box<ActivePlan>>,
    /// What the GPU finished since the current call began (Note [One wait per call]).
    pub waited: Waited,
    /// How many chunks hold each event of `Chunk::waits`, by event.
    pub event_refs: PtrMap<u32>,
    /// Events no chunk holds, for reuse.
    pub spare_events: Vec<EventId>,
}

/// The addresses where free or unmapped pieces start, in order, for the walks by address
/// (`piece_at_or_before`).
///
/// Most pieces a request makes are gone by the next walk (a hole's front carved again and
/// again), so a new start is only noted, and goes into the tree at the next walk if it still
/// starts a piece then: most never cost a tree update. Entries are only ever added; stale
/// ones are skipped by the walks and swept out when they outnumber the pieces.
#[derive(Default)]
pub(crate) struct Starts {
    tree: BTreeSet<u64>,
    /// Starts noted since the last walk.
    new: Vec<u64>,
}

impl Starts {
    /// Notes that a piece starts at `addr`; `spans` are the pieces.
    fn note(&mut self, addr: u64, spans: &PtrMap<(u64, Piece)>) {
        // A loop of hits notes the same few starts over and over (a hole's front carved and
        // merged back): one note of each is enough.
        if self.new[self.new.len().saturating_sub(4)..].contains(&addr) {
            return;
        }
        self.new.push(addr);
        if self.new.len() > 2 * spans.len() + 1024 {
            self.index(spans);
        }
    }

    /// Adds the noted starts that still start pieces to the tree, and sweeps out stale
    /// entries once they outnumber the pieces.
    fn index(&mut self, spans: &PtrMap<(u64, Piece)>) {
        for a in self.new.drain(..) {
            if spans.contains_key(&a) {
                self.tree.insert(a);
            }
        }
        if self.tree.len() > 2 * spans.len() + 1024 {
            self.tree.retain(|a| spans.contains_key(a));
        }
    }

    /// The last piece that starts at or before `addr`, as (start, size, kind). Stale entries
    /// the walk meets are dropped on the way, so that the next walk does not step over them
    /// again.
    fn at_or_before(&mut self, addr: u64, spans: &PtrMap<(u64, Piece)>) -> Option<(u64, u64, Piece)> {
        self.index(spans);
        loop {
            let a = *self.tree.range(..=addr).next_back()?;
            if let Some(&(size, kind)) = spans.get(&a) {
                return Some((a, size, kind));
            }
            self.tree.remove(&a);
        }
    }
}

/// How much of the GPU's work the allocator has waited for since the current call began.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Waited {
    Nothing,
    DefaultStream,
    Device,
}

impl<D: Device> Packed<D> {
    pub(crate) fn new(device: D, config: AllocatorConfig) -> Result<Packed<D>, AllocError> {
        let (_, total) = device.mem_get_info()?;
        let page = device.page_granularity().max(2 << 20);
        // Address space is plentiful: room for the device's memory four times over, so that
        // holes left by recycling never run the range out; but no more than a GPU's 47 bits
        // of virtual addresses hold (a simulated device may claim any capacity).
        let va_size = total.saturating_mul(4).min(MAX_ADDRESS_SPACE).div_ceil(page) * page;
        let base = device.reserve(va_size)?;
        Ok(Packed {
            device,
            stats: DeviceStats { max_split_size: config.max_split_size_stat(), ..Default::default() },
            config,
            history: History::default(),
            device_total: total,
            allowed_memory_maximum: None,
            base,
            va_size,
            page,
            frontier: base,
            spans: PtrMap::default(),
            span_end: PtrMap::default(),
            starts: RefCell::default(),
            free: FreeIndex::default(),
            unmapped: BTreeSet::new(),
            live: PtrMap::default(),
            growth: Box::default(),
            page_chunk: Vec::new(),
            chunks: Vec::new(),
            vacant_chunks: Vec::new(),
            idle: VecDeque::new(),
            idle_bytes: 0,
            tick: 0,
            mapped_bytes: 0,
            high_water: 0,
            pending: PendingFrees::default(),
            detector: Box::new(Detector::new()),
            plan: None,
            waited: Waited::Nothing,
            event_refs: PtrMap::default(),
            spare_events: Vec::new(),
        })
    }

    // ---- pieces ----

    pub(crate) fn set_piece(&mut self, addr: u64, size: u64, kind: Piece) {
        self.spans.insert(addr, (size, kind));
        self.span_end.insert(addr + size, addr);
        self.note_start(addr);
        match kind {
            Piece::Free { stream } => {
                self.free.insert(stream, size, addr);
            }
            Piece::Unmapped => {
                self.unmapped.insert(addr);
            }
            Piece::Planned | Piece::Reserved => {}
            Piece::Used => unreachable!("live blocks are kept in `live`"),
        }
    }

    pub(crate) fn take_piece(&mut self, addr: u64) -> (u64, Piece) {
        let (size, kind) = self.spans.remove(&addr).expect("a free piece at this address");
        self.span_end.remove(&(addr + size));
        match kind {
            Piece::Free { stream } => {
                self.free.remove(stream, size, addr);
            }
            Piece::Unmapped => {
                self.unmapped.remove(&addr);
            }
            Piece::Planned | Piece::Reserved => {}
            Piece::Used => unreachable!(),
        }
        (size, kind)
    }

    /// Moves the start of the free piece at `addr` up by `by` bytes, keeping its end (the
    /// cheapest update when a block is carved from its front).
    pub(crate) fn advance_piece(&mut self, addr: u64, by: u64) {
        let (size, kind) = self.spans.remove(&addr).expect("a free piece at this address");
        let (start, rest) = (addr + by, size - by);
        self.spans.insert(start, (rest, kind));
        *self.span_end.get_mut(&(addr + size)).expect("its end") = start;
        self.note_start(start);
        if let Piece::Free { stream } = kind {
            self.free.remove(stream, size, addr);
            self.free.insert(stream, rest, start);
        }
    }

    /// Changes the size of the piece at `addr`, keeping its start.
    pub(crate) fn resize_piece(&mut self, addr: u64, size: u64) {
        let (old, kind) = self.spans[&addr];
        self.spans.insert(addr, (size, kind));
        self.span_end.remove(&(addr + old));
        self.span_end.insert(addr + size, addr);
        if let Piece::Free { stream } = kind {
            self.free.remove(stream, old, addr);
            self.free.insert(stream, size, addr);
        }
    }

    /// Notes that a piece starts at `addr`, for the walks by address.
    fn note_start(&mut self, addr: u64) {
        self.starts.get_mut().note(addr, &self.spans);
    }

    /// The free or unmapped piece that ends at `addr`, as (start, size, kind).
    pub(crate) fn piece_ending_at(&self, addr: u64) -> Option<(u64, u64, Piece)> {
        let &start = self.span_end.get(&addr)?;
        let &(size, kind) = self.spans.get(&start)?;
        Some((start, size, kind))
    }

    /// The free or unmapped piece that holds `addr`, as (start, size, kind).
    pub(crate) fn piece_containing(&self, addr: u64) -> Option<(u64, u64, Piece)> {
        self.piece_at_or_before(addr).filter(|&(start, size, _)| addr < start + size)
    }

    /// The last free or unmapped piece that starts at or before `addr`, as (start, size,
    /// kind) (stale entries of `starts` are skipped).
    pub(crate) fn piece_at_or_before(&self, addr: u64) -> Option<(u64, u64, Piece)> {
        if let Some(&(size, kind)) = self.spans.get(&addr) {
            // a piece starts right there (a planned block at the front of its hole, most often)
            return Some((addr, size, kind));
        }
        self.starts.borrow_mut().at_or_before(addr, &self.spans)
    }

    /// Adds free (or unmapped) space, merging it with like neighbours.
    pub(crate) fn insert_free(&mut self, addr: u64, mut size: u64, kind: Piece) {
        if let Some(&(ns, nk)) = self.spans.get(&(addr + size)) {
            if nk == kind {
                self.take_piece(addr + size);
                size += ns;
            }
        }
        let (start, total, merged) = match self.piece_ending_at(addr) {
            Some((pa, ps, pk)) if pk == kind => (pa, ps + size, true),
            _ => (addr, size, false),
        };
        if kind == Piece::Unmapped && start + total == self.frontier {
            // unmapped space at the top goes back to the never-used range
            if merged {
                self.take_piece(start);
            }
            self.frontier = start;
            return;
        }
        if merged {
            self.resize_piece(start, total);
        } else {
            self.set_piece(start, total, kind);
        }
    }

    // ---- chunks ----

    /// The indexes into `page_chunk` of the pages of `start..start + size` (page-aligned).
    pub(crate) fn pages(&self, start: u64, size: u64) -> std::ops::Range<usize> {
        let first = ((start - self.base) / self.page) as usize;
        first..first + (size / self.page) as usize
    }

    pub(crate) fn chunk_at(&self, addr: u64) -> Option<u32> {
        let i = ((addr - self.base) / self.page) as usize;
        self.page_chunk.get(i).copied().filter(|&c| c > 0).map(|c| c - 1)
    }

    /// Counts a new live block on every chunk under it.
    pub(crate) fn add_users(&mut self, addr: u64, size: u64) {
        let mut p = addr;
        while p < addr + size {
            let c = self.chunk_at(p).expect("live blocks are mapped");
            let ch = self.chunks[c as usize].as_mut().unwrap();
            ch.users += 1;
            ch.live_bytes += (addr + size).min(ch.start + ch.size) - addr.max(ch.start);
            if ch.users == 1 {
                self.idle_bytes -= ch.size;
            }
            p = ch.start + ch.size;
        }
    }

    pub(crate) fn remove_users(&mut self, addr: u64, size: u64) {
        let mut p = addr;
        while p < addr + size {
            let c = self.chunk_at(p).expect("live blocks are mapped");
            let ch = self.chunks[c as usize].as_mut().unwrap();
            ch.users -= 1;
            ch.live_bytes -= (addr + size).min(ch.start + ch.size) - addr.max(ch.start);
            p = ch.start + ch.size;
            if ch.users == 0 {
                self.mark_idle(c);
            }
        }
    }

    /// Queues chunk `c`, which no live block touches (any more), as idle: the most recently
    /// idle last.
    pub(crate) fn mark_idle(&mut self, c: u32) {
        self.tick += 1;
        let ch = self.chunks[c as usize].as_mut().unwrap();
        ch.idle_since = self.tick;
        self.idle_bytes += ch.size;
        match self.idle.back_mut() {
            // A loop that frees and takes the same chunk again would push an entry at every
            // free; the last entry, for this chunk, went stale when it was taken again, and
            // now moves to the new tick in place.
            Some(last) if last.1 == c => last.0 = self.tick,
            _ => {
                self.idle.push_back((self.tick, c));
                self.compact_idle_queue();
            }
        }
    }

    /// Maps a new chunk at `start..start + size` (page-aligned, unmapped) and returns its
    /// index; `None` if the device is out of memory.
    pub(crate) fn map_chunk(
        &mut self,
        start: u64,
        size: u64,
        stream: StreamId,
    ) -> Result<Option<u32>, AllocError> {
        match self.device.map(start, size) {
            Ok(()) => {}
            Err(DeviceError::OutOfMemory) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let pages = self.pages(start, size);
        if self.page_chunk.len() < pages.end {
            self.page_chunk.resize(pages.end, 0);
        }
        let c = self.add_chunk(Chunk {
            start,
            size,
            users: 0,
            live_bytes: 0,
            waits: Vec::new(),
            wait_device: false,
            idle_since: 0,
        });
        // a fresh chunk is idle until the block it was mapped for is placed on it
        self.mark_idle(c);
        self.mapped_bytes += size;
        self.high_water = self.high_water.max(self.mapped_bytes);
        self.stats.reserved_bytes.increase(PoolKind::Large, size);
        self.stats.num_device_alloc += 1;
        self.history.record(Action::SegmentMap, start, size, stream);
        Ok(Some(c))
    }

    /// Unmaps chunk `c` (idle, or just mapped and not yet used) and forgets it.
    fn release_chunk(&mut self, c: u32) -> Result<Chunk, AllocError> {
        // Note [Which wait before unmapping] in `packed/waits.rs`
        self.wait_for_chunk(c)?;
        let ch = self.chunks[c as usize].take().expect("a live chunk");
        debug_assert_eq!(ch.users, 0);
        // Note [One wait per call]
        // ------------------------
        // A chunk is idle only once every block on it was freed, and a block is freed only
        // after the program launched its last use of it (or, recorded on other streams, after
        // those streams' events completed). So every piece of work that touches a chunk idle
        // during a call to the allocator was launched before the call began: the program
        // cannot free a block while the call holds the lock, and the allocator's own copies
        // (compaction's) are waited for before `compact` returns. One wait in the call, then,
        // covers every chunk the call unmaps. A wait cost 13-29 µs on average on the H100 (bert,
        // GPT-2), and a call that recycles unmaps several chunks in a row: counted on the
        // simulated device, GPT-2 waits 74 times instead of 247, bert 138 instead of 230
        // (besides the waits of the compaction copies).
        let unmapped = self.device.unmap(ch.start, ch.size);
        // the chunk is gone from the table either way: keep the counts consistent with it
        self.idle_bytes -= ch.size;
        self.mapped_bytes -= ch.size;
        self.vacant_chunks.push(c);
        let pages = self.pages(ch.start, ch.size);
        self.page_chunk[pages].fill(0);
        self.stats.reserved_bytes.decrease(PoolKind::Large, ch.size);
        unmapped?;
        self.stats.num_device_free += 1;
        self.history.record(Action::SegmentUnmap, ch.start, ch.size, StreamId::DEFAULT);
        Ok(ch)
    }

    /// Undoes `map_chunk` for a chunk no piece refers to yet (a mapping that failed halfway).
    pub(crate) fn unmap_fresh_chunk(&mut self, c: u32) -> Result<(), AllocError> {
        self.release_chunk(c).map(|_| ())
    }

    /// Unmaps idle chunk `c`; its address range becomes unmapped free space.
    pub(crate) fn unmap_chunk(&mut self, c: u32) -> Result<(), AllocError> {
        let ch = self.release_chunk(c)?;
        self.unmap_free_range(ch.start, ch.start + ch.size);
        Ok(())
    }

    /// Turns the free pieces over `start..end` (of any streams; no live block may lie there)
    /// into unmapped space, after the pages under them were unmapped.
    pub(crate) fn unmap_free_range(&mut self, start: u64, end: u64) {
        let mut at = self.piece_containing(start).map_or(start, |p| p.0);
        while at < end {
            let (size, kind) = self.spans[&at];
            debug_assert!(matches!(kind, Piece::Free { .. } | Piece::Planned), "only free space is unmapped");
            self.retype_part(at.max(start), (at + size).min(end), Piece::Unmapped);
            at += size;
        }
    }

    /// Gives `[from, to)`, which one free or unmapped piece holds, the kind `kind` (merged
    /// with like neighbours); the rest of that piece keeps its kind.
    pub(crate) fn retype_part(&mut self, from: u64, to: u64, kind: Piece) {
        let (start, size, old) = self.piece_containing(from).expect("a piece holds the range");
        self.take_piece(start);
        if start < from {
            self.set_piece(start, from - start, old);
        }
        if to < start + size {
            self.set_piece(to, start + size - to, old);
        }
        self.insert_free(from, to - from, kind);
    }

    /// Device calls made so far (maps and unmaps).
    pub(crate) fn device_calls(&self) -> u64 {
        (self.stats.num_device_alloc + self.stats.num_device_free) as u64
    }

    /// Whether a queue entry still names an idle chunk.
    pub(crate) fn is_idle_entry(&self, (tick, c): (u64, u32)) -> bool {
        matches!(&self.chunks[c as usize], Some(ch) if ch.users == 0 && ch.idle_since == tick)
    }

    /// The idle chunks, least recently used first.
    pub(crate) fn idle_chunks(&self) -> Vec<u32> {
        self.idle.iter().filter(|&&e| self.is_idle_entry(e)).map(|&(_, c)| c).collect()
    }

    /// Drops stale entries once they outnumber the chunks (with the 1,024 spare, a sweep
    /// every thousand frees or more: the queue stays bounded at a constant cost per free).
    fn compact_idle_queue(&mut self) {
        if self.idle.len() > 2 * self.chunks.len() + 1024 {
            let queue = std::mem::take(&mut self.idle);
            self.idle = queue.into_iter().filter(|&e| self.is_idle_entry(e)).collect();
        }
    }

    /// Unmaps idle chunks, least recently used first, until `needed` more bytes fit under
    /// `limit`; chunks overlapping `keep` stay.
    pub(crate) fn recycle(&mut self, needed: u64, limit: u64, keep: (u64, u64)) -> Result<(), AllocError> {
        let mut i = 0;
        while self.mapped_bytes + needed > limit && i < self.idle.len() {
            let e = self.idle[i];
            if !self.is_idle_entry(e) {
                self.idle.remove(i);
                continue;
            }
            let ch = self.chunks[e.1 as usize].as_ref().unwrap();
            // the plan's region stays mapped while the plan is followed
            if (ch.start + ch.size > keep.0 && ch.start < keep.1) || self.in_plan_region(ch.start) {
                i += 1;
                continue;
            }
            self.idle.remove(i);
            self.unmap_chunk(e.1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sim::SimDevice;

    #[test]
    fn the_idle_queue_stays_bounded_in_a_loop_without_device_calls() {
        let config = AllocatorConfig::parse("policy:gpumem").unwrap();
        let mut p = Packed::new(SimDevice::new(80 << 30), config).unwrap();
        let s = StreamId::DEFAULT;
        let _neighbour = p.malloc(1 << 20, s).unwrap();
        let x = p.malloc(64 << 20, s).unwrap();
        p.free(x).unwrap();
        let calls = p.device_calls();
        for _ in 0..100_000 {
            let x = p.malloc(64 << 20, s).unwrap();
            p.free(x).unwrap();
        }
        assert_eq!(p.device_calls(), calls, "the same pages again and again");
        assert!(p.idle.len() <= 2 * p.chunks.len() + 1025, "{} queue entries", p.idle.len());
    }
}
