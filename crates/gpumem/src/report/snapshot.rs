//! Snapshots: every segment and block the allocator holds, as `torch.cuda.memory_snapshot()`
//! reports them, and a recount of the stats from them.

use crate::device::StreamId;
use crate::report::history::Frames;
use crate::report::stats::{DeviceStats, PoolKind};

/// The state of a block, with PyTorch's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Handed out to the caller.
    ActiveAllocated,
    /// Freed by the caller, but other streams may still use it.
    ActivePendingFree,
    /// Cached and free.
    Inactive,
}

impl BlockState {
    /// `"active_allocated"`, `"active_pending_free"` or `"inactive"`.
    pub fn name(self) -> &'static str {
        match self {
            BlockState::ActiveAllocated => "active_allocated",
            BlockState::ActivePendingFree => "active_pending_free",
            BlockState::Inactive => "inactive",
        }
    }
}

/// One block of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    /// Its address.
    pub address: u64,
    /// Its size in bytes.
    pub size: u64,
    /// What the caller asked for (0 for inactive blocks).
    pub requested_size: u64,
    /// Its state.
    pub state: BlockState,
    /// The call stack that allocated it, innermost first, when history was recorded with
    /// stacks ([`crate::Allocator::set_stack_source`]); empty otherwise.
    pub frames: Frames,
}

/// One segment: a `cuMemAlloc`, or one contiguous mapped range of an expandable segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Its address.
    pub address: u64,
    /// Its size.
    pub total_size: u64,
    /// Bytes of allocated blocks.
    pub allocated_size: u64,
    /// Bytes of active blocks.
    pub active_size: u64,
    /// Requested bytes of active blocks.
    pub requested_size: u64,
    /// The stream that owns it.
    pub stream: StreamId,
    /// Its pool.
    pub pool: PoolKind,
    /// Whether it is part of an expandable segment.
    pub is_expandable: bool,
    /// Its blocks in address order.
    pub blocks: Vec<BlockInfo>,
}

/// The `current` values of the stats, recounted from a snapshot: what the stats must say if
/// the allocator's bookkeeping is right (PyTorch's `_check_memory_stat_consistency`).
pub fn recount(segments: &[SegmentInfo]) -> DeviceStats {
    let mut s = DeviceStats::default();
    for seg in segments {
        let k = seg.pool;
        if !seg.is_expandable {
            s.segment.increase(k, 1);
        }
        s.reserved_bytes.increase(k, seg.total_size);
        for b in &seg.blocks {
            match b.state {
                BlockState::ActiveAllocated => {
                    s.allocation.increase(k, 1);
                    s.allocated_bytes.increase(k, b.size);
                }
                BlockState::Inactive if seg.blocks.len() > 1 && !seg.is_expandable => {
                    s.inactive_split.increase(k, 1);
                    s.inactive_split_bytes.increase(k, b.size);
                }
                _ => {}
            }
            if b.state != BlockState::Inactive {
                s.active.increase(k, 1);
                s.active_bytes.increase(k, b.size);
                s.requested_bytes.increase(k, b.requested_size);
            }
        }
    }
    s
}
