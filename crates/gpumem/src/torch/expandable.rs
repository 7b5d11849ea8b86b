//! Expandable segments (`expandable_segments:True`): segments that grow by mapping pages.
//!
//! Note [Expandable segments]
//! ------------------------------
//! Instead of one `cuMemAlloc` per segment, each (stream, pool) gets one huge virtual address
//! range (1⅛ × the device's memory, so pages unmapped early can be mapped again at the end),
//! and physical pages are mapped into it as needed: 2 MiB pages for the small pool, 20 MiB
//! for the large one (fewer, larger pages are cheaper to map). A request first looks for the
//! lowest address where free and unmapped blocks together have room, so the segment stays
//! one block as far as possible. `empty_cache` unmaps every wholly free page, even in the
//! middle of a segment. The blocks of a segment, mapped or not, form one linked list; the
//! unmapped ones sit in the pool's `unmapped` set. This mirrors PyTorch's
//! `ExpandableSegment` and its use in `DeviceCachingAllocator`.

use crate::device::{Device, DeviceError, StreamId};
use crate::error::AllocError;
use crate::report::history::Action;
use crate::report::stats::PoolKind;
use crate::torch::block::{Block, BlockId};
use crate::torch::size::SMALL_BUFFER;
use crate::torch::Engine;

/// One reserved address range and the pages mapped into it.
pub(crate) struct ExpandableSegment {
    pub base: u64,
    pub page: u64,
    pub max_pages: u64,
    pub stream: StreamId,
    /// Which pages are mapped.
    pub mapped: Vec<bool>,
}

impl ExpandableSegment {
    fn size(&self) -> u64 {
        self.page * self.max_pages
    }
    fn left(&self, p: u64) -> u64 {
        (p - self.base) / self.page
    }
    fn right(&self, p: u64) -> u64 {
        (p - self.base).div_ceil(self.page)
    }
}

impl<D: Device> Engine<D> {
    fn allocatable(&self, id: Option<BlockId>) -> Option<BlockId> {
        id.filter(|&i| {
            let b = &self.blocks[i];
            !b.allocated && b.event_count == 0 && b.stream_uses.is_empty()
        })
    }

    /// The lowest-addressed place of this stream where free and unmapped blocks together
    /// hold `size` bytes; a new segment if there is none.
    fn find_expandable_block(
        &mut self,
        kind: PoolKind,
        stream: StreamId,
        size: u64,
    ) -> Result<BlockId, AllocError> {
        let has_room = |e: &Self, mut b: Option<BlockId>| {
            let mut bytes = 0;
            while bytes < size {
                let Some(id) = e.allocatable(b) else { break };
                bytes += e.blocks[id].size;
                b = e.blocks[id].next;
            }
            bytes >= size
        };
        let pool = self.pools.get(kind);
        for &(_, _, id) in pool.unmapped.range((stream.0, 0, 0)..).take_while(|k| k.0 == stream.0) {
            let mut c = id;
            if let Some(p) = self.allocatable(self.blocks[id].prev) {
                c = p;
            }
            if has_room(self, Some(c)) {
                return Ok(c);
            }
        }
        let page = if kind == PoolKind::Small { SMALL_BUFFER } else { self.config.large_segment_size };
        let space = self.device_total + self.device_total / 8;
        let max_pages = space.div_ceil(page);
        let base = self.device.reserve(page * max_pages)?;
        let seg = ExpandableSegment { base, page, max_pages, stream, mapped: Vec::new() };
        let mut b = Block::new(base, seg.size(), stream, kind);
        b.mapped = false;
        b.expandable = Some(self.segments.len() as u32);
        self.segments.push(Some(seg));
        let id = self.blocks.insert(b);
        self.pools.get_mut(kind).insert_unmapped(&self.blocks[id], id);
        Ok(id)
    }

