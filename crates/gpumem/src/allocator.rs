//! [`Allocator`]: the caching allocator of one device, safe to share between threads.

use crate::config::{AllocatorConfig, Policy};
use crate::device::{Device, StreamId};
use crate::engine::Engine;
use crate::error::AllocError;
use crate::history::TraceEntry;
use crate::snapshot::SegmentInfo;
use crate::stats::{DeviceStats, MemoryStats};
use parking_lot::{Mutex, MutexGuard};

/// A caching allocator for one device: PyTorch's algorithm (the `torch` and
/// `torch-expandable` policies) over any [`Device`].
///
/// ```
/// use gpumem::{Allocator, AllocatorConfig, SimDevice, StreamId};
///
/// let sim = SimDevice::new(80 << 30);
/// let alloc = Allocator::new(sim.clone(), AllocatorConfig::default()).unwrap();
/// let p = alloc.malloc(512 << 20, StreamId::DEFAULT).unwrap();
/// assert_eq!(alloc.memory_allocated(), 512 << 20);
/// alloc.free(p).unwrap();
/// assert_eq!(alloc.memory_reserved(), 512 << 20); // still cached
/// alloc.empty_cache().unwrap();
/// assert_eq!(alloc.memory_reserved(), 0);
/// assert_eq!(sim.used(), 0);
/// ```
pub struct Allocator<D: Device> {
    engine: Mutex<Engine<D>>,
}

impl<D: Device> Allocator<D> {
    /// An allocator over `device` with PyTorch's algorithm and these options.
    pub fn new(device: D, config: AllocatorConfig) -> Result<Allocator<D>, AllocError> {
        Ok(Allocator { engine: Mutex::new(Engine::new(device, config)?) })
    }

    /// An allocator for a named policy (`"torch"`, `"torch-expandable:max_split_size_mb:128"`).
    pub fn with_policy(device: D, policy: &Policy) -> Result<Allocator<D>, AllocError> {
        Allocator::new(device, policy.config.clone())
    }

    fn lock(&self) -> MutexGuard<'_, Engine<D>> {
        self.engine.lock()
    }

    /// Allocates `size` bytes for use on `stream` and returns the device address. A size of
    /// 0 returns the null address 0 without touching the cache, as PyTorch does.
    pub fn malloc(&self, size: u64, stream: StreamId) -> Result<u64, AllocError> {
        if size == 0 {
            return Ok(0);
        }
        self.lock().malloc(size, stream)
    }

    /// Frees the block at `ptr`. Freeing 0 does nothing. A pointer this allocator did not
    /// hand out, or one already freed, is an error and changes nothing.
    pub fn free(&self, ptr: u64) -> Result<(), AllocError> {
        if ptr == 0 {
            return Ok(());
        }
        self.lock().free(ptr)
    }

    /// Records that the block at `ptr` is also used on `stream`: when it is freed, it waits
    /// for the work queued on `stream` so far before anyone can reuse it.
    pub fn record_stream(&self, ptr: u64, stream: StreamId) -> Result<(), AllocError> {
        self.lock().record_stream(ptr, stream)
    }

    /// Returns to the cache every freed block whose other-stream events have completed.
    /// (Every `malloc` does this first; call it to see the effect without allocating.)
    pub fn process_events(&self) -> Result<(), AllocError> {
        self.lock().process_events()
    }

    /// Waits for pending cross-stream frees, then gives every wholly free cached segment
    /// (and every wholly free page of expandable segments) back to the device. Segments that
    /// still hold a live block stay: see `inactive_split_bytes`.
    pub fn empty_cache(&self) -> Result<(), AllocError> {
        self.lock().release_cached_blocks()
    }

    /// Caps reserved memory at `fraction` of the device's total memory.
    pub fn set_per_process_memory_fraction(&self, fraction: f64) -> Result<(), AllocError> {
        self.lock().set_memory_fraction(fraction)
    }

    /// The cap from the memory fraction as a fraction of the device (1.0 when unset).
    pub fn per_process_memory_fraction(&self) -> f64 {
        let e = self.lock();
        e.allowed_memory_maximum.map_or(1.0, |m| m as f64 / e.device_total as f64)
    }

    /// A copy of all counters.
    pub fn stats(&self) -> DeviceStats {
        self.lock().stats.clone()
    }

    /// The counters under PyTorch's 122 key names.
    pub fn memory_stats(&self) -> MemoryStats {
        self.lock().stats.to_map()
    }

    /// Bytes in blocks handed out (PyTorch's `memory_allocated`).
    pub fn memory_allocated(&self) -> u64 {
        self.lock().stats.allocated_bytes.all().current as u64
    }

    /// The peak of [`Allocator::memory_allocated`] since the last reset.
    pub fn max_memory_allocated(&self) -> u64 {
        self.lock().stats.allocated_bytes.all().peak as u64
    }

    /// Bytes held from the device (PyTorch's `memory_reserved`).
    pub fn memory_reserved(&self) -> u64 {
        self.lock().stats.reserved_bytes.all().current as u64
    }

    /// The peak of [`Allocator::memory_reserved`] since the last reset.
    pub fn max_memory_reserved(&self) -> u64 {
        self.lock().stats.reserved_bytes.all().peak as u64
    }

    /// Makes every peak equal its current value.
    pub fn reset_peak_memory_stats(&self) {
        self.lock().stats.reset_peak();
    }

    /// Zeroes the allocated/freed totals and the event counters.
    pub fn reset_accumulated_memory_stats(&self) {
        self.lock().stats.reset_accumulated();
    }

    /// PyTorch's `memory_summary()` table.
    pub fn memory_summary(&self, abbreviated: bool) -> String {
        let e = self.lock();
        crate::summary::memory_summary(&e.stats, e.device.index(), abbreviated)
    }

    /// Every segment and block, in address order.
    pub fn snapshot(&self) -> Vec<SegmentInfo> {
        self.lock().snapshot()
    }

    /// Free and total device memory as the driver reports it.
    pub fn mem_get_info(&self) -> Result<(u64, u64), AllocError> {
        Ok(self.lock().device.mem_get_info()?)
    }

    /// Starts (or, with `enabled` false, stops and clears) recording every event, keeping at
    /// most `max_entries`.
    pub fn record_history(&self, enabled: bool, max_entries: usize) {
        let mut e = self.lock();
        e.history.enabled = enabled;
        e.history.max_entries = max_entries.max(1);
        if !enabled {
            e.history.entries.clear();
        }
    }

    /// Tags the events recorded from now on (empty to clear).
    pub fn set_tag(&self, tag: &str) {
        self.lock().history.tag = tag.to_string();
    }

    /// The recorded events, oldest first.
    pub fn history(&self) -> Vec<TraceEntry> {
        self.lock().history.entries.iter().cloned().collect()
    }

    /// The options in force.
    pub fn config(&self) -> AllocatorConfig {
        self.lock().config.clone()
    }

    /// Runs `f` with the device.
    pub fn with_device<R>(&self, f: impl FnOnce(&D) -> R) -> R {
        f(&self.lock().device)
    }
}
