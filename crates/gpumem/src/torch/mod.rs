//! The allocator engine: PyTorch's caching algorithm over any [`Device`].
//!
//! This file holds the request path (`malloc`, `free`) and the block surgery it needs
//! (splitting, merging). Releasing memory back to the device lives in `torch/release.rs`, and
//! expandable segments in `torch/expandable.rs`. The engine is single-threaded (`&mut self`);
//! [`crate::Allocator`] puts it behind a lock.
//!
//! Note [Allocated versus active]
//! ------------------------------
//! A block freed by the caller stops being *allocated* at once, but while other streams may
//! still read it (`record_stream`) it stays *active*: it waits for an event on each of those
//! streams, and only when all have completed does it return to the cache ("free completed").
//! That is why `allocated_bytes` drops at `free` while `active_bytes` and `requested_bytes`
//! drop later, exactly as in PyTorch.

pub(crate) mod block;
pub(crate) mod expandable;
mod interface;
mod pool;
mod release;
pub(crate) mod size;
mod snapshot;

use crate::common::PtrMap;
use crate::common::{self, format_size, MAX_REQUEST, MIN_BLOCK_SIZE};
use crate::config::AllocatorConfig;
use crate::device::events::PendingFrees;
use crate::device::{Device, DeviceError, StreamId};
use crate::error::{fraction_hint, AllocError, OutOfMemory};
use crate::report::history::{Action, History};
use crate::report::stats::{DeviceStats, PoolKind};
use crate::torch::block::{Arena, Block, BlockId};
use crate::torch::expandable::ExpandableSegment;
use crate::torch::pool::{BlockPool, Pools};
use crate::torch::size::SMALL_SIZE;

pub(crate) struct Engine<D: Device> {
    pub device: D,
    pub config: AllocatorConfig,
    pub stats: DeviceStats,
    pub blocks: Arena,
    /// The small pool and the large pool.
    pub pools: Pools,
    /// Allocated blocks by address.
    pub live: PtrMap<BlockId>,
    /// Frees waiting for other streams.
    pub pending: PendingFrees<BlockId>,
    /// Bytes held from the device (PyTorch's `total_allocated_memory`).
    pub total_reserved: u64,
    /// The cap from a per-process memory fraction.
    pub allowed_memory_maximum: Option<u64>,
    /// Expandable segments; a slot is `None` once its segment is released.
    pub segments: Vec<Option<ExpandableSegment>>,
    pub history: History,
    /// The device's total memory, read once.
    pub device_total: u64,
}

impl<D: Device> Engine<D> {
    pub(crate) fn new(device: D, config: AllocatorConfig) -> Result<Engine<D>, AllocError> {
        let (_, total) = device.mem_get_info()?;
        Ok(Engine {
            device,
            stats: DeviceStats { max_split_size: config.max_split_size_stat(), ..Default::default() },
            config,
            blocks: Arena::default(),
            pools: Pools::default(),
            live: PtrMap::default(),
            pending: PendingFrees::default(),
            total_reserved: 0,
            allowed_memory_maximum: None,
            segments: Vec::new(),
            history: History::default(),
            device_total: total,
        })
    }

    pub(crate) fn pool(&self, kind: PoolKind) -> &BlockPool {
        self.pools.get(kind)
    }

    fn gc_enabled(&self) -> bool {
        self.allowed_memory_maximum.is_some() && self.config.garbage_collection_threshold > 0.0
    }

    /// Hands out `orig` bytes for use on `stream` (PyTorch's `DeviceCachingAllocator::malloc`).
    pub(crate) fn malloc(&mut self, orig: u64, stream: StreamId) -> Result<u64, AllocError> {
        if orig >= MAX_REQUEST {
            return Err(AllocError::TooLarge(orig));
        }
        self.process_events()?;
        let size = common::round_size(orig, self.config.roundup_power2_divisions_for(orig));
        let kind = if size <= SMALL_SIZE { PoolKind::Small } else { PoolKind::Large };
        let alloc_size = size::allocation_size(size, self.config.large_segment_size);

        let mut found = self.get_free_block(kind, stream, size);
        if found.is_none() {
            if self.gc_enabled() {
                self.garbage_collect()?;
            }
            found = self.alloc_block(kind, stream, size, alloc_size, false)?;
            if found.is_none() && self.release_available_cached_blocks(kind, stream, size)? {
                found = self.alloc_block(kind, stream, size, alloc_size, false)?;
            }
            if found.is_none() {
                self.release_cached_blocks()?;
                found = self.alloc_block(kind, stream, size, alloc_size, true)?;
            }
        }
        let Some(id) = found else {
            return Err(self.out_of_memory(orig, alloc_size, stream));
        };
        let split = self.should_split(id, size);
        Ok(self.alloc_found_block(id, stream, size, orig, split))
    }

