//! Following a periodic plan: where the `gpumem` policy places the blocks of a training
//! loop's period at the addresses planned for them (Note [Periodic plans] in `packed/plan.rs`).
//!
//! The plan's *region* is a range of address space above everything else, as large as the
//! plan needs. Its free space is `Piece::Planned` (mapped) or `Piece::Reserved` (not yet
//! mapped), and only planned blocks use it. Its pages are mapped the first time a planned
//! block needs them, recycling idle memory elsewhere first so that reserved memory stays
//! under its peak, and then stay mapped: recycling and compaction leave the region alone,
//! and the next period's blocks find their pages mapped.
//!
//! Note [Holes]
//! ------------
//! Weights and optimizer state live outside the region, where best fit put them, often
//! among the first step's activations. The pages they touch stay mapped, and so do the holes
//! between them inside those pages: measured on a ViT, 106 holes of up to 2 MiB, 3.5% of the
//! live bytes, which best fit used to fill with small activations. The plan gets those holes
//! too: a small block goes into one where it fits at no cost, and the holes' free space
//! becomes `Piece::Planned` like the region's.

use crate::device::{Device, StreamId};
use crate::error::AllocError;
use crate::packed::plan::{Entry, Plan, Spot, MAX_MISSES};
use crate::packed::{chunk_len, Packed, Piece, MAX_CHUNK};

/// The plan being followed: where its region and holes lie and which request comes next.
pub(crate) struct ActivePlan {
    pub plan: Plan,
    pub base: u64,
    pub end: u64,
    /// The holes between long-lived blocks that the plan uses, as (start, end), by address.
    pub holes: Vec<(u64, u64)>,
    /// The request of the period expected next.
    pub phase: usize,
    /// Requests in a row that did not match the plan.
    pub misses: u32,
    /// Whether the plan's entry request has come (before it, requests only advance the
    /// phase).
    pub started: bool,
    /// The most memory may be mapped while the plan is followed (Note [The plan's
    /// ceiling]).
    pub ceiling: u64,
}

impl ActivePlan {
    /// The end of the plan's space that holds `addr` (region or hole), if any.
    fn space_end(&self, addr: u64) -> Option<u64> {
        if addr >= self.base && addr < self.end {
            return Some(self.end);
        }
        let i = self.holes.partition_point(|h| h.1 <= addr);
        self.holes.get(i).filter(|h| h.0 <= addr).map(|h| h.1)
    }
}

/// Whether a plan for a period whose blocks hold at most `lower_bound` bytes at once, and
/// `least_live` at the period's quietest request, can take over from best fit.
///
/// Note [Taking over]
/// ------------------
/// The plan is followed from the point of its period where its blocks hold the least: the
/// blocks live then were placed by best fit and stay where they are, while their places in
/// the plan wait for the next period. Measured: where they held 0.6-4% of the plan's peak
/// (U-Net, ResNet-50, GPT-2), the plan took over within the peak; where they held 14% and 19%
/// (ViT, a transformer LM), the old layout did not give way and the peak rose by 2-4%. Such a
/// plan is not followed, and since both figures are known before the blocks are packed, it
/// is not even made (packing ViT's period three ways took 1.2 ms, a fifth of its replay on the
/// simulated device).
///
/// Note [Taking over with the gradients live] (2026-12-03)
/// -------------------------------------------------------
/// The bound was 5% until then, and ViT's plan never took over: there `zero_grad` comes after
/// the forward pass, so the fp32 gradients (86 M parameters, 366 MB) live across every step
/// boundary, 13.6% of the period's peak, because ViT-B's activations at batch 32 are small
/// beside its parameters (GPT-2's and ResNet-50's gradients are 4-5% of theirs). Best fit
/// then made 160 device calls a step for good (1,928 in the second half of 24 steps). With
/// the one-page chunks of the safe default, recycling gathers the old layout's memory as its
/// blocks are freed, so the old gradients cost only their pages' slack during the first
/// period followed (32 MB on ViT: the peak went from 3,846 to 3,852 MB, 1.0164x its live
/// bytes) and the plan then makes no device call. The transformer LM (19%) still fails: its
/// plan took over and made more calls (1,104 → 1,552 in the second half), so the bound is a
/// sixth. The DCGAN v2 (8%) now takes over too: 1.0104x → 1.0193x, 294 → 197 calls in its
/// second half (the takeover's transient), and the 4-step ViT, whose plan is made but whose
/// entry never comes, 364 → 368 (the region moves the frontier, where best fit grows). The
/// plan's ceiling had to rise with it (Note [The plan's ceiling]).
/// Gathering the old layout's memory at the entry needs either compaction or chunks of one
/// page: with `compaction:False` and the pages inside a block mapped as one chunk (an
/// earlier shape), a GPT-2 plan took the peak to 1.104× instead of 1.056×; with every page a
/// chunk, recycling alone gathers it (GPT-2 over 24 steps: 1.0040×).
pub(crate) fn can_take_over(lower_bound: u64, least_live: u64) -> bool {
    least_live <= lower_bound / 6
}