    /// Maps pages covering the first `size` bytes of the unmapped block `id`. `Ok(false)`
    /// means the device is out of memory (nothing was mapped).
    fn map_block(&mut self, id: BlockId, size: u64) -> Result<bool, AllocError> {
        let b = &self.blocks[id];
        debug_assert!(!b.mapped && size <= b.size);
        let (ptr, kind, stream, seg_index) = (b.ptr, b.pool, b.stream, b.expandable.unwrap() as usize);
        let seg = self.segments[seg_index].as_mut().expect("live segment");
        let (begin, end) = (seg.left(ptr), seg.right(ptr + size));
        debug_assert_eq!(seg.base + begin * seg.page, ptr);
        if seg.mapped.len() < end as usize {
            seg.mapped.resize(end as usize, false);
        }
        for i in begin..end {
            match self.device.map(seg.base + i * seg.page, seg.page) {
                Ok(()) => seg.mapped[i as usize] = true,
                Err(DeviceError::OutOfMemory) => {
                    for j in begin..i {
                        self.device.unmap(seg.base + j * seg.page, seg.page)?;
                        seg.mapped[j as usize] = false;
                    }
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mapped = (end - begin) * seg.page;
        let pool = self.pools.get_mut(kind);
        pool.remove_unmapped(&self.blocks[id], id);
        self.blocks[id].mapped = true;
        if mapped < self.blocks[id].size {
            let b = &self.blocks[id];
            let mut rest = Block::new(ptr + mapped, b.size - mapped, stream, kind);
            rest.mapped = false;
            rest.expandable = b.expandable;
            rest.prev = Some(id);
            rest.next = b.next;
            let rid = self.blocks.insert(rest);
            if let Some(n) = self.blocks[rid].next {
                self.blocks[n].prev = Some(rid);
            }
            self.blocks[id].next = Some(rid);
            self.blocks[id].size = mapped;
            self.pools.get_mut(kind).insert_unmapped(&self.blocks[rid], rid);
        }
        let (prev, next) = (self.blocks[id].prev, self.blocks[id].next);
        self.try_merge_blocks(id, prev);
        self.try_merge_blocks(id, next);
        self.pools.get_mut(kind).insert(&mut self.blocks[id], id);
        self.total_reserved += mapped;
        self.stats.reserved_bytes.increase(kind, mapped);
        self.stats.num_device_alloc += 1;
        self.history.record(Action::SegmentMap, ptr, mapped, stream);
        Ok(true)
    }

    /// Finds or makes room for `size` bytes in an expandable segment, mapping pages as
    /// needed, and takes the block out of the free pool.
    pub(crate) fn try_allocate_expandable_block(
        &mut self,
        kind: PoolKind,
        stream: StreamId,
        size: u64,
    ) -> Result<Option<BlockId>, AllocError> {
        let mut candidate = self.find_expandable_block(kind, stream, size)?;
        if !self.blocks[candidate].mapped {
            let n = self.blocks[candidate].size.min(size);
            if !self.map_block(candidate, n)? {
                return Ok(None);
            }
        }
        while self.blocks[candidate].size < size {
            // Invariant: candidate is free and mapped, and the block after it is unmapped.
            let remaining = size - self.blocks[candidate].size;
            let next = self.blocks[candidate].next.expect("room was found");
            let n = remaining.min(self.blocks[next].size);
            if !self.map_block(next, n)? {
                return Ok(None);
            }
            candidate = next;
        }
        let removed = self.pools.get_mut(kind).remove(&self.blocks[candidate], candidate);
        debug_assert!(removed);
        Ok(Some(candidate))
    }

    /// Unmaps every whole page inside the free block `id`; the partial pages at either end
    /// stay mapped as free blocks of their own.
    pub(crate) fn unmap_block(&mut self, id: BlockId) -> Result<(), AllocError> {
        let b = &self.blocks[id];
        let (ptr, size, kind, stream) = (b.ptr, b.size, b.pool, b.stream);
        let seg_index = b.expandable.expect("expandable block") as usize;
        let seg = self.segments[seg_index].as_mut().expect("live segment");
        let (begin, end) = (seg.right(ptr), seg.left(ptr + size));
        if begin >= end {
            return Ok(());
        }
        // Unmapping does not wait for the GPU: make sure it is done with the pages. PyTorch
        // synchronizes the segment's stream; that is kept for the default stream, and the
        // whole device, which needs no stream handle, stands in for any other (the program
        // may have destroyed it since).
        if seg.stream == StreamId::DEFAULT {
            self.device.synchronize_stream(seg.stream)?;
        } else {
            self.device.synchronize_device()?;
        }
        for i in begin..end {
            self.device.unmap(seg.base + i * seg.page, seg.page)?;
            seg.mapped[i as usize] = false;
        }
        while seg.mapped.last() == Some(&false) {
            seg.mapped.pop();
        }
        let (uptr, usize_) = (seg.base + begin * seg.page, (end - begin) * seg.page);
        let pool = self.pools.get_mut(kind);
        pool.remove(&self.blocks[id], id);
        let before = uptr - ptr;
        if before > 0 {
            let mut bf = Block::new(ptr, before, stream, kind);
            bf.expandable = Some(seg_index as u32);
            bf.prev = self.blocks[id].prev;
            bf.next = Some(id);
            let bid = self.blocks.insert(bf);
            if let Some(p) = self.blocks[bid].prev {
                self.blocks[p].next = Some(bid);
            }
            self.blocks[id].prev = Some(bid);
            self.pools.get_mut(kind).insert(&mut self.blocks[bid], bid);
        }
        let after = size - (before + usize_);
        if after > 0 {
            let mut af = Block::new(uptr + usize_, after, stream, kind);
            af.expandable = Some(seg_index as u32);
            af.prev = Some(id);
            af.next = self.blocks[id].next;
            let aid = self.blocks.insert(af);
            if let Some(n) = self.blocks[aid].next {
                self.blocks[n].prev = Some(aid);
            }
            self.blocks[id].next = Some(aid);
            self.pools.get_mut(kind).insert(&mut self.blocks[aid], aid);
        }
        let b = &mut self.blocks[id];
        b.ptr = uptr;
        b.size = usize_;
        b.mapped = false;
        let (prev, next) = (b.prev, b.next);
        self.try_merge_blocks(id, prev);
        self.try_merge_blocks(id, next);
        self.pools.get_mut(kind).insert_unmapped(&self.blocks[id], id);
        self.total_reserved -= usize_;
        self.stats.reserved_bytes.decrease(kind, usize_);
        self.stats.num_device_free += 1;
        self.history.record(Action::SegmentUnmap, uptr, usize_, stream);
        Ok(())
    }

    /// Gives back the address range of a segment whose pages are all unmapped.
    pub(crate) fn release_expandable_segment(&mut self, id: BlockId) -> Result<(), AllocError> {
        let b = &self.blocks[id];
        let seg_index = b.expandable.expect("expandable block") as usize;
        let seg = self.segments[seg_index].take().expect("live segment");
        debug_assert!(!b.mapped && b.size == seg.size());
        self.pools.get_mut(b.pool).remove_unmapped(b, id);
        self.blocks.remove(id);
        self.device.unreserve(seg.base, seg.size())?;
        Ok(())
    }
}
