//! The memory source: one trait, [`Device`], that the allocator engine draws whole segments,
//! virtual address ranges, physical pages and events from.
//!
//! The engine never talks to CUDA directly. Everything it needs from a GPU goes through this
//! trait, so the same algorithm runs on a real GPU ([`crate::CudaDevice`]) and on the simulated
//! one ([`crate::SimDevice`]) that the tests, the replay engine and GPU-less machines use.
//!
//! Note [Stream and event ids are not handles]
//! -------------------------------------------
//! [`StreamId`] and [`EventId`] are plain numbers that anyone may make: the simulated device,
//! the replay engine and the traces name streams by whatever numbers they like. A CUDA stream
//! or event handle, though, is a pointer the driver dereferences; passing it a number that is
//! not a live handle of this context is undefined behaviour. So no safe function here hands
//! the driver a number the caller made up. [`crate::CudaDevice`] resolves every id through
//! tables it owns:
//! - events: only those it created itself ([`Device::create_event`]), until destroyed; their
//!   ids are counters, so an id once destroyed never names another event;
//! - streams: [`StreamId::DEFAULT`] (the legacy default stream), and streams registered with
//!   [`crate::CudaDevice::stream_id`], which holds an `Arc` of the cudarc stream.
//!
//! Any other id is [`DeviceError::InvalidHandle`], never a driver call. The alternative,
//! `unsafe` constructors of raw ids, would have put the proof on every caller, including the
//! replay of traces whose stream numbers come from another process.
//!
//! The device keeps a registered stream alive for as long as it lives itself (every clone of
//! it shares the table). The allocator keys its cache by stream id and may wait on a stream
//! at any later time: a block freed after `record_stream` waits for an event recorded on that
//! stream, and a block cached on a stream is handed out again only to that stream's id. Were a
//! registered stream destroyed, its work could still be running while a new stream got the
//! same handle value, and with it the old stream's cached blocks and pending waits. Holding
//! the stream makes both impossible. The cost is that a registered stream outlives the
//! program's last use of it until the allocator (for the global API: the process) ends, as
//! PyTorch's own pool of streams does; programs should reuse streams rather than create one per
//! step. The allocation stream of [`crate::Allocator::malloc`] is a label for the cache and
//! needs no registration, but the `gpumem` policy records an event on it when a block of a
//! stream other than the default one is freed (Note [Which wait before unmapping] in
//! `packed/waits.rs`): on a stream the device does not know, that fails, and unmapping the
//! block's pages later waits for the whole device instead (safe, but slow: register streams);
//! a stream given to [`crate::Allocator::record_stream`] does, and is checked there
//! ([`Device::check_stream`]) rather than failing later at the free.

pub(crate) mod cuda;
pub(crate) mod events;
pub(crate) mod oracle;
pub(crate) mod sim;

use std::fmt;

/// A stream, by number. `StreamId(0)` is the default (legacy) stream; any other value names
/// one distinct stream. It is an identifier, not a handle: anyone may make one, and a device
/// decides what it means (Note \[Stream and event ids are not handles\] in this module). For
/// [`crate::CudaDevice`] a real stream's id comes from [`crate::CudaDevice::stream_id`], and is
/// the value of its `CUstream` pointer, which is also the order PyTorch sorts its free lists by.
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

/// An event, by number, as [`Device::create_event`] returned it. Like [`StreamId`] it is an
/// identifier that anyone may make; a device answers an id it did not create (or has
/// destroyed) with [`DeviceError::InvalidHandle`].
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
    /// A stream or event id that does not name a live stream or event of this device: an
    /// event it did not create or has destroyed, a stream not registered with it, or one of
    /// another GPU (Note \[Stream and event ids are not handles\] in `device/mod.rs`).
    #[error("unknown {what} {id:#x}: {why}")]
    InvalidHandle {
        /// `"stream"` or `"event"`.
        what: &'static str,
        /// The id.
        id: u64,
        /// What is wrong with it.
        why: &'static str,
    },
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
    /// Whether `stream` names a stream this device can record events on and wait for:
    /// [`DeviceError::InvalidHandle`] if not. [`crate::Allocator::record_stream`] asks this
    /// first, so that a bad stream is refused there and not at the free. Devices whose streams
    /// are plain numbers (the simulated one) take any.
    fn check_stream(&self, stream: StreamId) -> Result<(), DeviceError> {
        let _ = stream;
        Ok(())
    }
    /// Records `event` on `stream` (`cuEventRecord`).
    fn record_event(&self, event: EventId, stream: StreamId) -> Result<(), DeviceError>;
    /// Whether the work before `event` has finished (`cuEventQuery`).
    fn query_event(&self, event: EventId) -> Result<bool, DeviceError>;
    /// Waits for `event` (`cuEventSynchronize`).
    fn synchronize_event(&self, event: EventId) -> Result<(), DeviceError>;
    /// Waits for all work on `stream` (`cuStreamSynchronize`).
    fn synchronize_stream(&self, stream: StreamId) -> Result<(), DeviceError>;
    /// Waits for all work on every stream of the device (`cuCtxSynchronize`). It needs no
    /// stream handle, so a stream the program has destroyed cannot be a problem; but every
    /// thread's cache hits wait behind it while the allocator holds its lock, so the `gpumem`
    /// policy uses it only where an event could not be recorded, for compaction (opt-in) and
    /// at the end. `torch-expandable` uses it as PyTorch does for segments of other streams.
    fn synchronize_device(&self) -> Result<(), DeviceError>;
}
