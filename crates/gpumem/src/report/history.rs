//! Optional recording of every allocator event, with PyTorch's action names.
//!
//! Off by default; when on, each alloc, free and segment change is kept in a ring buffer of
//! at most `max_entries`, as `torch.cuda.memory._record_memory_history` does. The entries are
//! what a snapshot's `device_traces` holds.

use crate::device::StreamId;
use std::collections::VecDeque;

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
}

pub(crate) struct History {
    pub enabled: bool,
    pub max_entries: usize,
    pub entries: VecDeque<TraceEntry>,
    pub tag: String,
}

impl Default for History {
    fn default() -> Self {
        History { enabled: false, max_entries: usize::MAX, entries: VecDeque::new(), tag: String::new() }
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
        self.entries.push_back(TraceEntry { action, addr, size, stream, time_us, tag: self.tag.clone() });
    }
}