impl<D: Device> Packed<D> {
    /// Whether `addr` lies in the plan's region (whose chunks recycling and compaction
    /// leave alone).
    pub(crate) fn in_plan_region(&self, addr: u64) -> bool {
        self.plan.as_ref().is_some_and(|p| addr >= p.base && addr < p.end)
    }

    /// The holes that free space inside the pages of long-lived blocks offers a plan: the
    /// live blocks of requests before `first_seq`, and the pages they touch; of those pages,
    /// what no such block covers (Note [Holes]). Also the bytes of those pages: what the
    /// long-lived blocks will keep mapped.
    pub(crate) fn long_lived_holes(&self, first_seq: u64) -> (Vec<(u64, u64)>, u64) {
        let page = self.page;
        let mut blocks: Vec<(u64, u64)> =
            self.live.iter().filter(|(_, u)| u.seq < first_seq).map(|(&a, u)| (a, a + u.size)).collect();
        blocks.sort_unstable();
        let mut holes = Vec::new();
        let mut run_end = 0; // end of the pages touched by the blocks so far
        let mut covered = 0; // end of the last block
        let mut pinned = 0;
        for (lo, hi) in blocks {
            let first_page = lo / page * page;
            pinned += hi.div_ceil(page) * page - first_page.max(run_end).min(hi.div_ceil(page) * page);
            if first_page < run_end && covered < lo {
                holes.push((covered, lo)); // between two blocks on the same pages
            } else if first_page >= run_end {
                if covered < run_end {
                    holes.push((covered, run_end)); // the rest of the last block's page
                }
                if first_page < lo {
                    holes.push((first_page, lo)); // the start of this block's page
                }
            }
            covered = covered.max(hi);
            run_end = run_end.max(hi.div_ceil(page) * page);
        }
        if covered < run_end {
            holes.push((covered, run_end));
        }
        (holes.into_iter().map(|(lo, hi)| (lo, hi - lo)).collect(), pinned)
    }

    /// Starts following `plan`, with a region at the top of the used address space and the
    /// `holes` it was given. A plan that would need more memory than best fit reserved so
    /// far, with the `pinned` bytes of the pages of long-lived blocks and the pages its
    /// unplanned blocks take, is not followed, and not made again. (One whose blocks never
    /// come close to all being freed is refused before it is made: `can_take_over`.)
    pub(crate) fn adopt(&mut self, plan: Plan, holes: &[(u64, u64)], pinned: u64) {
        let page = self.page;
        let size = plan.extent.div_ceil(page) * page;
        // Note [What a plan leaves outside its region]
        // --------------------------------------------
        // Following a plan keeps mapped, besides the region, the pages of the long-lived
        // blocks (`pinned`) and the pages of the period's blocks that outlive it: those are
        // not planned, and best fit places them outside the region every period. A plan whose
        // region and those pages together would need more than best fit's peak so far is not
        // followed. Measured on diffusion sampling: counting only the long-lived pages (40 MiB)
        // and allowing two pages more, a 314 MiB plan was taken over with 44 MiB still mapped
        // outside it (each step's 1.5 MiB block that lives into the next step, across two
        // pages), and the peak rose from 354 to 358 MiB (1.0212x its live bytes); counted
        // (that block and a 512-byte one, a page each), the plan is refused and best fit holds
        // 1.0098x.
        let outside: u64 =
            plan.entries.iter().filter(|e| e.spot.is_none()).map(|e| e.size.div_ceil(page) * page).sum();
        let loose = pinned + outside + size > self.high_water + self.high_water / 256;
        let base = self.frontier;
        if loose || base + size > self.base + self.va_size {
            self.detector.reject(plan.period as u64);
            self.detector.restart();
            return;
        }
        // Note [The plan's ceiling]: while the plan takes over, the old layout's blocks
        // still hold memory outside the region; if they do not give way, following the plan
        // would raise the peak. Past this ceiling the plan is dropped and not made again.
        // It was 0.8% above the peak: ViT's takeover with its gradients live (Note [Taking
        // over with the gradients live]) needs 1.1% (3,852 MB against 3,810), and a plan
        // dropped halfway through its takeover is the worst case of all (its region stays
        // mapped beside best fit's growth: ViT 1.045x). At 1.6% no other bundled trace moved.
        let ceiling = self.high_water + self.high_water / 64 + 4 * page;
        self.frontier = base + size;
        if size > 0 {
            self.set_piece(base, size, Piece::Reserved);
        }
        let mut used: Vec<(u64, u64)> = holes
            .iter()
            .filter(|h| {
                plan.entries
                    .iter()
                    .any(|e| matches!(e.spot, Some(Spot::Hole(a)) if a >= h.0 && a < h.0 + h.1))
            })
            .map(|&(a, n)| (a, a + n))
            .collect();
        used.sort_unstable();
        self.plan = Some(Box::new(ActivePlan {
            plan,
            base,
            end: base + size,
            holes: used,
            phase: 0,
            misses: 0,
            started: false,
            ceiling,
        }));
    }

