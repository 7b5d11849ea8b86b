//! Compaction: giving back the wholly free pages of chunks that still hold live blocks. It is
//! off by default (`compaction:True` turns it on).
//!
//! Note [Nothing moves under a live block]
//! ---------------------------------------
//! A program may launch work from several threads: PyTorch's autograd threads, DDP's
//! communication hooks, checkpoint threads, any Rust program. Compaction remaps the pages
//! under live blocks, and a kernel that another thread launches on those pages between the
//! allocator's wait for the GPU and the remap reads the old copy, or faults while they are
//! unmapped and kills the CUDA context; the wait itself is device-wide and stalls every
//! other thread's cache hits behind the allocator's lock. No allocator-side lock can stop
//! another thread's launch. So by default nothing moves: every page is a physical
//! allocation of its own (Note [Chunk shapes] in `packed/alloc.rs`), a live block pins only
//! the pages it touches, and only pages no live block touches are ever unmapped, after the
//! events of the streams that freed them (Note [Which wait before unmapping] in
//! `packed/waits.rs`). Measured on the twenty bundled traces, that reserves at most 1.015x the
//! live peak, as compaction did (docs/policy.md), for 8-50x the device calls over a whole
//! replay (none once a periodic plan is followed). Compaction stays for programs in which no
//! thread launches work while another allocates: with it, chunks are large (fewer calls) and
//! their pinned free pages are given back by moving the live ones.
//!
//! Note [Compaction]
//! -----------------
//! A chunk is one physical allocation, and the driver releases a physical allocation only
//! whole. So a chunk mapped for a 200 MiB activation, whose space later holds a few small
//! long-lived blocks among free holes, pins all 200 MiB: measured at the peak of real
//! training traces, such free memory inside chunks still holding a live block was 3-13% of the
//! live bytes, and it was the whole gap between byte-granular packing and the goal of 2%.
//! Mapping every page as its own chunk would avoid it but costs ten times the device calls.
//!
//! Compaction frees those pages where it matters: when a request would raise reserved memory
//! above its peak so far, and recycling idle chunks was not enough, the chunks with the most
//! wholly free pages are *remapped*: the pages under their live blocks get new physical
//! allocations at the same addresses, with the same contents (`Device::remap` copies them on
//! the GPU), and the old allocation goes back, so its free pages become unmapped address
//! space that the request can be mapped into. Pointers never change. It waits for the whole
//! device first, because the copy must see every write to the live blocks, and no kernel may
//! use them while it runs: a program that launches work from one thread while another
//! allocates must turn it off (`compaction:False`). Both allocations exist during a plain
//! copy, and that memory is counted; where it would lift memory above the peak (or the memory
//! fraction), the live bytes wait in free mapped memory elsewhere instead, and memory does not
//! rise at all (Note [The copy's memory]).
//!
//! It is not free: about 100-190 µs per chunk on an H100 staged, 180-390 µs copied between two
//! allocations held at once (`gpumem bench --device cuda`), mostly the release of the old
//! allocation and the mapping of the new. docs/policy.md has what it costs per trace.
//!
//! The new chunks are sized to the runs of pages under live blocks, so the next time that
//! memory is freed it comes back as smaller chunks: memory is recycled at finer grain exactly
//! where lifetimes turned out to mix, and big chunks stay big elsewhere.

use crate::device::{Device, DeviceError, StreamId};
use crate::error::AllocError;
use crate::packed::{Chunk, Packed, Waited};
use crate::report::history::Action;
use crate::report::stats::PoolKind;

/// A chunk that compaction would shrink: the runs of pages under its live blocks (with the
/// number of live blocks and their bytes on each), and the bytes of those runs: what the
/// copy allocates anew and the chunk keeps; and the live blocks on it, as (address, size).
pub(crate) struct Candidate {
    pub chunk: u32,
    pub runs: Vec<Run>,
    pub kept: u64,
    pub live: Vec<(u64, u64)>,
}

