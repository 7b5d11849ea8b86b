//! The memory source: one trait, [`Device`], that the allocator engine draws whole segments,
//! virtual address ranges, physical pages and events from.
//!
//! The engine never talks to CUDA directly. Everything it needs from a GPU goes through this
//! trait, so the same algorithm runs on a real GPU ([`crate::CudaDevice`]) and on the simulated
//! one ([`crate::SimDevice`]) that the tests, the replay engine and GPU-less machines use.

pub(crate) mod cuda;
pub(crate) mod events;
pub(crate) mod oracle;
pub(crate) mod sim;

use std::fmt;

/// A stream handle. `StreamId(0)` is the default (legacy) stream; any other value names one
/// distinct stream. For CUDA it is the raw `CUstream` pointer value, which is also the order
/// PyTorch sorts its free lists by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64);

impl StreamId {
    /// The default stream.
    pub const DEFAULT: StreamId = StreamId(0);
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// An event handle created by [`Device::create_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(pub u64);

/// What can go wrong inside a [`Device`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The device has no memory left for this request. The engine recovers from this one
    /// (frees cached memory and retries) before it reports out of memory to the caller.
    #[error("the device is out of memory")]
    OutOfMemory,
    /// No CUDA driver could be loaded on this machine.
    #[error("no CUDA driver (libcuda) was found on this machine; use the simulated device (--device sim)")]
    NoDriver,
    /// The driver loaded but reports no GPU with this index.
    #[error("no GPU with index {0} (the driver reports {1} GPU(s))")]
    NoSuchDevice(usize, usize),
    /// A pointer or range the device does not know about.
    #[error("invalid device address {0:#x}: {1}")]
    InvalidAddress(u64, &'static str),
    /// This device does not implement the call (for example VMM on a GPU without it).
    #[error("not supported by this device: {0}")]
    Unsupported(&'static str),
    /// Any other driver error, with the driver's own name for it.
    #[error("driver error in {call}: {message}")]
    Driver {
        /// The driver call that failed.
        call: &'static str,
        /// The driver's description of the error.
        message: String,
    },
}

/// A memory source for the allocator engine.
///
/// Implementations must hand out non-overlapping address ranges and keep their own state
/// behind `&self` (they are shared between the engine and, for the simulated device, the test
/// that drives it).
pub trait Device: Send + Sync + 'static {
    /// A short name for messages, such as `"sim"` or `"NVIDIA H100 80GB HBM3"`.
    fn name(&self) -> String;
    /// The device index used in messages (`GPU 0`).
    fn index(&self) -> usize {
        0
    }
    /// Allocates one whole segment of `size` bytes (`cuMemAlloc`).
    fn malloc(&self, size: u64) -> Result<u64, DeviceError>;
    /// Frees a segment returned by [`Device::malloc`] (`cuMemFree`).
    fn free(&self, ptr: u64) -> Result<(), DeviceError>;
    /// Free and total memory as the driver reports it (`cuMemGetInfo`).
    fn mem_get_info(&self) -> Result<(u64, u64), DeviceError>;

    /// The granularity of physical pages for [`Device::map`], in bytes (2 MiB on NVIDIA GPUs).
    fn page_granularity(&self) -> u64 {
        2 << 20
    }
    /// Reserves `size` bytes of virtual address space (`cuMemAddressReserve`).
    fn reserve(&self, size: u64) -> Result<u64, DeviceError>;
    /// Gives a reservation back (`cuMemAddressFree`). Everything in it must be unmapped.
    fn unreserve(&self, ptr: u64, size: u64) -> Result<(), DeviceError>;
    /// Creates one physical allocation of `size` bytes and maps it read-write at `ptr`
    /// (`cuMemCreate` + `cuMemMap` + `cuMemSetAccess`).
    fn map(&self, ptr: u64, size: u64) -> Result<(), DeviceError>;
    /// Unmaps and releases the physical allocation mapped at exactly `ptr`..`ptr + size`
    /// (`cuMemUnmap` + `cuMemRelease`). This does not wait for the GPU: the caller must make
    /// sure no work still uses the range.
    fn unmap(&self, ptr: u64, size: u64) -> Result<(), DeviceError>;

    /// Shrinks the physical allocation mapped at exactly `ptr..ptr + size` to the page-aligned
    /// sub-ranges `keep` (sorted, disjoint): each gets a new physical allocation mapped at the
    /// same addresses, holding the same contents (copied by the device), and the old
    /// allocation is released, so the rest of the range becomes unmapped. Both are held while
    /// it runs. Like [`Device::unmap`] it does not wait for the GPU: the caller must make sure
    /// no work uses the range. It returns once its copies are done, leaving no work of its own
    /// on the GPU. This is how the `gpumem` policy gives back the free pages of a chunk that
    /// still holds live blocks (Note \[Compaction\] in `packed/compact.rs`).
    fn remap(&self, ptr: u64, size: u64, keep: &[(u64, u64)]) -> Result<(), DeviceError>;

    /// [`Device::remap`] without holding both allocations at once: the bytes `save` names
    /// are first copied out, each `(from, to, len)` from inside `keep` to mapped memory
    /// outside the range that nothing uses meanwhile (free space of the caller's); then the old
    /// allocation is released, the new ones are mapped, and the saved bytes are copied back.
    /// Bytes of `keep` not saved are not kept. Memory never rises above what was held
    /// before, which is what lets compaction run when memory is at its peak (Note [The
    /// copy's memory] in `packed/compact.rs`). The same waiting rules as for `remap` apply before
    /// it; after it, the copies back may still be running, in order on the device's default
    /// stream: the caller waits for the device (`synchronize_device`) before anything but
    /// another remap uses the staging area, the kept bytes or any memory it unmaps. A device
    /// that cannot do it says `Unsupported`, and the caller compacts without it.
    fn remap_staged(
        &self,
        ptr: u64,
        size: u64,
        keep: &[(u64, u64)],
        save: &[(u64, u64, u64)],
    ) -> Result<(), DeviceError> {
        let _ = (ptr, size, keep, save);
        Err(DeviceError::Unsupported("remapping through a staging area"))
    }

    /// Creates an event (`cuEventCreate`, timing disabled).
    fn create_event(&self) -> Result<EventId, DeviceError>;
    /// Destroys an event.
    fn destroy_event(&self, event: EventId) -> Result<(), DeviceError>;
    /// Records `event` on `stream` (`cuEventRecord`).
    fn record_event(&self, event: EventId, stream: StreamId) -> Result<(), DeviceError>;
    /// Whether the work before `event` has finished (`cuEventQuery`).
    fn query_event(&self, event: EventId) -> Result<bool, DeviceError>;
    /// Waits for `event` (`cuEventSynchronize`).
    fn synchronize_event(&self, event: EventId) -> Result<(), DeviceError>;
    /// Waits for all work on `stream` (`cuStreamSynchronize`).
    fn synchronize_stream(&self, stream: StreamId) -> Result<(), DeviceError>;
    /// Waits for all work on every stream of the device (`cuCtxSynchronize`). The engines
    /// call this before unmapping pages: it needs no stream handle, so a stream the program
    /// has destroyed since it last used the pages cannot be a problem.
    fn synchronize_device(&self) -> Result<(), DeviceError>;
}
