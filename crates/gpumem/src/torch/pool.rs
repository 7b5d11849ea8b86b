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

pub(crate) type SizeKey = (u64, u64, u64, BlockId);

/// How many of the most recently cached blocks stay out of the tree.
const RECENT: usize = 4;

/// The free mapped blocks of a pool in (stream, size, address) order.
///
/// Note [Recent blocks stay out of the tree]
/// -----------------------------------------
/// A cache hit takes a block out of the pool and puts its split-off remainder in; the free
/// that follows takes the remainder out again and puts the merged block back: four tree
/// updates and a search per pair, most of the hit's cost. The last few blocks cached are
/// therefore kept in a small array beside the tree, and leave it without touching the
/// tree; the oldest goes into the tree when a new one needs its place. The tree's answer
/// to the last best-fit search is remembered until the tree changes. Every search sees the
/// tree and the array merged, so the order, and every decision, is exactly PyTorch's: a
/// loop that allocates and frees the same sizes makes no tree operation at all.
#[derive(Default)]
pub(crate) struct FreeBlocks {
    tree: BTreeSet<SizeKey>,
    /// Recently cached blocks, in no order: the first `len`; `age` says when each came.
    recent: [SizeKey; RECENT],
    age: [u64; RECENT],
    len: usize,
    clock: u64,
    /// The tree's first block at or after (stream, size) of that stream, as of the last
    /// search for (stream, size); `None` once the tree changes.
    memo: Option<(u64, u64, Option<SizeKey>)>,
}

/// Merges two ascending (or, with `desc`, two descending) sequences of distinct keys.
fn merge(
    mut a: std::iter::Peekable<impl Iterator<Item = SizeKey>>,
    mut b: std::iter::Peekable<impl Iterator<Item = SizeKey>>,
    desc: bool,
) -> impl Iterator<Item = SizeKey> {
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if (x < y) != desc => a.next(),
        (Some(_), Some(_)) | (None, _) => b.next(),
        (Some(_), None) => a.next(),
    })
}

impl FreeBlocks {
    fn recent(&self) -> &[SizeKey] {
        &self.recent[..self.len]
    }

    /// The recent blocks in order (on the stack: the searches allocate nothing).
    fn recent_sorted(&self) -> impl DoubleEndedIterator<Item = SizeKey> {
        let mut r = self.recent;
        r[..self.len].sort_unstable();
        r.into_iter().take(self.len)
    }

    /// Caches a block; false if it was cached already (checked only in debug builds: the
    /// check is a tree search).
    pub(crate) fn insert(&mut self, k: SizeKey) -> bool {
        if cfg!(debug_assertions) && (self.recent().contains(&k) || self.tree.contains(&k)) {
            return false;
        }
        if self.len == RECENT {
            // the oldest goes into the tree
            let oldest = (0..RECENT).min_by_key(|&i| self.age[i]).expect("RECENT > 0");
            self.tree.insert(self.recent[oldest]);
            self.memo = None;
            self.take_recent(oldest);
        }
        self.clock += 1;
        (self.recent[self.len], self.age[self.len]) = (k, self.clock);
        self.len += 1;
        true
    }

    fn take_recent(&mut self, i: usize) {
        self.len -= 1;
        self.recent[i] = self.recent[self.len];
        self.age[i] = self.age[self.len];
    }

    /// Takes a block out; false if it was not cached.
    pub(crate) fn remove(&mut self, k: &SizeKey) -> bool {
        if let Some(i) = self.recent().iter().position(|r| r == k) {
            self.take_recent(i);
            return true;
        }
        let removed = self.tree.remove(k);
        if removed {
            self.memo = None;
        }
        removed
    }

    /// The smallest block of `stream` of at least `size` bytes (the lowest address among
    /// equals): the first of [`FreeBlocks::fitting`], without a tree search while the tree
    /// is unchanged since the same search.
    pub(crate) fn first_fitting(&mut self, stream: u64, size: u64) -> Option<SizeKey> {
        let lo = (stream, size, 0, 0);
        let in_tree = match self.memo {
            Some((s, z, k)) if (s, z) == (stream, size) => k,
            _ => {
                let k = self.tree.range(lo..).next().copied().filter(|k| k.0 == stream);
                self.memo = Some((stream, size, k));
                k
            }
        };
        let in_recent = self.recent().iter().filter(|k| **k >= lo && k.0 == stream).min().copied();
        match (in_tree, in_recent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Blocks of `stream` of at least `size` bytes, smallest first.
    pub(crate) fn fitting(&self, stream: u64, size: u64) -> impl Iterator<Item = SizeKey> + '_ {
        let lo = (stream, size, 0, 0);
        let a = self.tree.range(lo..).copied().take_while(move |k| k.0 == stream);
        let b = self.recent_sorted().filter(move |k| *k >= lo && k.0 == stream);
        merge(a.peekable(), b.peekable(), false)
    }

    /// Blocks of `stream` of fewer than `size` bytes, largest first.
    pub(crate) fn below(&self, stream: u64, size: u64) -> impl Iterator<Item = SizeKey> + '_ {
        let hi = (stream, size, 0, 0);
        let a = self.tree.range(..hi).rev().copied().take_while(move |k| k.0 == stream);
        let b = self.recent_sorted().rev().filter(move |k| *k < hi && k.0 == stream);
        merge(a.peekable(), b.peekable(), true)
    }

    /// Every cached block, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = SizeKey> + '_ {
        merge(self.tree.iter().copied().peekable(), self.recent_sorted().peekable(), false)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Random inserts, removals and searches on a few streams: `FreeBlocks` (tree, recent
    /// array and remembered search) answers exactly as one plain ordered set does.
    #[test]
    fn free_blocks_keep_the_order_of_one_ordered_set() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut fb, mut set) = (FreeBlocks::default(), BTreeSet::<SizeKey>::new());
        for i in 0..20_000u32 {
            let stream = next() % 3;
            let size = (next() % 16 + 1) * 512;
            match next() % 4 {
                0 | 1 => {
                    let k = (stream, size, next() % 64 * 4096, i);
                    assert_eq!(fb.insert(k), set.insert(k));
                }
                2 => {
                    let k = set.iter().nth((next() % (set.len() as u64 + 1)) as usize).copied();
                    if let Some(k) = k {
                        assert!(fb.remove(&k) && set.remove(&k));
                    }
                    assert!(!fb.remove(&(stream, size, 1, u32::MAX)));
                }
                _ => {
                    let want: Vec<_> =
                        set.range((stream, size, 0, 0)..).take_while(|k| k.0 == stream).copied().collect();
                    // twice: the second answer comes from the remembered search
                    assert_eq!(fb.first_fitting(stream, size), want.first().copied());
                    assert_eq!(fb.first_fitting(stream, size), want.first().copied());
                    assert_eq!(fb.fitting(stream, size).collect::<Vec<_>>(), want);
                    let below: Vec<_> = set
                        .range(..(stream, size, 0, 0))
                        .rev()
                        .take_while(|k| k.0 == stream)
                        .copied()
                        .collect();
                    assert_eq!(fb.below(stream, size).collect::<Vec<_>>(), below);
                }
            }
            if i % 1000 == 0 {
                assert_eq!(fb.iter().collect::<Vec<_>>(), set.iter().copied().collect::<Vec<_>>());
            }
        }
    }
}
