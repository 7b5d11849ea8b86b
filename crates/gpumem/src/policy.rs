//! One interface for the allocation policies: what [`crate::Allocator`] asks of PyTorch's
//! algorithm (`torch/`) and of gpumem's own (`packed/`), so that it needs to know neither.
//!
//! Each policy is single-threaded (`&mut self`); the allocator puts it behind a lock.

use crate::config::{AllocatorConfig, PolicyKind};
use crate::device::{Device, StreamId};
use crate::error::AllocError;
use crate::report::history::History;
use crate::report::snapshot::SegmentInfo;
use crate::report::stats::DeviceStats;

/// An allocation policy over a device `D`.
pub(crate) trait PolicyEngine<D: Device>: Send {
    /// Which policy this is.
    fn kind(&self) -> PolicyKind;
    /// Hands out `size` (> 0) bytes for use on `stream`.
    fn malloc(&mut self, size: u64, stream: StreamId) -> Result<u64, AllocError>;
    /// Frees the block at `ptr` (not 0).
    fn free(&mut self, ptr: u64) -> Result<(), AllocError>;
    /// Records that the block at `ptr` is also used on `stream`.
    fn record_stream(&mut self, ptr: u64, stream: StreamId) -> Result<(), AllocError>;
    /// Returns to the cache every freed block whose other-stream events have completed.
    fn process_events(&mut self) -> Result<(), AllocError>;
    /// Gives every wholly free cached segment or page back to the device.
    fn empty_cache(&mut self) -> Result<(), AllocError>;
    /// The counters.
    fn stats(&self) -> &DeviceStats;
    /// The counters, to reset peaks or totals.
    fn stats_mut(&mut self) -> &mut DeviceStats;
    /// Every segment and block, in address order.
    fn snapshot(&self) -> Vec<SegmentInfo>;
    /// The recorded history and its settings.
    fn history(&mut self) -> &mut History;
    /// The options in force.
    fn config(&self) -> &AllocatorConfig;
    /// The memory source.
    fn device(&self) -> &D;
    /// The device's total memory, read once at the start.
    fn device_total(&self) -> u64;
    /// The cap on reserved memory from a memory fraction, if any.
    fn memory_cap(&self) -> Option<u64>;
    /// Sets the cap on reserved memory.
    fn set_memory_cap(&mut self, cap: Option<u64>);
    /// Called when a public call takes the lock, before anything else.
    fn begin_call(&mut self) {}
    /// Checks the policy's own bookkeeping beyond the stats (the stats are checked against a
    /// recount of the snapshot by the caller); the error names what is wrong.
    fn check_invariants(&self) -> Result<(), String> {
        Ok(())
    }
}
