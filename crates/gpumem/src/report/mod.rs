//! What the allocator tells about itself: PyTorch's counters (`stats`), the
//! `memory_summary()` table (`summary`), snapshots of segments and blocks (`snapshot`), and the
//! recorded history of events (`history`). Both policies fill these in; nothing here knows
//! either policy.

pub(crate) mod history;
pub(crate) mod snapshot;
pub(crate) mod stats;
pub(crate) mod summary;