    /// Best fit: the smallest cached block of this stream that fits (PyTorch's
    /// `get_free_block`), with the oversize rules of `max_split_size`.
    fn get_free_block(&mut self, kind: PoolKind, stream: StreamId, size: u64) -> Option<BlockId> {
        let gc = self.gc_enabled();
        let expandable_on = self.config.expandable_segments;
        let max_split = self.config.max_split_size;
        let rounding = self.config.max_non_split_rounding_size;
        let blocks = &self.blocks;
        let pool = self.pools.get_mut(kind);
        if gc {
            pool.get_free_blocks_call_count += 1;
        }
        let mut key = pool.blocks.first_fitting(stream.0, size)?;
        if blocks[key.3].expandable.is_some() {
            let mut it = pool.fitting(stream.0, size).peekable();
            it.next(); // `key`
            if expandable_on {
                // Note [Best fit counts growable room]: a free block at the end of an
                // expandable segment can grow into the unmapped range after it, so for best
                // fit its size is what it can expand to.
                let expandable_size = |id: BlockId| {
                    let b = &blocks[id];
                    b.size + b.next.filter(|&n| !blocks[n].mapped).map_or(0, |n| blocks[n].size)
                };
                while blocks[key.3].expandable.is_some() {
                    match it.peek() {
                        Some(next) if expandable_size(next.3) < expandable_size(key.3) => {
                            key = it.next().unwrap();
                        }
                        _ => break,
                    }
                }
            } else {
                key = it.find(|k| blocks[k.3].expandable.is_none())?;
            }
        }
        let found = &blocks[key.3];
        if size < max_split && found.size >= max_split {
            return None; // do not split an oversize block for a normal request
        }
        if size >= max_split && found.size >= size.saturating_add(rounding) {
            return None; // an oversize request may round up only so far
        }
        pool.blocks.remove(&key);
        Some(key.3)
    }

    fn should_split(&self, id: BlockId, size: u64) -> bool {
        let b = &self.blocks[id];
        let remaining = b.size - size;
        if b.pool == PoolKind::Small || self.config.expandable_segments {
            remaining >= MIN_BLOCK_SIZE
        } else {
            size < self.config.max_split_size && remaining > SMALL_SIZE
        }
    }

