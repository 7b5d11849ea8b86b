//! Compaction: giving back the wholly free pages of chunks that still hold live blocks.
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
//! allocates must turn it off (`compact:False`), as it must not rely on `empty_cache` either.
//!
//! The new chunks are sized to the runs of pages under live blocks, so the next time that
//! memory is freed it comes back as smaller chunks: memory is recycled at finer grain exactly
//! where lifetimes turned out to mix, and big chunks stay big elsewhere.

use crate::device::{Device, DeviceError, StreamId};
use crate::error::AllocError;
use crate::history::Action;
use crate::packed::{Chunk, Packed};
use crate::stats::PoolKind;
use std::collections::HashMap;

/// A chunk that compaction would shrink: the runs of pages under its live blocks (with the
/// number of live blocks on each) and the bytes it would give back.
pub(crate) struct Candidate {
    pub chunk: u32,
    pub runs: Vec<(u64, u64, u32)>,
    pub freed: u64,
}

impl<D: Device> Packed<D> {
    /// Every chunk holding a live block that has wholly free pages, outside `keep`, most bytes
    /// to give back first.
    pub(crate) fn compaction_candidates(&self, keep: (u64, u64)) -> Vec<Candidate> {
        let page = self.page;
        let mut blocks: Vec<(u64, u64)> = self.live.iter().map(|(&a, u)| (a, u.size)).collect();
        blocks.sort_unstable();
        // runs of pages under live blocks, per chunk, as (start, end, blocks)
        let mut runs: HashMap<u32, Vec<(u64, u64, u32)>> = HashMap::new();
        for (a, n) in blocks {
            let mut p = a;
            while p < a + n {
                let c = self.chunk_at(p).expect("live blocks are mapped");
                let ch = self.chunks[c as usize].as_ref().unwrap();
                let end = ch.start + ch.size;
                let lo = a.max(ch.start) / page * page;
                let hi = (a + n).min(end).div_ceil(page) * page;
                let r = runs.entry(c).or_default();
                match r.last_mut() {
                    Some(last) if last.1 >= lo => {
                        last.1 = last.1.max(hi);
                        last.2 += 1;
                    }
                    _ => r.push((lo, hi, 1)),
                }
                p = end;
            }
        }
        let mut out: Vec<Candidate> = runs
            .into_iter()
            .filter_map(|(c, runs)| {
                let ch = self.chunks[c as usize].as_ref().unwrap();
                let kept: u64 = runs.iter().map(|r| r.1 - r.0).sum();
                let outside = ch.start >= keep.1 || ch.start + ch.size <= keep.0;
                (kept < ch.size && outside).then(|| Candidate { chunk: c, runs, freed: ch.size - kept })
            })
            .collect();
        out.sort_unstable_by_key(|c| (std::cmp::Reverse(c.freed), c.chunk));
        out
    }

    /// Compacts chunks, most free pages first, until `needed` more bytes fit under `limit`
    /// (Note [Compaction]). Returns whether it compacted any.
    pub(crate) fn compact(&mut self, needed: u64, limit: u64, keep: (u64, u64)) -> Result<bool, AllocError> {
        let candidates = self.compaction_candidates(keep);
        if candidates.is_empty() {
            return Ok(false);
        }
        self.device.synchronize_device()?;
        for cand in candidates {
            if self.mapped_bytes + needed <= limit {
                break;
            }
            // The copy holds both allocations: never more than the growth itself would map.
            let kept = self.chunks[cand.chunk as usize].as_ref().unwrap().size - cand.freed;
            if kept > needed && limit > 0 {
                continue;
            }
            if !self.compact_chunk(&cand)? {
                break; // no memory for the copy: the device is full
            }
        }
        Ok(true)
    }

    /// Gives back every wholly free page of every chunk that holds a live block.
    pub(crate) fn compact_all(&mut self) -> Result<(), AllocError> {
        self.compact(0, 0, (0, 0)).map(|_| ())
    }

    /// Shrinks one chunk to the runs of pages under its live blocks; `false` if the device
    /// had no memory for the copy (nothing changed then).
    fn compact_chunk(&mut self, cand: &Candidate) -> Result<bool, AllocError> {
        let c = cand.chunk;
        let (start, size, other_streams) = {
            let ch = self.chunks[c as usize].as_ref().unwrap();
            (ch.start, ch.size, ch.other_streams)
        };
        let keep: Vec<(u64, u64)> = cand.runs.iter().map(|r| (r.0, r.1 - r.0)).collect();
        match self.device.remap(start, size, &keep) {
            Ok(()) => {}
            Err(DeviceError::OutOfMemory) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        // Both allocations were held during the copy: the peak must say so.
        let kept = size - cand.freed;
        self.stats.reserved_bytes.increase(PoolKind::Large, kept);
        self.high_water = self.high_water.max(self.mapped_bytes + kept);
        self.stats.reserved_bytes.decrease(PoolKind::Large, size);
        self.mapped_bytes -= cand.freed;
        self.chunks[c as usize] = None;
        self.vacant_chunks.push(c);
        self.stats.num_device_free += 1;
        let first = self.pages(start, size);
        self.page_chunk[first].fill(0);
        for &(lo, hi, users) in &cand.runs {
            let chunk = Chunk { start: lo, size: hi - lo, users, other_streams, idle_since: 0 };
            self.add_chunk(chunk);
            self.stats.num_device_alloc += 1;
            self.history.record(Action::SegmentMap, lo, hi - lo, StreamId::DEFAULT);
        }
        // what lies between the runs was wholly free: it becomes unmapped space
        let mut at = start;
        for &(lo, hi, _) in cand.runs.iter().chain(std::iter::once(&(start + size, start + size, 0))) {
            if lo > at {
                self.history.record(Action::SegmentUnmap, at, lo - at, StreamId::DEFAULT);
                self.unmap_free_range(at, lo);
            }
            at = hi;
        }
        Ok(true)
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
