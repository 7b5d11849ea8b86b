//! Giving memory back: cross-stream events, `empty_cache`, and the out-of-memory recovery
//! ladder.
//!
//! Note [The out-of-memory ladder]
//! ------------------------------
//! When no cached block fits and the device refuses a new segment, PyTorch tries, in order:
//! 1. with `max_split_size` set, free cached oversize blocks (one big enough, or the largest
//!    ones until enough is freed) and retry;
//! 2. wait for every outstanding cross-stream event, free every cached segment that is
//!    wholly free (a block with no neighbours), and retry (this retry is what
//!    `num_alloc_retries` counts).
//!
//! It never moves live blocks, so a segment holding one small live tensor stays reserved:
//! that is the "reserved but unallocated" memory of the out-of-memory message.

use crate::device::{Device, StreamId};
use crate::error::AllocError;
use crate::report::history::Action;
use crate::report::stats::PoolKind;
use crate::torch::block::BlockId;
use crate::torch::Engine;

impl<D: Device> Engine<D> {
    /// Records an event on every other stream that used the block; the block returns to the
    /// cache once all of them have completed.
    pub(crate) fn insert_events(&mut self, id: BlockId) -> Result<(), AllocError> {
        let streams = std::mem::take(&mut self.blocks[id].stream_uses);
        for stream in streams {
            self.pending.record(&self.device, stream, id)?;
            self.blocks[id].event_count += 1;
        }
        Ok(())
    }