    /// Gives the free pieces of `[lo, hi)` that `from` accepts the kind `to` (they lie
    /// between live blocks, so no merging is needed beyond their like neighbours).
    fn retype_free(&mut self, lo: u64, hi: u64, from: impl Fn(Piece) -> bool, to: Piece) {
        let mut at = self.piece_containing(lo).map_or(lo, |p| p.0);
        while at < hi {
            match self.spans.get(&at).copied() {
                Some((n, kind)) => {
                    if !from(kind) {
                        at += n;
                        continue;
                    }
                    self.take_piece(at);
                    self.insert_free(at, n, to);
                    // merged with its neighbours, or gone above the frontier
                    match self.piece_containing(at) {
                        Some((s, m, _)) => at = s + m,
                        None => break,
                    }
                }
                None => match self.live.get(&at) {
                    Some(u) => at += u.size,
                    None => break, // the frontier
                },
            }
        }
    }

    /// The planned address of this request, with its pages mapped, if it is the request the
    /// plan expects and its place is free; `None` sends it to best fit.
    pub(crate) fn place_planned(&mut self, size: u64, stream: StreamId) -> Result<Option<u64>, AllocError> {
        let Some(ap) = self.plan.as_mut() else {
            return Ok(None);
        };
        let n = ap.plan.period;
        let matches = |e: &Entry| e.size == size && e.stream == stream.0;
        let mut e = ap.plan.entries[ap.phase];
        if !matches(&e) {
            let next = ap.plan.entries[(ap.phase + 1) % n];
            if !matches(&next) {
                // an extra request: wait for the expected one, unless the loop has changed
                ap.misses += 1;
                if ap.misses > MAX_MISSES {
                    self.dissolve_plan();
                }
                return Ok(None);
            }
            // the expected request did not come: this is the one after it
            ap.phase = (ap.phase + 1) % n;
            e = next;
        }
        let starts = !ap.started && ap.phase == ap.plan.entry;
        ap.started |= starts;
        ap.phase = (ap.phase + 1) % n;
        ap.misses = 0;
        if starts {
            // the holes' free space of the plan's stream becomes the plan's (not before: best
            // fit uses it until then)
            let (holes, stream) = (ap.holes.clone(), Piece::Free { stream: ap.plan.stream });
            for (lo, hi) in holes {
                self.retype_free(lo, hi, |k| k == stream, Piece::Planned);
            }
            self.map_region_ahead()?;
        }
        let Some(ap) = self.plan.as_mut() else {
            return Ok(None);
        };
        let addr = match e.spot {
            _ if !ap.started => return Ok(None),
            None => return Ok(None),
            Some(Spot::Region(offset)) => ap.base + offset,
            Some(Spot::Hole(addr)) => addr,
        };
        if !self.plan_room_is_free(addr, size) || !self.map_planned(addr, size, stream)? {
            return Ok(None);
        }
        self.carve_planned(addr, size);
        Ok(Some(addr))
    }

