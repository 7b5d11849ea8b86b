//! The `torch` policy's side of a snapshot: its segments and blocks, walked in address order
//! through the blocks' neighbour links.

use crate::device::Device;
use crate::report::history::no_frames;
use crate::report::snapshot::{BlockInfo, BlockState, SegmentInfo};
use crate::torch::Engine;

impl<D: Device> Engine<D> {
    pub(crate) fn snapshot(&self) -> Vec<SegmentInfo> {
        let mut out = Vec::new();
        for (_, head) in self.blocks.iter() {
            if !head.mapped || head.prev.is_some_and(|p| self.blocks[p].mapped) {
                continue;
            }
            let mut seg = SegmentInfo {
                address: head.ptr,
                total_size: 0,
                allocated_size: 0,
                active_size: 0,
                requested_size: 0,
                stream: head.stream,
                pool: head.pool,
                is_expandable: head.expandable.is_some(),
                blocks: Vec::new(),
            };
            let mut cur = Some(head);
            while let Some(b) = cur.filter(|b| b.mapped) {
                let state = if b.allocated {
                    BlockState::ActiveAllocated
                } else if b.is_active() {
                    BlockState::ActivePendingFree
                } else {
                    BlockState::Inactive
                };
                seg.total_size += b.size;
                if b.allocated {
                    seg.allocated_size += b.size;
                }
                let requested = if b.is_active() { b.requested } else { 0 };
                if b.is_active() {
                    seg.active_size += b.size;
                    seg.requested_size += b.requested;
                }
                seg.blocks.push(BlockInfo {
                    address: b.ptr,
                    size: b.size,
                    requested_size: requested,
                    state,
                    frames: no_frames(),
                });
                cur = b.next.map(|n| &self.blocks[n]);
            }
            out.push(seg);
        }
        out.sort_by_key(|s| s.address);
        out
    }
}
