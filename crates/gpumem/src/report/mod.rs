//! What the allocator tells about itself: PyTorch's counters (`stats`), the
//! `memory_summary()` table (`summary`), snapshots of segments and blocks (`snapshot`), and the
//! recorded history of events (`history`) with its call stacks (`backtrace`: Rust's own), and
//! leak reports of the blocks still live by allocation site (`leaks`). Both policies fill these in; nothing here knows
//! either policy.

pub(crate) mod backtrace;
pub(crate) mod history;
pub(crate) mod leaks;
pub(crate) mod snapshot;
pub(crate) mod stats;
pub(crate) mod summary;