    /// Returns to the cache every block whose events have all completed (see
    /// Note [Why per-stream queues]).
    pub(crate) fn process_events(&mut self) -> Result<(), AllocError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        for id in self.pending.completed(&self.device)? {
            self.complete_event_for(id);
        }
        Ok(())
    }

    fn complete_event_for(&mut self, id: BlockId) {
        let b = &mut self.blocks[id];
        b.event_count -= 1;
        if b.event_count == 0 {
            self.free_block(id);
        }
    }

    /// Waits for every outstanding event and frees the blocks they held.
    pub(crate) fn synchronize_and_free_events(&mut self) -> Result<(), AllocError> {
        self.stats.num_sync_all_streams += 1;
        for id in self.pending.wait_all(&self.device)? {
            self.complete_event_for(id);
        }
        Ok(())
    }

    /// `empty_cache()`: waits for pending frees, then gives back every wholly free segment and
    /// every wholly free page of expandable segments.
    pub(crate) fn release_cached_blocks(&mut self) -> Result<(), AllocError> {
        self.synchronize_and_free_events()?;
        self.release_blocks(PoolKind::Large)?;
        self.release_blocks(PoolKind::Small)?;
        Ok(())
    }

    fn release_blocks(&mut self, kind: PoolKind) -> Result<(), AllocError> {
        let keys: Vec<_> = self.pool(kind).blocks.iter().collect();
        let mut to_unmap = Vec::new();
        for (_, _, _, id) in keys {
            let b = &self.blocks[id];
            if b.expandable.is_some() {
                to_unmap.push(id);
            } else if !b.is_split() {
                self.release_block(id)?;
            }
        }
        for id in to_unmap {
            self.unmap_block(id)?;
            if !self.blocks[id].is_split() {
                self.release_expandable_segment(id)?;
            }
        }
        // A segment whose first mapping failed (out of memory) holds address space only;
        // PyTorch keeps it, but nothing would ever free it, so it goes too.
        let empty: Vec<BlockId> =
            self.pool(kind).unmapped.iter().map(|k| k.2).filter(|&id| !self.blocks[id].is_split()).collect();
        for id in empty {
            self.release_expandable_segment(id)?;
        }
        Ok(())
    }

    /// Frees one wholly free segment on the device.
    pub(crate) fn release_block(&mut self, id: BlockId) -> Result<(), AllocError> {
        let b = &self.blocks[id];
        debug_assert!(b.expandable.is_none() && !b.is_split());
        let (ptr, size, kind, stream) = (b.ptr, b.size, b.pool, b.stream);
        self.device.free(ptr)?;
        self.stats.num_device_free += 1;
        self.history.record(Action::SegmentFree, ptr, size, stream);
        self.total_reserved -= size;
        self.stats.segment.decrease(kind, 1);
        self.stats.reserved_bytes.decrease(kind, size);
        if size >= self.config.max_split_size {
            self.stats.oversize_segments.decrease(1);
        }
        let removed = self.pools.get_mut(kind).remove(&self.blocks[id], id);
        debug_assert!(removed);
        self.blocks.remove(id);
        Ok(())
    }

    /// With `max_split_size` set: frees cached oversize blocks of this stream, one large
    /// enough or else the largest ones until enough is freed. Expandable blocks are skipped.
    pub(crate) fn release_available_cached_blocks(
        &mut self,
        kind: PoolKind,
        stream: StreamId,
        size: u64,
    ) -> Result<bool, AllocError> {
        let max_split = self.config.max_split_size;
        if max_split == u64::MAX {
            return Ok(false);
        }
        let key_size = size.max(max_split);
        let pool = self.pools.get(kind);
        let single = pool.fitting(stream.0, key_size).find(|k| self.blocks[k.3].expandable.is_none());
        if let Some(k) = single {
            self.release_block(k.3)?;
            return Ok(true);
        }
        // No single block is large enough: free oversize blocks from the largest down.
        let candidates: Vec<_> = pool
            .blocks
            .below(stream.0, key_size)
            .take_while(|k| k.1 >= max_split)
            .filter(|k| self.blocks[k.3].expandable.is_none())
            .collect();
        let mut released = 0;
        for k in candidates {
            if released >= key_size {
                break;
            }
            released += k.1;
            self.release_block(k.3)?;
        }
        Ok(released >= key_size)
    }

    /// `garbage_collection_threshold`: once reserved memory passes the threshold of the
    /// allowed maximum, frees wholly free large segments that have gone unused longest
    /// (older than the mean age), without waiting on any event.
    pub(crate) fn garbage_collect(&mut self) -> Result<(), AllocError> {
        let Some(allowed) = self.allowed_memory_maximum else {
            return Ok(());
        };
        let threshold = (self.config.garbage_collection_threshold * allowed as f64) as u64;
        if self.total_reserved <= threshold {
            return Ok(());
        }
        let target = self.total_reserved - threshold;
        let clock = self.pool(PoolKind::Large).get_free_blocks_call_count;
        let age = |e: &Self, id: BlockId| (clock - e.blocks[id].gc_count_base) as f64;
        let freeable = |e: &Self| -> Vec<BlockId> {
            e.pool(PoolKind::Large)
                .blocks
                .iter()
                .map(|k| k.3)
                .filter(|&id| !e.blocks[id].is_split() && e.blocks[id].expandable.is_none())
                .collect()
        };
        let mut reclaimed = 0;
        let mut candidates = freeable(self);
        let mut total_age: f64 = candidates.iter().map(|&id| age(self, id)).sum();
        while reclaimed < target && !candidates.is_empty() {
            let threshold_age = total_age / candidates.len() as f64;
            let mut freed_any = false;
            for &id in &candidates {
                if age(self, id) >= threshold_age {
                    total_age -= age(self, id);
                    reclaimed += self.blocks[id].size;
                    self.release_block(id)?;
                    freed_any = true;
                }
            }
            if !freed_any {
                break;
            }
            candidates = freeable(self);
        }
        Ok(())
    }
}

impl<D: Device> Drop for Engine<D> {
    /// Gives every segment and mapping back to the device: an allocator that goes away
    /// must not leak GPU memory (blocks still allocated go with it).
    fn drop(&mut self) {
        let _ = self.synchronize_and_free_events();
        let heads: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.prev.is_none() && b.expandable.is_none())
            .map(|(_, b)| b.ptr)
            .collect();
        for ptr in heads {
            let _ = self.device.free(ptr);
        }
        let _ = self.device.synchronize_device();
        for seg in self.segments.drain(..).flatten() {
            for (i, &m) in seg.mapped.iter().enumerate() {
                if m {
                    let _ = self.device.unmap(seg.base + i as u64 * seg.page, seg.page);
                }
            }
            let _ = self.device.unreserve(seg.base, seg.page * seg.max_pages);
        }
        self.pending.destroy(&self.device);
    }
}
