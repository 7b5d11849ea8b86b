//! A pool of cached free blocks, ordered for best fit.
//!
//! Free blocks are ordered by (stream, size, address), exactly as PyTorch's
//! `BlockComparatorSize`: the first block at or after (stream, size, 0) is the smallest block
//! of this stream that fits, and among equal sizes the lowest address wins. Because the
//! stream comes first, each stream has its own free list: a block freed by one stream is
//! never handed to another, so no synchronization is needed on reuse.
//!
//! Unmapped address ranges of expandable segments are kept apart, by (stream, address).

use crate::common::PtrMap;
use crate::report::stats::PoolKind;
use crate::torch::block::{Block, BlockId};
use std::collections::{BTreeMap, BTreeSet};

/// A free block's place in best-fit order: (stream, size, address, id).
pub(crate) type SizeKey = (u64, u64, u64, BlockId);

/// Free mapped blocks in PyTorch's best-fit order.
///
/// Note [One tree per stream]
/// --------------------------
/// A search never crosses streams, so each stream has its own tree, keyed by size and
/// address packed in one `u128` (a single comparison instead of a four-field tuple's): the
/// same order as PyTorch's (stream, size, address), since free blocks of a pool never share
/// an address. The stream's tree is found by a hash lookup. Walks of the whole pool (release,
/// garbage collection) visit the streams in order, so they see PyTorch's order too.
#[derive(Default)]
pub(crate) struct FreeBlocks {
    by_stream: PtrMap<BTreeMap<u128, BlockId>>,
}

fn packed(size: u64, ptr: u64) -> u128 {
    (size as u128) << 64 | ptr as u128
}

fn unpack(stream: u64, k: u128, id: BlockId) -> SizeKey {
    (stream, (k >> 64) as u64, k as u64, id)
}

impl FreeBlocks {
    pub(crate) fn insert(&mut self, k: SizeKey) -> bool {
        self.by_stream.entry(k.0).or_default().insert(packed(k.1, k.2), k.3).is_none()
    }

    pub(crate) fn remove(&mut self, k: &SizeKey) -> bool {
        self.by_stream.get_mut(&k.0).and_then(|t| t.remove(&packed(k.1, k.2))).is_some()
    }

    /// Every free block, in (stream, size, address) order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = SizeKey> + '_ {
        let mut streams: Vec<u64> = self.by_stream.keys().copied().collect();
        streams.sort_unstable();
        streams.into_iter().flat_map(move |s| self.by_stream[&s].iter().map(move |(&k, &id)| unpack(s, k, id)))
    }

    /// Free blocks of `stream` of at least `size` bytes, smallest first.
    pub(crate) fn fitting(&self, stream: u64, size: u64) -> impl Iterator<Item = SizeKey> + '_ {
        self.by_stream
            .get(&stream)
            .into_iter()
            .flat_map(move |t| t.range(packed(size, 0)..).map(move |(&k, &id)| unpack(stream, k, id)))
    }

    /// Free blocks of `stream` smaller than `size` bytes, largest first.
    pub(crate) fn below(&self, stream: u64, size: u64) -> impl Iterator<Item = SizeKey> + '_ {
        self.by_stream
            .get(&stream)
            .into_iter()
            .flat_map(move |t| t.range(..packed(size, 0)).rev().map(move |(&k, &id)| unpack(stream, k, id)))
    }
}

#[derive(Default)]
pub(crate) struct BlockPool {
    /// Free mapped blocks by (stream, size, address).
    pub blocks: FreeBlocks,
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
    pub(crate) fn fitting(&self, stream: u64, size: u64) -> impl Iterator<Item = SizeKey> + '_ {
        self.blocks.fitting(stream, size)
    }
}
