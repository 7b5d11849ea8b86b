//! Blocks: the pieces a segment is split into, kept in an arena and linked in address order.
//!
//! A segment (one `cuMemAlloc`, or the address range of an expandable segment) starts as one
//! block. Handing out part of it splits the block; freeing a block merges it with free
//! neighbours of the same segment. `prev`/`next` link the blocks of a segment in address
//! order, so merging needs no search. Blocks live in an arena and are named by index, which
//! keeps the hot path free of per-block heap allocation.

use crate::device::StreamId;
use crate::report::stats::PoolKind;

/// The index of a block in the arena.
pub(crate) type BlockId = u32;

#[derive(Clone, Debug)]
pub(crate) struct Block {
    pub ptr: u64,
    pub size: u64,
    /// What the caller asked for (before rounding); meaningful while the block is active.
    pub requested: u64,
    /// The stream that allocated the block; only this stream reuses it once free.
    pub stream: StreamId,
    pub pool: PoolKind,
    pub allocated: bool,
    /// Whether physical memory backs the block. Always true outside expandable segments.
    pub mapped: bool,
    pub prev: Option<BlockId>,
    pub next: Option<BlockId>,
    /// Events still outstanding on other streams that used the block.
    pub event_count: u32,
    /// Other streams the block was used on (`record_stream`).
    pub stream_uses: Vec<StreamId>,
    /// The pool's search counter when the block was cached (the GC's age clock).
    pub gc_count_base: i64,
    /// The expandable segment this block belongs to, if any.
    pub expandable: Option<u32>,
}

impl Block {
    pub(crate) fn new(ptr: u64, size: u64, stream: StreamId, pool: PoolKind) -> Block {
        Block {
            ptr,
            size,
            requested: 0,
            stream,
            pool,
            allocated: false,
            mapped: true,
            prev: None,
            next: None,
            event_count: 0,
            stream_uses: Vec::new(),
            gc_count_base: 0,
            expandable: None,
        }
    }

    pub(crate) fn is_split(&self) -> bool {
        self.prev.is_some() || self.next.is_some()
    }

    /// Allocated, or freed but still waiting on another stream.
    pub(crate) fn is_active(&self) -> bool {
        self.allocated || self.event_count > 0 || !self.stream_uses.is_empty()
    }
}

/// The arena of blocks. Freed slots are reused.
#[derive(Default)]
pub(crate) struct Arena {
    slots: Vec<Block>,
    vacant: Vec<BlockId>,
    live: Vec<bool>,
}

impl Arena {
    pub(crate) fn insert(&mut self, b: Block) -> BlockId {
        if let Some(id) = self.vacant.pop() {
            self.slots[id as usize] = b;
            self.live[id as usize] = true;
            id
        } else {
            self.slots.push(b);
            self.live.push(true);
            (self.slots.len() - 1) as BlockId
        }
    }

    pub(crate) fn remove(&mut self, id: BlockId) {
        debug_assert!(self.live[id as usize]);
        self.live[id as usize] = false;
        self.slots[id as usize].stream_uses = Vec::new();
        self.vacant.push(id);
    }

    /// Every live block, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (BlockId, &Block)> {
        self.slots.iter().enumerate().filter(|(i, _)| self.live[*i]).map(|(i, b)| (i as BlockId, b))
    }
}

impl std::ops::Index<BlockId> for Arena {
    type Output = Block;
    fn index(&self, id: BlockId) -> &Block {
        &self.slots[id as usize]
    }
}

impl std::ops::IndexMut<BlockId> for Arena {
    fn index_mut(&mut self, id: BlockId) -> &mut Block {
        &mut self.slots[id as usize]
    }
}
