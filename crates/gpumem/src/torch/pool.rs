//! A pool of cached free blocks, ordered for best fit.
//!
//! Free blocks are ordered by (stream, size, address), exactly as PyTorch's
//! `BlockComparatorSize`: the first block at or after (stream, size, 0) is the smallest block
//! of this stream that fits, and among equal sizes the lowest address wins. Because the
//! stream comes first, each stream has its own free list: a block freed by one stream is
//! never handed to another, so no synchronization is needed on reuse.
//!
//! Unmapped address ranges of expandable segments are kept apart, by (stream, address).

use crate::report::stats::PoolKind;
use crate::torch::block::{Block, BlockId};
use std::collections::BTreeSet;
use std::ops::Bound::{Included, Unbounded};

pub(crate) type SizeKey = (u64, u64, u64, BlockId);

#[derive(Default)]
pub(crate) struct BlockPool {
    /// Free mapped blocks by (stream, size, address).
    pub blocks: BTreeSet<SizeKey>,
    /// Unmapped ranges of expandable segments by (stream, address).
    pub unmapped: BTreeSet<(u64, u64, BlockId)>,
    /// Searches so far; a block's age for the garbage collector is measured in these.
    pub get_free_blocks_call_count: i64,
}

/// The small pool (blocks of requests up to 1 MiB) and the large pool, named by
/// [`PoolKind`]: the one numbering of the pools is the stats' (`PoolKind::index`).
#[derive(Default)]
pub(crate) struct Pools {
    small: BlockPool,
    large: BlockPool,
}

impl Pools {
    pub(crate) fn get(&self, kind: PoolKind) -> &BlockPool {
        match kind {
            PoolKind::Small => &self.small,
            PoolKind::Large => &self.large,
        }
    }

    pub(crate) fn get_mut(&mut self, kind: PoolKind) -> &mut BlockPool {
        match kind {
            PoolKind::Small => &mut self.small,
            PoolKind::Large => &mut self.large,
        }
    }

    /// Both pools.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &BlockPool> {
        [&self.small, &self.large].into_iter()
    }
}

pub(crate) fn size_key(b: &Block, id: BlockId) -> SizeKey {
    (b.stream.0, b.size, b.ptr, id)
}

impl BlockPool {
    /// Caches a free block, stamping its age.
    pub(crate) fn insert(&mut self, b: &mut Block, id: BlockId) {
        b.gc_count_base = self.get_free_blocks_call_count;
        let fresh = self.blocks.insert(size_key(b, id));
        debug_assert!(fresh, "block cached twice");
    }

    pub(crate) fn remove(&mut self, b: &Block, id: BlockId) -> bool {
        self.blocks.remove(&size_key(b, id))
    }

    pub(crate) fn insert_unmapped(&mut self, b: &Block, id: BlockId) {
        self.unmapped.insert((b.stream.0, b.ptr, id));
    }

    pub(crate) fn remove_unmapped(&mut self, b: &Block, id: BlockId) -> bool {
        self.unmapped.remove(&(b.stream.0, b.ptr, id))
    }

    /// Free blocks of `stream` of at least `size` bytes, smallest first.
    pub(crate) fn fitting(&self, stream: u64, size: u64) -> impl Iterator<Item = &SizeKey> {
        self.blocks.range((Included((stream, size, 0, 0)), Unbounded)).take_while(move |k| k.0 == stream)
    }
}