    /// Whether `[addr, addr + size)` is the plan's free space (a block planned there may have
    /// been freed later than last time, or best fit may hold it while the plan takes over).
    fn plan_room_is_free(&self, addr: u64, size: u64) -> bool {
        let Some((mut at, first, kind)) = self.piece_containing(addr) else {
            return false;
        };
        let mut ok = matches!(kind, Piece::Planned | Piece::Reserved);
        at += first;
        while ok && at < addr + size {
            match self.spans.get(&at) {
                Some(&(n, Piece::Planned | Piece::Reserved)) => at += n,
                _ => ok = false,
            }
        }
        ok
    }

    /// Maps the region's unmapped pages under `[addr, addr + size)`, recycling idle memory
    /// elsewhere first if they would lift reserved memory above its peak; `false` if the
    /// device or the memory fraction has no room, or the plan has just been dropped (the
    /// request then goes to best fit).
    fn map_planned(&mut self, addr: u64, size: u64, stream: StreamId) -> Result<bool, AllocError> {
        let page = self.page;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut at = addr;
        while at < addr + size {
            let (start, n, kind) = self.piece_containing(at).expect("checked free");
            if kind == Piece::Reserved {
                let lo = (at / page * page).max(start);
                let hi = ((addr + size).div_ceil(page) * page).min(start + n);
                runs.push((lo, hi));
            }
            at = start + n;
        }
        let need: u64 = runs.iter().map(|r| r.1 - r.0).sum();
        if need == 0 {
            return Ok(true);
        }
        if self.allowed_memory_maximum.is_some_and(|max| self.mapped_bytes + need > max) {
            return Ok(false);
        }
        self.make_room(need, (addr, addr + size))?;
        if self.plan_costs_memory(need) {
            return Ok(false);
        }
        for (lo, hi) in runs {
            if !self.map_reserved(lo, hi, stream, u64::MAX)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Recycles idle chunks outside `keep`, then compacts, if `need` more bytes would lift
    /// reserved memory above its peak.
    fn make_room(&mut self, need: u64, keep: (u64, u64)) -> Result<(), AllocError> {
        if self.mapped_bytes + need > self.high_water {
            self.recycle(need, self.high_water, keep)?;
            if self.config.packed.compaction && self.mapped_bytes + need > self.high_water {
                self.compact(need, self.high_water, keep)?;
            }
        }
        Ok(())
    }

    /// Maps the region's reserved `[lo, hi)` in chunks of up to `MAX_CHUNK`, as long as
    /// reserved memory stays within `limit`; `false` where it stopped (no room, or the device
    /// is full).
    fn map_reserved(&mut self, lo: u64, hi: u64, stream: StreamId, limit: u64) -> Result<bool, AllocError> {
        let mut at = lo;
        while at < hi {
            // the region stays mapped while the plan is followed: big chunks, few calls
            let n = chunk_len(hi - at, MAX_CHUNK);
            if self.mapped_bytes + n > limit || self.map_chunk(at, n, stream)?.is_none() {
                return Ok(false);
            }
            self.retype_part(at, at + n, Piece::Planned);
            at += n;
        }
        Ok(true)
    }

    /// Note [Mapping the region ahead]
    /// -------------------------------
    /// Mapped block by block, the region would cost a device call for most blocks of the
    /// first period followed (GPT-2: about 400). At the plan's entry the blocks of the old
    /// layout are mostly gone, so their memory is gathered (recycled and compacted) at once,
    /// and the region is mapped in chunks of up to `MAX_CHUNK`, as far as the peak allows,
    /// except where the blocks still live in the old layout will next go: those pages are
    /// mapped when their blocks come, after the old ones are freed.
    fn map_region_ahead(&mut self) -> Result<(), AllocError> {
        let Some(ap) = self.plan.as_ref() else {
            return Ok(());
        };
        let page = self.page;
        let (base, end, stream) = (ap.base, ap.end, StreamId(ap.plan.stream));
        let mut late: Vec<(u64, u64)> = ap
            .plan
            .entries
            .iter()
            .filter(|e| e.at_entry)
            .filter_map(|e| match e.spot {
                Some(Spot::Region(o)) => {
                    Some((base + o) / page * page..(base + o + e.size).div_ceil(page) * page)
                }
                _ => None,
            })
            .map(|r| (r.start, r.end))
            .collect();
        late.sort_unstable();
        // the region minus the late pages
        let mut want: Vec<(u64, u64)> = Vec::new();
        let mut at = base;
        for (lo, hi) in late.into_iter().chain(std::iter::once((end, end))) {
            if lo > at {
                want.push((at, lo));
            }
            at = at.max(hi);
        }
        let need: u64 = want.iter().map(|w| w.1 - w.0).sum();
        self.make_room(need, (base, end))?;
        // nothing of the region is mapped yet: the plan's first block is being placed
        let limit = self.allowed_memory_maximum.map_or(self.high_water, |m| m.min(self.high_water));
        for (lo, hi) in want {
            if !self.map_reserved(lo, hi, stream, limit)? {
                break; // the rest is mapped block by block
            }
        }
        Ok(())
    }

    /// Takes `[addr, addr + size)` out of the planned free piece that holds it.
    fn carve_planned(&mut self, addr: u64, size: u64) {
        let (start, n, kind) = self.piece_containing(addr).expect("a planned piece");
        debug_assert!(kind == Piece::Planned && addr + size <= start + n);
        if start == addr {
            if n > size {
                self.advance_piece(addr, size);
            } else {
                self.take_piece(addr);
            }
        } else {
            self.resize_piece(start, addr - start);
            if addr + size < start + n {
                self.set_piece(addr + size, start + n - addr - size, Piece::Planned);
            }
        }
    }

    /// Returns the freed block `[ptr, ptr + size)` of `stream` to free space: the part in
    /// the plan's region or holes to the plan, the rest to its stream.
    ///
    /// Note [The plan's space belongs to its stream]
    /// ---------------------------------------------
    /// Planned blocks are all of the plan's stream, which reuses the plan's free space
    /// without waiting. A block of another stream that lay in a hole when the plan began (a
    /// side stream's buffer among the weights) may still be read by its stream's work after
    /// it is freed, so its bytes stay free space of its own stream, never the plan's: a
    /// planned block that would need them goes to best fit instead. Handing them to the plan
    /// made 14 unsynchronized reuses (1.2 MB) on a 24-step GPT-2 with a side stream woven in.
    pub(crate) fn release_block(&mut self, ptr: u64, size: u64, stream: StreamId) {
        let mine = Piece::Free { stream: stream.0 };
        let Some(ap) = self.plan.as_ref().filter(|ap| ap.plan.stream == stream.0) else {
            return self.insert_free(ptr, size, mine);
        };
        let end = ptr + size;
        match ap.space_end(ptr) {
            Some(e) if e >= end => self.insert_free(ptr, size, Piece::Planned),
            Some(e) => {
                self.insert_free(ptr, e - ptr, Piece::Planned);
                self.insert_free(e, end - e, mine);
            }
            None => {
                // the block may end in a hole that starts inside it
                let i = ap.holes.partition_point(|h| h.1 <= ptr);
                match ap.holes.get(i).map(|h| h.0).filter(|&lo| lo < end) {
                    Some(lo) => {
                        self.insert_free(ptr, lo - ptr, mine);
                        self.release_block(lo, end - lo, stream);
                    }
                    None => self.insert_free(ptr, size, mine),
                }
            }
        }
    }

    /// Drops the plan, and never makes it again, if mapping `need` more bytes would take
    /// reserved memory past the plan's ceiling (Note [The plan's ceiling]).
    pub(crate) fn plan_costs_memory(&mut self, need: u64) -> bool {
        let Some(ap) = self.plan.as_ref() else {
            return false;
        };
        if self.mapped_bytes + need <= ap.ceiling {
            return false;
        }
        let period = ap.plan.period as u64;
        self.dissolve_plan();
        self.detector.reject(period);
        true
    }

    /// Stops following the plan: its region and holes become ordinary free memory of the
    /// plan's stream (mapped or not), recycled like any other, and the detector starts over.
    pub(crate) fn dissolve_plan(&mut self) {
        let Some(ap) = self.plan.take() else {
            return;
        };
        let free = Piece::Free { stream: ap.plan.stream };
        for &(lo, hi) in ap.holes.iter().chain(std::iter::once(&(ap.base, ap.end))) {
            self.retype_free(lo, hi, |k| k == Piece::Planned, free);
            self.retype_free(lo, hi, |k| k == Piece::Reserved, Piece::Unmapped);
        }
        self.detector.restart();
    }
}
