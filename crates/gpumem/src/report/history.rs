//! Optional recording of every allocator event, with PyTorch's action names.
//!
//! Off by default; when on, each alloc, free and segment change is kept in a ring buffer of
//! at most `max_entries`, as `torch.cuda.memory._record_memory_history` does. The entries are
//! what a snapshot's `device_traces` holds.

use crate::common::PtrMap;
use crate::device::StreamId;
use std::collections::VecDeque;
use std::sync::Arc;

/// One frame of the call stack that made an allocation: a Python line, a C++ or a Rust
/// function, as PyTorch's snapshots name them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frame {
    /// The source file.
    pub filename: String,
    /// The line in it (0 if unknown).
    pub line: u32,
    /// The function.
    pub name: String,
}

/// The call stack of one event, innermost frame first; shared, since one stack is kept by
/// the history entry and by the live block.
pub type Frames = Arc<[Frame]>;

/// Where an allocation's call stack comes from when history is recorded with stacks
/// ([`crate::Allocator::set_stack_source`]): called on the allocating thread *before* the
/// allocator's lock is taken, since collecting a stack may run code (Python's garbage
/// collector) that itself frees memory, or wait (for Python's GIL) on a thread that is
/// itself waiting for the allocator.
pub type StackSource = Arc<dyn Fn() -> Frames + Send + Sync>;

/// An empty stack.
pub(crate) fn no_frames() -> Frames {
    Arc::from(Vec::new())
}

/// What happened, named as PyTorch's trace names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A block was handed out (size: what was asked).
    Alloc,
    /// The caller freed a block (its events may still be pending).
    FreeRequested,
    /// The block went back to the cache.
    FreeCompleted,
    /// A segment was allocated on the device.
    SegmentAlloc,
    /// A segment was freed on the device.
    SegmentFree,
    /// Pages were mapped into an expandable segment.
    SegmentMap,
    /// Pages were unmapped from an expandable segment.
    SegmentUnmap,
    /// A snapshot was taken (size: active bytes).
    Snapshot,
    /// An allocation failed (addr: the device's free bytes).
    Oom,
}

impl Action {
    /// PyTorch's string for the action (`"segment_alloc"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Action::Alloc => "alloc",
            Action::FreeRequested => "free_requested",
            Action::FreeCompleted => "free_completed",
            Action::SegmentAlloc => "segment_alloc",
            Action::SegmentFree => "segment_free",
            Action::SegmentMap => "segment_map",
            Action::SegmentUnmap => "segment_unmap",
            Action::Snapshot => "snapshot",
            Action::Oom => "oom",
        }
    }

    /// Parses PyTorch's string for an action.
    pub fn from_name(s: &str) -> Option<Action> {
        Some(match s {
            "alloc" => Action::Alloc,
            "free_requested" => Action::FreeRequested,
            "free_completed" => Action::FreeCompleted,
            "segment_alloc" => Action::SegmentAlloc,
            "segment_free" => Action::SegmentFree,
            "segment_map" => Action::SegmentMap,
            "segment_unmap" => Action::SegmentUnmap,
            "snapshot" => Action::Snapshot,
            "oom" => Action::Oom,
            _ => return None,
        })
    }
}

/// One recorded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEntry {
    /// What happened.
    pub action: Action,
    /// The address (for `Oom`, the device's free bytes).
    pub addr: u64,
    /// The size (requested size for allocs and frees, segment size for segments).
    pub size: u64,
    /// The stream.
    pub stream: StreamId,
    /// Microseconds since the Unix epoch.
    pub time_us: u64,
    /// A user tag set with `Allocator::set_tag`, empty if none.
    pub tag: String,
    /// The call stack that made the allocation (empty for other events), innermost first;
    /// empty unless a stack source is set ([`crate::Allocator::set_stack_source`]).
    pub frames: Frames,
}

pub(crate) struct History {
    pub enabled: bool,
    pub max_entries: usize,
    pub entries: VecDeque<TraceEntry>,
    pub tag: String,
    /// The stack of the public call under way, given to the entries it records.
    pub context: Frames,
    /// The stack that made each live block, while history is on: what a snapshot shows for
    /// the block, and what a leak report groups by. Kept apart from the ring of entries so
    /// that a long-lived block keeps its stack after its `alloc` entry has left the ring.
    pub live: PtrMap<Live>,
    /// The sequence number the next recorded allocation gets: it only grows (also across
    /// [`History::clear`]), so a mark taken from it stays meaningful whatever the ring drops.
    pub next_seq: u64,
}

/// What the history keeps of a live block.
pub(crate) struct Live {
    /// The stack that allocated it.
    pub frames: Frames,
    /// Its allocation sequence number ([`History::next_seq`] when it was allocated).
    pub seq: u64,
}

impl Default for History {
    fn default() -> Self {
        History {
            enabled: false,
            max_entries: usize::MAX,
            entries: VecDeque::new(),
            tag: String::new(),
            context: no_frames(),
            live: PtrMap::default(),
            next_seq: 0,
        }
    }
}

impl History {
    #[inline]
    pub(crate) fn record(&mut self, action: Action, addr: u64, size: u64, stream: StreamId) {
        if !self.enabled {
            return;
        }
        if self.entries.len() >= self.max_entries {
            self.entries.pop_front();
        }
        let time_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        match action {
            Action::Alloc => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.live.insert(addr, Live { frames: self.context.clone(), seq });
            }
            Action::FreeRequested => {
                self.live.remove(&addr);
            }
            _ => {}
        }
        let (tag, frames) = (self.tag.clone(), self.context.clone());
        self.entries.push_back(TraceEntry { action, addr, size, stream, time_us, tag, frames });
    }

    /// Stops recording and forgets everything recorded.
    pub(crate) fn clear(&mut self) {
        self.enabled = false;
        self.entries.clear();
        self.live.clear();
    }
}