    /// Gets a new segment from the device (PyTorch's `alloc_block`). `Ok(None)` means the
    /// device is out of memory (or the fraction cap is reached).
    fn alloc_block(
        &mut self,
        kind: PoolKind,
        stream: StreamId,
        size: u64,
        alloc_size: u64,
        is_retry: bool,
    ) -> Result<Option<BlockId>, AllocError> {
        if is_retry {
            self.stats.num_alloc_retries += 1;
        }
        if let Some(max) = self.allowed_memory_maximum {
            if self.total_reserved + alloc_size > max {
                return Ok(None);
            }
        }
        if self.config.expandable_segments {
            return self.try_allocate_expandable_block(kind, stream, size);
        }
        let ptr = match self.device.malloc(alloc_size) {
            Ok(p) => p,
            Err(DeviceError::OutOfMemory) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        self.total_reserved += alloc_size;
        let id = self.blocks.insert(Block::new(ptr, alloc_size, stream, kind));
        self.stats.segment.increase(kind, 1);
        self.stats.reserved_bytes.increase(kind, alloc_size);
        if alloc_size >= self.config.max_split_size {
            self.stats.oversize_segments.increase(1);
        }
        self.stats.num_device_alloc += 1;
        self.history.record(Action::SegmentAlloc, ptr, alloc_size, stream);
        Ok(Some(id))
    }

    /// Splits the found block if asked and hands out its front (PyTorch's `alloc_found_block`).
    fn alloc_found_block(&mut self, id: BlockId, stream: StreamId, size: u64, orig: u64, split: bool) -> u64 {
        let kind = self.blocks[id].pool;
        let already_split = self.blocks[id].is_split();
        let expandable = self.blocks[id].expandable.is_some();
        let block = if split {
            // The new block takes the front; the remainder keeps its place in the segment.
            let rem = id;
            let (ptr, prev) = (self.blocks[rem].ptr, self.blocks[rem].prev);
            let mut nb = Block::new(ptr, size, stream, kind);
            nb.expandable = self.blocks[rem].expandable;
            nb.prev = prev;
            nb.next = Some(rem);
            let nid = self.blocks.insert(nb);
            if let Some(p) = prev {
                self.blocks[p].next = Some(nid);
            }
            let r = &mut self.blocks[rem];
            r.prev = Some(nid);
            r.ptr += size;
            r.size -= size;
            let rem_size = r.size;
            self.pools.get_mut(kind).insert(&mut self.blocks[rem], rem);
            if !expandable {
                if already_split {
                    self.stats.inactive_split_bytes.decrease(kind, size);
                } else {
                    self.stats.inactive_split_bytes.increase(kind, rem_size);
                    self.stats.inactive_split.increase(kind, 1);
                }
            }
            nid
        } else {
            if already_split && !expandable {
                let s = self.blocks[id].size;
                self.stats.inactive_split_bytes.decrease(kind, s);
                self.stats.inactive_split.decrease(kind, 1);
            }
            id
        };
        let b = &mut self.blocks[block];
        b.allocated = true;
        b.requested = orig;
        let (ptr, bsize) = (b.ptr, b.size);
        self.live.insert(ptr, block);
        self.history.record(Action::Alloc, ptr, orig, stream);
        let s = &mut self.stats;
        s.allocation.increase(kind, 1);
        s.allocated_bytes.increase(kind, bsize);
        s.active.increase(kind, 1);
        s.active_bytes.increase(kind, bsize);
        s.requested_bytes.increase(kind, orig);
        if bsize >= self.config.max_split_size {
            s.oversize_allocations.increase(1);
        }
        ptr
    }

    /// Frees the block at `ptr` (PyTorch's `free`): at once, or once the other streams that
    /// used it are done.
    pub(crate) fn free(&mut self, ptr: u64) -> Result<(), AllocError> {
        let id = self.live.remove(&ptr).ok_or(AllocError::InvalidPointer(ptr))?;
        let b = &mut self.blocks[id];
        b.allocated = false;
        let (kind, size, requested, stream) = (b.pool, b.size, b.requested, b.stream);
        self.stats.allocation.decrease(kind, 1);
        self.stats.allocated_bytes.decrease(kind, size);
        self.history.record(Action::FreeRequested, ptr, requested, stream);
        if size >= self.config.max_split_size {
            self.stats.oversize_allocations.decrease(1);
        }
        if self.blocks[id].stream_uses.is_empty() {
            self.free_block(id);
            Ok(())
        } else {
            self.insert_events(id)
        }
    }

    /// Marks the block at `ptr` as used by `stream` too, so that its free waits for `stream`.
    pub(crate) fn record_stream(&mut self, ptr: u64, stream: StreamId) -> Result<(), AllocError> {
        let &id = self.live.get(&ptr).ok_or(AllocError::InvalidPointer(ptr))?;
        let b = &mut self.blocks[id];
        if stream != b.stream && !b.stream_uses.contains(&stream) {
            b.stream_uses.push(stream);
        }
        Ok(())
    }

    /// Returns a block to its pool, merging it with free neighbours (PyTorch's `free_block`).
    pub(crate) fn free_block(&mut self, id: BlockId) {
        let b = &self.blocks[id];
        debug_assert!(!b.allocated && b.event_count == 0 && b.stream_uses.is_empty());
        let (kind, original_size, requested) = (b.pool, b.size, b.requested);
        self.history.record(Action::FreeCompleted, b.ptr, requested, b.stream);
        let mut net_blocks: i64 = 0;
        let mut net_bytes: i64 = 0;
        for candidate in [b.prev, b.next] {
            let subsumed = self.try_merge_blocks(id, candidate);
            if subsumed > 0 {
                net_blocks -= 1;
                net_bytes -= subsumed as i64;
            }
        }
        self.pools.get_mut(kind).insert(&mut self.blocks[id], id);
        let b = &self.blocks[id];
        if b.is_split() {
            net_blocks += 1;
            net_bytes += b.size as i64;
        }
        let s = &mut self.stats;
        // Note: free pages of expandable segments can always be released, so they never
        // count as "non-releasable" (inactive_split), as in PyTorch.
        if b.expandable.is_none() {
            if net_blocks > 0 {
                s.inactive_split.increase(kind, net_blocks as u64);
            } else if net_blocks < 0 {
                s.inactive_split.decrease(kind, (-net_blocks) as u64);
            }
            if net_bytes > 0 {
                s.inactive_split_bytes.increase(kind, net_bytes as u64);
            } else if net_bytes < 0 {
                s.inactive_split_bytes.decrease(kind, (-net_bytes) as u64);
            }
        }
        s.active.decrease(kind, 1);
        s.active_bytes.decrease(kind, original_size);
        s.requested_bytes.decrease(kind, requested);
    }

    /// Merges `src` into its neighbour `dst` if `src` is free and in the same mapped state;
    /// returns the bytes taken over, or 0.
    pub(crate) fn try_merge_blocks(&mut self, dst: BlockId, src: Option<BlockId>) -> u64 {
        let Some(src) = src else { return 0 };
        let s = &self.blocks[src];
        if s.allocated
            || s.event_count > 0
            || !s.stream_uses.is_empty()
            || s.mapped != self.blocks[dst].mapped
        {
            return 0;
        }
        let (s_ptr, s_size, s_prev, s_next, s_mapped) = (s.ptr, s.size, s.prev, s.next, s.mapped);
        let removed = if s_mapped {
            self.pools.get_mut(s.pool).remove(s, src)
        } else {
            self.pools.get_mut(s.pool).remove_unmapped(s, src)
        };
        debug_assert!(removed, "a free neighbour must be cached");
        if self.blocks[dst].prev == Some(src) {
            let d = &mut self.blocks[dst];
            d.ptr = s_ptr;
            d.prev = s_prev;
            if let Some(p) = s_prev {
                self.blocks[p].next = Some(dst);
            }
        } else {
            self.blocks[dst].next = s_next;
            if let Some(n) = s_next {
                self.blocks[n].prev = Some(dst);
            }
        }
        self.blocks[dst].size += s_size;
        self.blocks.remove(src);
        s_size
    }

    pub(crate) fn out_of_memory(&mut self, orig: u64, alloc_size: u64, stream: StreamId) -> AllocError {
        let (free, total) = self.device.mem_get_info().unwrap_or((0, self.device_total));
        self.history.record(Action::Oom, free, orig, stream);
        self.stats.num_ooms += 1;
        let allocated = self.stats.allocated_bytes.all().current as u64;
        let reserved = self.stats.reserved_bytes.all().current as u64;
        let non_releasable = self.stats.inactive_split_bytes.all().current as u64;
        let largest_free_block =
            self.pools.iter().flat_map(|p| p.blocks.iter().map(|k| k.1)).max().unwrap_or(0);
        let unallocated = reserved.saturating_sub(allocated);
        let hint = if let Some(h) = fraction_hint(self.allowed_memory_maximum, alloc_size, free, total) {
            h
        } else if unallocated >= alloc_size || unallocated > reserved / 10 {
            if self.config.expandable_segments {
                "Reserved but unallocated memory is large: the free pieces are too small for this request. Free tensors you no longer need, or set max_split_size_mb to keep large blocks whole.".to_string()
            } else {
                format!(
                    "Reserved but unallocated memory ({}) is large, so the cache is fragmented: set expandable_segments:True (policy torch-expandable) so free pages can be reused anywhere, or max_split_size_mb:{} to keep large blocks from being split.",
                    format_size(unallocated),
                    (alloc_size >> 20).max(20)
                )
            }
        } else {
            "Live blocks hold nearly all reserved memory: free tensors you no longer need, use a smaller batch, or check for leaks with a snapshot.".to_string()
        };
        AllocError::OutOfMemory(Box::new(OutOfMemory {
            device: self.device.index(),
            requested: orig,
            alloc_size,
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
