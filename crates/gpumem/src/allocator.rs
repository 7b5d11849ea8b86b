//! [`Allocator`]: the caching allocator of one device, safe to share between threads.

use crate::config::{AllocatorConfig, Policy, PolicyKind};
use crate::device::{Device, StreamId};
use crate::error::AllocError;
use crate::packed::Packed;
use crate::policy::PolicyEngine;
use crate::report::history::{no_frames, Frames, StackSource, TraceEntry};
use crate::report::leaks::{LeakReport, LiveBlock};
use crate::report::snapshot::{recount, BlockState, SegmentInfo};
use crate::report::stats::{DeviceStats, MemoryStats};
use crate::report::summary;
use crate::torch::Engine;
use parking_lot::{Mutex, MutexGuard};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// The four counters read most often, published at the end of every call.
    published: Published,
    /// Set when a call panicked inside the policy. parking_lot's mutex is not poisoned by a
    /// panic, and a policy that panicked halfway through a call may have left its blocks,
    /// pools and counters disagreeing; every later call that would use them then fails with
    /// [`AllocError::Poisoned`] instead.
    poisoned: AtomicBool,
    /// Where call stacks come from while history is recorded with stacks; `stacks_on` says,
    /// without taking a lock on every call, whether there is one and history is on.
    stack_source: Mutex<Option<StackSource>>,
    stacks_on: AtomicBool,
    history_on: AtomicBool,
}

/// Note [Counters read without the lock]
/// --------------------------------------
/// `memory_allocated()`, `memory_reserved()` and their peaks are what programs poll most
/// (PyTorch's training loops log them every step, from any thread). They are copied out of
/// the policy's counters at the end of every call, while its lock is still held, and read
/// from here without the lock, so a reader never waits behind a cache hit or a hit behind a
/// reader. The copies change in lock order, and a thread's own call has published before it
/// returns: a thread that allocated a block sees it counted at once.
#[derive(Default)]
struct Published {
    allocated: AtomicU64,
    peak_allocated: AtomicU64,
    reserved: AtomicU64,
    peak_reserved: AtomicU64,
}

/// The policy, locked for one public call; marks the allocator poisoned if the call panics.
struct Call<'a, D: Device> {
    core: MutexGuard<'a, Core<D>>,
    published: &'a Published,
    poisoned: &'a AtomicBool,
    /// Whether the thread was already unwinding when the call began (a tensor dropped during
    /// a panic elsewhere frees its block: that call did not panic, and poisons nothing).
    unwinding_before: bool,
}

impl<D: Device> Deref for Call<'_, D> {
    type Target = Core<D>;
    fn deref(&self) -> &Core<D> {
        &self.core
    }
}

impl<D: Device> DerefMut for Call<'_, D> {
    fn deref_mut(&mut self) -> &mut Core<D> {
        &mut self.core
    }
}