/// How a compaction copies the live pages (Note [The copy's memory]).
enum Copy {
    /// On the device, with both allocations held meanwhile.
    Direct,
    /// Through free mapped memory elsewhere, as `(from, to, len)` copies.
    Staged(Vec<(u64, u64, u64)>),
}

/// What became of a chunk's compaction.
#[derive(Debug, PartialEq, Eq)]
enum Compacted {
    Yes,
    /// The device had no memory for the new allocations; nothing changed.
    NoMemory,
    /// The device cannot stage (`DeviceError::Unsupported`); nothing changed.
    CannotStage,
}

/// A run of pages under live blocks: `start..end`, `users` blocks with `live_bytes` on it.
pub(crate) struct Run {
    pub start: u64,
    pub end: u64,
    pub users: u32,
    pub live_bytes: u64,
}

impl<D: Device> Packed<D> {
    /// The chunks that hold a live block and may have wholly free pages, the most free bytes
    /// first (cheap: from the per-chunk counts; `candidate` says exactly).
    pub(crate) fn compaction_order(&self) -> Vec<u32> {
        let mut out: Vec<(u64, u32)> = self
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(c, ch)| {
                let ch = ch.as_ref()?;
                let free = ch.size - ch.live_bytes;
                (ch.users > 0 && free >= self.page && !self.in_plan_region(ch.start))
                    .then_some((free, c as u32))
            })
            .collect();
        out.sort_unstable_by_key(|&(free, c)| (std::cmp::Reverse(free), c));
        out.into_iter().map(|(_, c)| c).collect()
    }

    /// What compacting chunk `c` would keep and give back, `keep` (the place of the request
    /// compaction makes room for) counting as live; `None` if it has no wholly free page.
    ///
    /// Note [Chunks under the request]: a request often lands where a block was just freed,
    /// over a chunk that also holds live blocks and free pages beyond the request's end. Those
    /// pages are given back like any others, and the pages under the request stay (as a run of
    /// their own, idle until it lands). Measured: leaving such chunks alone, a DCGAN whose
    /// cuDNN workspace grows from 48.5 to 52.5 MiB in place reserved 1.033× its live bytes,
    /// compacting them 1.010×; no trace went above 1.02.
    pub(crate) fn candidate(&self, c: u32, keep: (u64, u64)) -> Option<Candidate> {
        let page = self.page;
        let ch = self.chunks[c as usize].as_ref()?;
        let (start, end) = (ch.start, ch.start + ch.size);
        let mut runs: Vec<Run> = Vec::new();
        // the request's place counts as live (its pages stay), but not as a user
        let live = self.live_blocks_in(start, end);
        let mut blocks: Vec<(u64, u64, u32)> = live.iter().map(|&(a, n)| (a, n, 1)).collect();
        if keep.0 < end && keep.1 > start {
            let i = blocks.partition_point(|b| b.0 < keep.0);
            blocks.insert(i, (keep.0, keep.1 - keep.0, 0));
        }
        for (a, n, user) in blocks {
            let lo = a.max(start) / page * page;
            let hi = (a + n).min(end).div_ceil(page) * page;
            let bytes = ((a + n).min(end) - a.max(start)) * user as u64;
            match runs.last_mut() {
                Some(last) if last.end >= lo => {
                    last.end = last.end.max(hi);
                    last.users += user;
                    last.live_bytes += bytes;
                }
                _ => runs.push(Run { start: lo, end: hi, users: user, live_bytes: bytes }),
            }
        }
        let kept: u64 = runs.iter().map(|r| r.end - r.start).sum();
        (kept < ch.size).then_some(Candidate { chunk: c, runs, kept, live })
    }

    /// Checks every chunk's count of live blocks and live bytes against a recount (the
    /// property tests call this after every step, through `Allocator::check_stats`).
    pub(crate) fn check_chunks(&self) -> Result<(), String> {
        for ch in self.chunks.iter().flatten() {
            let (start, end) = (ch.start, ch.start + ch.size);
            let blocks = self.live_blocks_in(start, end);
            let bytes: u64 = blocks.iter().map(|&(a, n)| (a + n).min(end) - a.max(start)).sum();
            if blocks.len() as u32 != ch.users || bytes != ch.live_bytes {
                return Err(format!(
                    "chunk at {start:#x} (+{}) counts {} live blocks and {} live bytes; a recount finds {} and {bytes}",
                    ch.size,
                    ch.users,
                    ch.live_bytes,
                    blocks.len()
                ));
            }
        }
        Ok(())
    }

    /// The live blocks overlapping `lo..hi`, in address order, as (address, size). The range
    /// below the frontier is tiled by free pieces and live blocks, so this walks it from the
    /// last free piece that starts at or before `lo`.
    fn live_blocks_in(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let mut p = self.piece_at_or_before(lo).map_or(self.base, |piece| piece.0);
        let mut out = Vec::new();
        while p < hi && p < self.frontier {
            if let Some(&(size, _)) = self.spans.get(&p) {
                p += size;
            } else {
                let u = self.live.get(&p).expect("the range below the frontier is tiled");
                if p + u.size > lo {
                    out.push((p, u.size));
                }
                p += u.size;
            }
        }
        out
    }

    /// Compacts chunks, most free pages first, until `needed` more bytes fit under `limit`
    /// (Note [Compaction]). Returns whether it compacted any.
    pub(crate) fn compact(&mut self, needed: u64, limit: u64, keep: (u64, u64)) -> Result<bool, AllocError> {
        let order = self.compaction_order();
        if order.is_empty() {
            return Ok(false);
        }
        // Note [The copy's memory]
        // --------------------------
        // A plain remap holds both allocations while it copies the live pages, so compacting a
        // chunk that keeps 4 MiB at the peak would lift the peak by 4 MiB. So the live bytes
        // wait in free mapped memory elsewhere instead (`Device::remap_staged`): copied out,
        // the old allocation released, the new ones mapped, copied back, and memory never
        // rises. Free mapped memory is what compaction exists to give back, so there is nearly
        // always room. It is also the cheaper way on an H100 (`gpumem bench --device cuda`:
        // 110 against 182 µs for a 32 MiB chunk keeping a page, 189 against 255 µs at 256 MiB),
        // as the plain remap maps each new allocation twice, in a scratch range and in place.
        // Where there is no room, a copy that fits under the peak is made the plain way; if
        // none does, the one chunk that keeps the least is compacted the plain way, once: each
        // compaction then makes room for the next. (Letting every copy reach the level the
        // request would have mapped let the peak creep up by a copy's worth at every step of a
        // long training run: vit, 24 steps, 1.026×. Compacting the plain way only, decoding
        // with a growing KV cache crept up 2 MiB at a time, by the one chunk a time compacted
        // above the peak: 1.056×; staged, 1.029×, the floor its layout then set:
        // docs/policy.md.)
        let cands: Vec<Candidate> = order.into_iter().filter_map(|c| self.candidate(c, keep)).collect();
        // The GPU must be done with a chunk's live blocks before it is remapped: one wait,
        // before the first remap, and always, even after another wait in this call, as the
        // chunks hold live blocks. Not before: most calls find no chunk worth compacting
        // (bert: 100 of 138), and their wait was wasted.
        let mut waited = false;
        let compacted = self.compact_candidates(&cands, needed, limit, &mut waited);
        // The last staged remap's copies back may still run (`Device::remap_staged`): they
        // must be done before anything else uses the staging area or the blocks, and before
        // this call unmaps anything without waiting again (Note [One wait per call]). Each
        // remap's own wait, before it unmaps, covers the copies of the remap before it.
        let finished = if waited { self.device.synchronize_device() } else { Ok(()) };
        let any = compacted?;
        finished?;
        Ok(any)
    }

    /// `compact`'s loop over the candidates, waiting for the device (once, `waited`) before
    /// the first remap.
    fn compact_candidates(
        &mut self,
        cands: &[Candidate],
        needed: u64,
        limit: u64,
        waited: &mut bool,
    ) -> Result<bool, AllocError> {
        let mut done = vec![false; cands.len()];
        let mut any = false;
        let mut can_stage = true;
        while self.mapped_bytes + needed > limit {
            let mut progress = false;
            for (i, cand) in cands.iter().enumerate() {
                if self.mapped_bytes + needed <= limit {
                    break;
                }
                let ceiling = if limit > 0 { limit.max(self.high_water) } else { u64::MAX };
                let ceiling = self.allowed_memory_maximum.map_or(ceiling, |max| ceiling.min(max));
                if done[i] {
                    continue;
                }
                let how = match self.staging(cand).filter(|_| can_stage) {
                    Some(save) => Copy::Staged(save),
                    None if self.mapped_bytes + cand.kept <= ceiling => Copy::Direct,
                    None => continue,
                };
                done[i] = true;
                self.wait_once(waited)?;
                match self.compact_chunk(cand, how)? {
                    Compacted::Yes => {}
                    Compacted::NoMemory => return Ok(true), // the device is full
                    Compacted::CannotStage => {
                        can_stage = false;
                        done[i] = false;
                        continue;
                    }
                }
                progress = true;
                any = true;
            }
            if progress {
                continue;
            }
            // nothing fits under the ceiling: compact the chunk that keeps the least, once
            let Some(i) = (0..cands.len()).filter(|&i| !done[i]).min_by_key(|&i| cands[i].kept) else {
                break;
            };
            let kept = cands[i].kept;
            if kept > needed || self.allowed_memory_maximum.is_some_and(|max| self.mapped_bytes + kept > max)
            {
                break;
            }
            done[i] = true;
            self.wait_once(waited)?;
            if self.compact_chunk(&cands[i], Copy::Direct)? != Compacted::Yes {
                break;
            }
            any = true;
        }
        Ok(any)
    }

    /// Waits for the whole device unless `waited` says this compaction did already.
    fn wait_once(&mut self, waited: &mut bool) -> Result<(), AllocError> {
        if !*waited {
            self.device.synchronize_device()?;
            self.waited = Waited::Device;
            *waited = true;
        }
        Ok(())
    }

    /// Where the live bytes of `cand`'s chunk can wait while it is remapped (Note [The copy's
    /// memory]): copies `(from, to, len)` of each run's live extent into the largest free
    /// mapped pieces outside the chunk; `None` if those cannot hold them all.
    fn staging(&self, cand: &Candidate) -> Option<Vec<(u64, u64, u64)>> {
        let ch = self.chunks[cand.chunk as usize].as_ref()?;
        let (lo, hi) = (ch.start, ch.start + ch.size);
        // what must be kept: each run's bytes from its first live byte to its last (the live
        // blocks are those `candidate` found: compacting other chunks moves none)
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(cand.runs.len());
        for &(a, n) in &cand.live {
            let (a, end) = (a.max(lo), (a + n).min(hi));
            match spans.last_mut() {
                // less than a page apart: the pages between are kept too
                Some(last) if a < last.1 + self.page => last.1 = last.1.max(end),
                _ => spans.push((a, end)),
            }
        }
        let need: u64 = spans.iter().map(|s| s.1 - s.0).sum();
        // free mapped space outside the chunk, the largest pieces first, taken only as far as
        // needed (after the device was synchronized, nothing uses free memory of any stream)
        let mut room = self.free.largest_first().flat_map(|(a, n)| {
            let before = (a < lo).then(|| (a, (a + n).min(lo) - a));
            let after = (a + n > hi).then(|| (a.max(hi), a + n - a.max(hi)));
            before.into_iter().chain(after)
        });
        let mut save = Vec::new();
        let (mut at, mut left) = (0, 0);
        for (mut from, end) in spans {
            while from < end {
                if left == 0 {
                    (at, left) = room.next()?;
                }
                let n = left.min(end - from);
                save.push((from, at, n));
                (from, at, left) = (from + n, at + n, left - n);
            }
        }
        debug_assert_eq!(save.iter().map(|s| s.2).sum::<u64>(), need);
        Some(save)
    }

    /// Gives back every wholly free page of every chunk that holds a live block.
    pub(crate) fn compact_all(&mut self) -> Result<(), AllocError> {
        self.compact(0, 0, (0, 0)).map(|_| ())
    }

    /// Shrinks one chunk to the runs of pages under its live blocks, copying them as `how`
    /// says.
    fn compact_chunk(&mut self, cand: &Candidate, how: Copy) -> Result<Compacted, AllocError> {
        let c = cand.chunk;
        let (start, size) = {
            let ch = self.chunks[c as usize].as_ref().unwrap();
            (ch.start, ch.size)
        };
        let keep: Vec<(u64, u64)> = cand.runs.iter().map(|r| (r.start, r.end - r.start)).collect();
        let done = match &how {
            Copy::Direct => self.device.remap(start, size, &keep),
            Copy::Staged(save) => self.device.remap_staged(start, size, &keep, save),
        };
        match done {
            Ok(()) => {}
            Err(DeviceError::OutOfMemory) => return Ok(Compacted::NoMemory),
            Err(DeviceError::Unsupported(_)) if matches!(how, Copy::Staged(_)) => {
                return Ok(Compacted::CannotStage)
            }
            Err(e) => return Err(e.into()),
        }
        if matches!(how, Copy::Direct) {
            // Both allocations were held during the copy: the peak must say so.
            self.stats.reserved_bytes.increase(PoolKind::Large, cand.kept);
            self.high_water = self.high_water.max(self.mapped_bytes + cand.kept);
            self.stats.reserved_bytes.decrease(PoolKind::Large, cand.kept);
        }
        self.stats.reserved_bytes.decrease(PoolKind::Large, size - cand.kept);
        self.mapped_bytes -= size - cand.kept;
        // the device was waited for before the copy: the old chunk's events are all done
        for (_, e) in self.chunks[c as usize].take().map(|ch| ch.waits).unwrap_or_default() {
            self.unref_event(e);
        }
        self.vacant_chunks.push(c);
        self.stats.num_device_free += 1;
        let first = self.pages(start, size);
        self.page_chunk[first].fill(0);
        for r in &cand.runs {
            let (start, size, users, live_bytes) = (r.start, r.end - r.start, r.users, r.live_bytes);
            let c = self.add_chunk(Chunk {
                start,
                size,
                users,
                live_bytes,
                waits: Vec::new(),
                wait_device: false,
                idle_since: 0,
            });
            if users == 0 {
                // a run kept only for the request about to land there: idle until it does
                self.mark_idle(c);
            }
            // the runs stay mapped (in new memory): for the history, only the gaps change
            self.stats.num_device_alloc += 1;
        }
        // what lies between the runs was wholly free: it becomes unmapped space
        let mut at = start;
        let ends =
            cand.runs.iter().map(|r| (r.start, r.end)).chain(std::iter::once((start + size, start + size)));
        for (lo, hi) in ends {
            if lo > at {
                self.history.record(Action::SegmentUnmap, at, lo - at, StreamId::DEFAULT);
                self.unmap_free_range(at, lo);
            }
            at = hi;
        }
        Ok(Compacted::Yes)
    }

    /// Records `chunk` (already mapped) and points its pages at it.
    pub(crate) fn add_chunk(&mut self, chunk: Chunk) -> u32 {
        let pages = self.pages(chunk.start, chunk.size);
        let c = match self.vacant_chunks.pop() {
            Some(c) => {
                self.chunks[c as usize] = Some(chunk);
                c
            }
            None => {
                self.chunks.push(Some(chunk));
                (self.chunks.len() - 1) as u32
            }
        };
        self.page_chunk[pages].fill(c + 1);
        c
    }
}
