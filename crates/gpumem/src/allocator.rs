//! [`Allocator`]: the caching allocator of one device, safe to share between threads.

use crate::config::{AllocatorConfig, Policy, PolicyKind};
use crate::device::{Device, StreamId};
use crate::error::AllocError;
use crate::packed::Packed;
use crate::policy::PolicyEngine;
use crate::report::history::TraceEntry;
use crate::report::snapshot::{recount, SegmentInfo};
use crate::report::stats::{DeviceStats, MemoryStats};
use crate::report::summary;
use crate::torch::Engine;
use parking_lot::{Mutex, MutexGuard};

/// A caching allocator for one device, with any policy (PyTorch's algorithm as `torch` and
/// `torch-expandable`, or gpumem's own `gpumem`), over any [`Device`].
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
    core: Mutex<Core<D>>,
}

/// The algorithm behind an allocator.
type Core<D> = Box<dyn PolicyEngine<D>>;

/// Caps reserved memory at `fraction` of the device (PyTorch: of its total memory).
fn set_memory_fraction<D: Device>(core: &mut Core<D>, fraction: f64) -> Result<(), AllocError> {
    if !(0.0..=1.0).contains(&fraction) || fraction.is_nan() {
        return Err(AllocError::InvalidFraction(fraction));
    }
    let cap = (fraction * core.device_total() as f64) as u64;
    core.set_memory_cap(Some(cap));
    Ok(())
}

impl<D: Device> Allocator<D> {
    /// An allocator over `device` with these options: the default policy
    /// ([`PolicyKind::DEFAULT`], `gpumem`) unless the options name another (`policy:torch`)
    /// or hold options that only PyTorch's algorithm has (`max_split_size_mb`, which select
    /// `torch`; `expandable_segments:True`, which selects `torch-expandable`).
    pub fn new(device: D, mut config: AllocatorConfig) -> Result<Allocator<D>, AllocError> {
        let kind = config.settle_policy(PolicyKind::DEFAULT)?;
        if kind == PolicyKind::TorchExpandable {
            config.expandable_segments = true;
        }
        let fraction = config.per_process_memory_fraction;
        let mut core: Core<D> = match kind {
            PolicyKind::Gpumem => Box::new(Packed::new(device, config)?),
            PolicyKind::Torch | PolicyKind::TorchExpandable => Box::new(Engine::new(device, config)?),
        };
        if let Some(f) = fraction {
            set_memory_fraction(&mut core, f)?;
        }
        Ok(Allocator { core: Mutex::new(core) })
    }

    /// An allocator for a named policy (`"gpumem"`, `"torch-expandable:max_split_size_mb:128"`).
    pub fn with_policy(device: D, policy: &Policy) -> Result<Allocator<D>, AllocError> {
        let mut config = policy.config.clone();
        config.policy = Some(policy.kind);
        Allocator::new(device, config)
    }

    /// The policy in force.
    pub fn policy(&self) -> PolicyKind {
        self.lock().kind()
    }

    fn lock(&self) -> MutexGuard<'_, Core<D>> {
        let mut core = self.core.lock();
        core.begin_call();
        core
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
    /// for the work queued on `stream` so far before anyone can reuse it. A stream the device
    /// cannot wait for is refused here (on [`crate::CudaDevice`]: one not registered with
    /// [`crate::CudaDevice::stream_id`]), and changes nothing.
    pub fn record_stream(&self, ptr: u64, stream: StreamId) -> Result<(), AllocError> {
        let mut core = self.lock();
        core.device().check_stream(stream)?;
        core.record_stream(ptr, stream)
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
        self.lock().empty_cache()
    }

    /// Caps reserved memory at `fraction` of the device's total memory.
    pub fn set_per_process_memory_fraction(&self, fraction: f64) -> Result<(), AllocError> {
        set_memory_fraction(&mut self.lock(), fraction)
    }

    /// The cap from the memory fraction as a fraction of the device (1.0 when unset).
    pub fn per_process_memory_fraction(&self) -> f64 {
        let core = self.lock();
        core.memory_cap().map_or(1.0, |m| m as f64 / core.device_total() as f64)
    }

    /// A copy of all counters.
    pub fn stats(&self) -> DeviceStats {
        self.lock().stats().clone()
    }

    /// The counters under PyTorch's 122 key names.
    pub fn memory_stats(&self) -> MemoryStats {
        self.lock().stats().to_map()
    }

    /// Bytes in blocks handed out (PyTorch's `memory_allocated`).
    pub fn memory_allocated(&self) -> u64 {
        self.lock().stats().allocated_bytes.all().current as u64
    }

    /// The peak of [`Allocator::memory_allocated`] since the last reset.
    pub fn max_memory_allocated(&self) -> u64 {
        self.lock().stats().allocated_bytes.all().peak as u64
    }

    /// Bytes held from the device (PyTorch's `memory_reserved`).
    pub fn memory_reserved(&self) -> u64 {
        self.lock().stats().reserved_bytes.all().current as u64
    }

    /// The peak of [`Allocator::memory_reserved`] since the last reset.
    pub fn max_memory_reserved(&self) -> u64 {
        self.lock().stats().reserved_bytes.all().peak as u64
    }

    /// Makes every peak equal its current value.
    pub fn reset_peak_memory_stats(&self) {
        self.lock().stats_mut().reset_peak();
    }

    /// Zeroes the allocated/freed totals and the event counters.
    pub fn reset_accumulated_memory_stats(&self) {
        self.lock().stats_mut().reset_accumulated();
    }

    /// PyTorch's `memory_summary()` table.
    pub fn memory_summary(&self, abbreviated: bool) -> String {
        let e = self.lock();
        summary::memory_summary(e.stats(), e.device().index(), abbreviated)
    }

    /// Every segment and block, in address order.
    pub fn snapshot(&self) -> Vec<SegmentInfo> {
        self.lock().snapshot()
    }

    /// Checks every per-pool counter against a recount of the snapshot (PyTorch's
    /// `_check_memory_stat_consistency`); the error names the first that disagrees. Useful
    /// in tests of code that drives the allocator, and when a counter looks wrong.
    pub fn check_stats(&self) -> Result<(), String> {
        let e = self.lock();
        e.stats().mismatch_with_recount(&recount(&e.snapshot())).map_or(Ok(()), Err)?;
        e.check_invariants()
    }

    /// Free and total device memory as the driver reports it.
    pub fn mem_get_info(&self) -> Result<(u64, u64), AllocError> {
        Ok(self.lock().device().mem_get_info()?)
    }

    /// Starts (or, with `enabled` false, stops and clears) recording every event, keeping at
    /// most `max_entries`.
    pub fn record_history(&self, enabled: bool, max_entries: usize) {
        let mut e = self.lock();
        let h = e.history();
        h.enabled = enabled;
        h.max_entries = max_entries.max(1);
        if !enabled {
            h.entries.clear();
        }
    }

    /// Tags the events recorded from now on (empty to clear).
    pub fn set_tag(&self, tag: &str) {
        self.lock().history().tag = tag.to_string();
    }

    /// The recorded events, oldest first.
    pub fn history(&self) -> Vec<TraceEntry> {
        self.lock().history().entries.iter().cloned().collect()
    }

    /// The options in force.
    pub fn config(&self) -> AllocatorConfig {
        self.lock().config().clone()
    }

    /// Runs `f` with the device.
    pub fn with_device<R>(&self, f: impl FnOnce(&D) -> R) -> R {
        f(self.lock().device())
    }
}