impl<D: Device> Drop for Call<'_, D> {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.unwinding_before {
            self.poisoned.store(true, Ordering::Release);
        }
        // Note [Counters read without the lock]: runs before the guard unlocks
        let (s, p) = (self.core.stats(), self.published);
        p.allocated.store(s.allocated_bytes.all().current as u64, Ordering::Relaxed);
        p.peak_allocated.store(s.allocated_bytes.all().peak as u64, Ordering::Relaxed);
        p.reserved.store(s.reserved_bytes.all().current as u64, Ordering::Relaxed);
        p.peak_reserved.store(s.reserved_bytes.all().peak as u64, Ordering::Relaxed);
    }
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
        let a = Allocator {
            core: Mutex::new(core),
            published: Published::default(),
            poisoned: AtomicBool::new(false),
            stack_source: Mutex::new(None),
            stacks_on: AtomicBool::new(false),
            history_on: AtomicBool::new(false),
        };
        drop(a.lock()); // publishes the counters (Note [Counters read without the lock])
        Ok(a)
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

    /// The policy, for a call that only reads it (and may read a poisoned one: its counters
    /// are still numbers, if perhaps wrong ones).
    fn lock(&self) -> Call<'_, D> {
        let mut call = Call {
            core: self.core.lock(),
            published: &self.published,
            poisoned: &self.poisoned,
            unwinding_before: std::thread::panicking(),
        };
        call.begin_call();
        call
    }

    /// The policy, for a call that changes it or hands out memory: an error if an earlier
    /// call panicked inside it.
    fn checked(&self) -> Result<Call<'_, D>, AllocError> {
        let call = self.lock();
        if self.is_poisoned() {
            return Err(AllocError::Poisoned);
        }
        Ok(call)
    }

    /// Whether a call panicked inside the policy, leaving it unusable: every call that
    /// allocates, frees or changes the cache then fails with [`AllocError::Poisoned`].
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Allocates `size` bytes for use on `stream` and returns the device address. A size of
    /// 0 returns the null address 0 without touching the cache, as PyTorch does.
    pub fn malloc(&self, size: u64, stream: StreamId) -> Result<u64, AllocError> {
        if size == 0 {
            return Ok(0);
        }
        let stack = self.stack();
        let mut call = self.checked()?;
        let with_stack = stack.is_some();
        if let Some(stack) = stack {
            call.history().context = stack;
        }
        let mut r = call.malloc(size, stream);
        if with_stack {
            call.history().context = no_frames();
        }
        if let Err(AllocError::OutOfMemory(oom)) = &mut r {
            // with history on (with or without stacks), name the sites that hold the most
            if self.history_on.load(Ordering::Relaxed) {
                oom.sites = live_blocks(&mut call, |_| true).top(3).to_vec();
            }
        }
        r
    }

    /// The caller's stack from the stack source, if one is set and history is on (`None`
    /// otherwise): taken before the lock, since the source may run code that frees memory
    /// (Note on [`StackSource`]). Without one, a call leaves the history's (empty) context
    /// alone: an empty `Arc<[Frame]>` is a heap allocation, and a cache hit makes none.
    fn stack(&self) -> Option<Frames> {
        if !self.stacks_on.load(Ordering::Relaxed) {
            return None;
        }
        let source = self.stack_source.lock().clone();
        Some(source.map_or_else(no_frames, |f| f()))
    }

    /// Frees the block at `ptr`. Freeing 0 does nothing. A pointer this allocator did not
    /// hand out, or one already freed, is an error and changes nothing.
    pub fn free(&self, ptr: u64) -> Result<(), AllocError> {
        if ptr == 0 {
            return Ok(());
        }
        // No stack for a free: frees run on any thread, from destructors, and a stack source
        // that waits for Python's GIL there could wait on a thread that waits on this one.
        self.checked()?.free(ptr)
    }

    /// Records that the block at `ptr` is also used on `stream`: when it is freed, it waits
    /// for the work queued on `stream` so far before anyone can reuse it. A stream the device
    /// cannot wait for is refused here (on [`crate::CudaDevice`]: one not registered with
    /// [`crate::CudaDevice::stream_id`]), and changes nothing.
    pub fn record_stream(&self, ptr: u64, stream: StreamId) -> Result<(), AllocError> {
        let mut call = self.checked()?;
        call.device().check_stream(stream)?;
        call.record_stream(ptr, stream)
    }

    /// Returns to the cache every freed block whose other-stream events have completed.
    /// (Every `malloc` does this first; call it to see the effect without allocating.)
    pub fn process_events(&self) -> Result<(), AllocError> {
        self.checked()?.process_events()
    }

    /// Waits for pending cross-stream frees, then gives every wholly free cached segment
    /// (and every wholly free page of expandable segments) back to the device. Segments that
    /// still hold a live block stay: see `inactive_split_bytes`.
    pub fn empty_cache(&self) -> Result<(), AllocError> {
        self.checked()?.empty_cache()
    }

    /// Caps reserved memory at `fraction` of the device's total memory.
    pub fn set_per_process_memory_fraction(&self, fraction: f64) -> Result<(), AllocError> {
        set_memory_fraction(&mut self.checked()?.core, fraction)
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
        self.published.allocated.load(Ordering::Relaxed)
    }

    /// The peak of [`Allocator::memory_allocated`] since the last reset.
    pub fn max_memory_allocated(&self) -> u64 {
        self.published.peak_allocated.load(Ordering::Relaxed)
    }

    /// Bytes held from the device (PyTorch's `memory_reserved`).
    pub fn memory_reserved(&self) -> u64 {
        self.published.reserved.load(Ordering::Relaxed)
    }

    /// The peak of [`Allocator::memory_reserved`] since the last reset.
    pub fn max_memory_reserved(&self) -> u64 {
        self.published.peak_reserved.load(Ordering::Relaxed)
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

    /// Every segment and block, in address order; with history recorded with stacks, each
    /// live block carries the stack that allocated it.
    pub fn snapshot(&self) -> Vec<SegmentInfo> {
        let mut e = self.lock();
        let mut segments = e.snapshot();
        let live = &e.history().live;
        if !live.is_empty() {
            for b in segments.iter_mut().flat_map(|s| s.blocks.iter_mut()) {
                if let Some(l) = live.get(&b.address) {
                    b.frames = l.frames.clone();
                }
            }
        }
        segments
    }

    /// The blocks live now, grouped by the call stack that allocated them (their allocation
    /// site), with count and requested bytes, the site that holds the most first. Stacks come
    /// from the history: record it ([`Allocator::record_history`]) with a stack source
    /// ([`Allocator::set_stack_source`], [`crate::rust_backtrace_source`]); blocks allocated
    /// while it was off are listed under a site with no frames.
    ///
    /// ```
    /// use gpumem::{Allocator, AllocatorConfig, Frame, SimDevice, StreamId};
    /// use std::sync::Arc;
    /// let a = Allocator::new(SimDevice::default(), AllocatorConfig::default())?;
    /// a.record_history(true, 1000);
    /// a.set_stack_source(Some(Arc::new(|| {
    ///     Arc::from(vec![Frame { filename: "train.py".into(), line: 7, name: "step".into() }])
    /// })));
    /// let kept: Vec<u64> = (0..3).map(|_| a.malloc(1 << 20, StreamId::DEFAULT)).collect::<Result<_, _>>()?;
    /// let leaks = a.leaks();
    /// assert_eq!((leaks.sites.len(), leaks.sites[0].count, leaks.sites[0].bytes), (1, 3, 3 << 20));
    /// assert_eq!(leaks.sites[0].location(), "train.py:7 in step");
    /// # Ok::<(), gpumem::AllocError>(())
    /// ```
    pub fn leaks(&self) -> LeakReport {
        live_blocks(&mut self.lock(), |_| true)
    }

    /// A mark of the allocation order: the blocks allocated after it are those that
    /// [`Allocator::leaks_since`] reports. Marks only grow, whatever the history's ring
    /// drops and across [`Allocator::record_history`] being turned off and on.
    pub fn allocation_mark(&self) -> u64 {
        self.lock().history().next_seq
    }

    /// Like [`Allocator::leaks`], but only the blocks allocated after `mark` (from
    /// [`Allocator::allocation_mark`]) while history was recorded, and still live: what a
    /// piece of code allocated and kept.
    ///
    /// ```
    /// use gpumem::{Allocator, AllocatorConfig, SimDevice, StreamId};
    /// let a = Allocator::new(SimDevice::default(), AllocatorConfig::default())?;
    /// a.record_history(true, 1000);
    /// let before = a.malloc(4096, StreamId::DEFAULT)?;
    /// let mark = a.allocation_mark();
    /// let kept = a.malloc(1 << 20, StreamId::DEFAULT)?;
    /// let temp = a.malloc(1 << 20, StreamId::DEFAULT)?;
    /// a.free(temp)?;
    /// let inside = a.leaks_since(mark);
    /// assert_eq!((inside.count, inside.bytes), (1, 1 << 20));
    /// assert_eq!(inside.sites[0].blocks[0].address, kept);
    /// # Ok::<(), gpumem::AllocError>(())
    /// ```
    pub fn leaks_since(&self, mark: u64) -> LeakReport {
        live_blocks(&mut self.lock(), |seq| seq.is_some_and(|s| s >= mark))
    }

    /// Checks every per-pool counter against a recount of the snapshot (PyTorch's
    /// `_check_memory_stat_consistency`); the error names the first that disagrees. Useful
    /// in tests of code that drives the allocator, and when a counter looks wrong.
    pub fn check_stats(&self) -> Result<(), String> {
        let e = self.checked().map_err(|e| e.to_string())?;
        e.stats().mismatch_with_recount(&recount(&e.snapshot())).map_or(Ok(()), Err)?;
        e.check_invariants()
    }

    /// Free and total device memory as the driver reports it.
    pub fn mem_get_info(&self) -> Result<(u64, u64), AllocError> {
        Ok(self.checked()?.device().mem_get_info()?)
    }

    /// Starts (or, with `enabled` false, stops and clears) recording every event, keeping at
    /// most `max_entries`.
    pub fn record_history(&self, enabled: bool, max_entries: usize) {
        let mut e = self.lock();
        let h = e.history();
        if !enabled {
            h.clear();
        }
        h.enabled = enabled;
        h.max_entries = max_entries.max(1);
        let source = self.stack_source.lock();
        self.history_on.store(enabled, Ordering::Relaxed);
        self.stacks_on.store(enabled && source.is_some(), Ordering::Relaxed);
    }

    /// Sets where the history takes each allocation's call stack from (`None`:
    /// no stacks). The Python package sets one that reads the Python frames; a Rust program
    /// may capture `std::backtrace`. Stacks are collected only while history is recorded.
    ///
    /// ```
    /// use gpumem::{Allocator, AllocatorConfig, Frame, SimDevice, StreamId};
    /// use std::sync::Arc;
    /// let a = Allocator::new(SimDevice::default(), AllocatorConfig::default())?;
    /// a.record_history(true, 1000);
    /// a.set_stack_source(Some(Arc::new(|| {
    ///     Arc::from(vec![Frame { filename: "train.py".into(), line: 7, name: "step".into() }])
    /// })));
    /// let p = a.malloc(1 << 20, StreamId::DEFAULT)?;
    /// let block = a.snapshot().into_iter().flat_map(|s| s.blocks).find(|b| b.address == p).unwrap();
    /// assert_eq!(block.frames[0].line, 7);
    /// # Ok::<(), gpumem::AllocError>(())
    /// ```
    pub fn set_stack_source(&self, source: Option<StackSource>) {
        let mut s = self.stack_source.lock();
        self.stacks_on.store(source.is_some() && self.history_on.load(Ordering::Relaxed), Ordering::Relaxed);
        *s = source;
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

/// The live blocks of the snapshot, with the stacks and sequence numbers the history keeps,
/// those whose sequence number passes `keep`, by site.
fn live_blocks<D: Device>(core: &mut Core<D>, keep: impl Fn(Option<u64>) -> bool) -> LeakReport {
    let segments = core.snapshot();
    let live = &core.history().live;
    let blocks = segments.iter().flat_map(|s| {
        s.blocks.iter().filter(|b| b.state == BlockState::ActiveAllocated).map(|b| {
            let info = live.get(&b.address);
            LiveBlock {
                address: b.address,
                size: b.requested_size,
                stream: s.stream,
                seq: info.map(|l| l.seq),
                frames: info.map_or_else(no_frames, |l| l.frames.clone()),
            }
        })
    });
    LeakReport::from_blocks(blocks.filter(|b| keep(b.seq)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimDevice;

    #[test]
    fn a_panic_inside_a_call_poisons_the_allocator() {
        for policy in Policy::NAMES {
            let a = Allocator::with_policy(SimDevice::new(1 << 30), &Policy::parse(policy).unwrap()).unwrap();
            let p = a.malloc(4096, StreamId::DEFAULT).unwrap();
            // a policy call that panics halfway: here after taking a block out of the cache
            // and before giving it back
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut core = a.lock();
                let _half_done = core.malloc(1 << 20, StreamId::DEFAULT);
                panic!("a bug inside the policy");
            }));
            assert!(r.is_err());
            assert!(a.is_poisoned(), "{policy}");
            assert!(matches!(a.malloc(512, StreamId::DEFAULT), Err(AllocError::Poisoned)));
            assert!(matches!(a.free(p), Err(AllocError::Poisoned)));
            assert!(matches!(a.empty_cache(), Err(AllocError::Poisoned)));
            assert!(matches!(a.record_stream(p, StreamId(1)), Err(AllocError::Poisoned)));
            assert!(a.check_stats().unwrap_err().contains("panicked"));
            // reading the counters still works
            assert!(a.memory_allocated() > 0);
        }
    }

    #[test]
    fn counters_read_without_the_lock_follow_every_call() {
        for policy in Policy::NAMES {
            let a = Allocator::with_policy(SimDevice::new(1 << 30), &Policy::parse(policy).unwrap()).unwrap();
            let p = a.malloc(3 << 20, StreamId::DEFAULT).unwrap();
            let s = a.stats();
            assert_eq!(a.memory_allocated(), s.allocated_bytes.all().current as u64, "{policy}");
            assert_eq!(a.memory_reserved(), s.reserved_bytes.all().current as u64, "{policy}");
            a.free(p).unwrap();
            assert_eq!(a.memory_allocated(), 0, "{policy}");
            assert_eq!(a.max_memory_allocated(), s.allocated_bytes.all().peak as u64, "{policy}");
            a.reset_peak_memory_stats();
            assert_eq!(a.max_memory_allocated(), 0, "{policy}");
            a.empty_cache().unwrap();
            assert_eq!(a.memory_reserved(), 0, "{policy}");
            assert_eq!(a.max_memory_reserved(), a.stats().reserved_bytes.all().peak as u64, "{policy}");
            // a reader does not wait for a call in progress
            let call = a.lock();
            let seen = std::thread::scope(|s| s.spawn(|| a.memory_reserved()).join().unwrap());
            drop(call);
            assert_eq!(seen, 0, "{policy}");
        }
    }

    #[test]
    fn a_request_larger_than_the_gpu_says_so() {
        for policy in Policy::NAMES {
            let a = Allocator::with_policy(SimDevice::new(1 << 30), &Policy::parse(policy).unwrap()).unwrap();
            let _live = a.malloc(512 << 20, StreamId::DEFAULT).unwrap();
            let e = a.malloc(3 << 30, StreamId::DEFAULT).unwrap_err().to_string();
            assert!(
                e.contains("The request alone") && e.contains("larger than the GPU's total memory"),
                "{policy}: {e}"
            );
            assert!(!e.contains("hold nearly all"), "{policy}: {e}");
            // a request that would fit an empty GPU keeps the usual hint
            let e = a.malloc(900 << 20, StreamId::DEFAULT).unwrap_err().to_string();
            assert!(!e.contains("The request alone"), "{policy}: {e}");
        }
    }

    #[test]
    fn a_call_made_while_unwinding_does_not_poison() {
        let a =
            std::sync::Arc::new(Allocator::new(SimDevice::new(1 << 30), AllocatorConfig::default()).unwrap());
        let p = a.malloc(4096, StreamId::DEFAULT).unwrap();
        struct FreeOnDrop(std::sync::Arc<Allocator<SimDevice>>, u64);
        impl Drop for FreeOnDrop {
            fn drop(&mut self) {
                self.0.free(self.1).unwrap();
            }
        }
        let b = a.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _t = FreeOnDrop(b, p);
            panic!("a panic in the caller, not in the allocator");
        }));
        assert!(r.is_err());
        assert!(!a.is_poisoned());
        assert_eq!(a.memory_allocated(), 0);
        a.check_stats().unwrap();
    }
}
