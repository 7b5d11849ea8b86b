//! A replay's schedule: the operations it performs, built from a trace's events. (Called a
//! schedule so that "plan" keeps naming one thing only, the `gpumem` policy's periodic plan.)
//!
//! A trace records what PyTorch did; a replay needs what the *program* did. So:
//! - `alloc` is an allocation of the requested size on its stream;
//! - `free_requested` immediately followed by its `free_completed` is a plain free;
//! - `free_requested` whose `free_completed` comes later is a free that waited for another
//!   stream (`record_stream`): the replay records a use on a side stream, frees, and
//!   completes that stream's event where the trace completed the free;
//! - `segment_*` events are PyTorch's own decisions, not inputs; they are kept to check the
//!   `torch` policy against. A run of `segment_free` not followed by a new segment (or an
//!   out-of-memory error) in the same call was the program calling `empty_cache()`, and is
//!   replayed as such.

use crate::model::{Event, Trace};
use gpumem::{Action, StreamId};
use std::collections::HashMap;

/// One operation of a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Allocate `size` bytes on `stream`; PyTorch returned `addr`.
    Alloc {
        /// The allocation's index.
        id: u32,
        /// Requested bytes.
        size: u64,
        /// The stream.
        stream: StreamId,
        /// The address PyTorch returned.
        addr: u64,
    },
    /// Free allocation `id` at once.
    Free {
        /// The allocation's index.
        id: u32,
    },
    /// Free allocation `id` while another stream still uses it.
    FreeDeferred {
        /// The allocation's index.
        id: u32,
    },
    /// The other stream is done with allocation `id`.
    Complete {
        /// The allocation's index.
        id: u32,
    },
    /// The program called `empty_cache()`.
    EmptyCache,
}

/// An event a replay cannot make sense of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    /// Why.
    pub reason: &'static str,
    /// The event.
    pub event: Event,
}

/// A replay's schedule: what to replay, and what to check it against.
#[derive(Clone, Debug, Default)]
pub struct Schedule {
    /// The operations in order.
    pub ops: Vec<Op>,
    /// The trace's `segment_alloc` events as (size, address), in order.
    pub segments: Vec<(u64, u64)>,
    /// Events skipped as inconsistent.
    pub skipped: Vec<Skip>,
    /// The number of allocations.
    pub allocs: u32,
    /// The index in the trace's events of the event each op comes from, by op.
    pub op_events: Vec<usize>,
    /// The index in the trace's events of each allocation's `alloc`, by allocation id.
    pub alloc_events: Vec<usize>,
}

/// Builds the schedule of `trace`: its operations, and the segments and skipped events
/// that come with them.
pub fn schedule(trace: &Trace) -> Schedule {
    let ev = &trace.events;
    let mut s = Schedule::default();
    let mut live: HashMap<u64, u32> = HashMap::new();
    let mut pending: HashMap<u64, u32> = HashMap::new();
    let mut consumed = vec![false; ev.len()];
    let is_release = |a: Action| matches!(a, Action::SegmentFree | Action::SegmentUnmap);
    for (i, e) in ev.iter().enumerate() {
        if consumed[i] {
            continue;
        }
        let mut skip = |reason| s.skipped.push(Skip { reason, event: *e });
        match e.action {
            Action::Alloc => {
                if e.size == 0 {
                    skip("zero-size allocation");
                } else if live.contains_key(&e.addr) || pending.contains_key(&e.addr) {
                    skip("address allocated twice");
                } else {
                    let id = s.allocs;
                    s.allocs += 1;
                    live.insert(e.addr, id);
                    s.ops.push(Op::Alloc { id, size: e.size, stream: e.stream, addr: e.addr });
                    s.alloc_events.push(i);
                    s.op_events.push(i);
                }
            }
            Action::FreeRequested => {
                let Some(id) = live.remove(&e.addr) else {
                    skip("free of an unknown address");
                    continue;
                };
                match ev.get(i + 1) {
                    Some(n) if n.action == Action::FreeCompleted && n.addr == e.addr => {
                        consumed[i + 1] = true;
                        s.ops.push(Op::Free { id });
                        s.op_events.push(i);
                    }
                    _ => {
                        pending.insert(e.addr, id);
                        s.ops.push(Op::FreeDeferred { id });
                        s.op_events.push(i);
                    }
                }
            }
            Action::FreeCompleted => {
                if let Some(id) = pending.remove(&e.addr) {
                    s.ops.push(Op::Complete { id });
                    s.op_events.push(i);
                } else if let Some(id) = live.remove(&e.addr) {
                    s.ops.push(Op::Free { id });
                    s.op_events.push(i);
                } else {
                    skip("free of an unknown address");
                }
            }
            Action::SegmentAlloc => s.segments.push((e.size, e.addr)),
            Action::SegmentFree | Action::SegmentUnmap => {
                if i > 0 && is_release(ev[i - 1].action) {
                    continue;
                }
                let after = ev[i..].iter().find(|x| !is_release(x.action));
                let by_allocator = after.is_some_and(|x| {
                    matches!(x.action, Action::SegmentAlloc | Action::SegmentMap | Action::Oom)
                });
                if !by_allocator {
                    s.ops.push(Op::EmptyCache);
                    s.op_events.push(i);
                }
            }
            Action::SegmentMap | Action::Snapshot | Action::Oom => {}
        }
    }
    s
}
