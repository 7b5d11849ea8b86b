//! The global API: one allocator per GPU, created on first use, and free functions that
//! mirror `torch.cuda`'s memory functions.
//!
//! ```no_run
//! let x = gpumem::Tensor::<f32>::randn(&[10000, 10000])?;
//! println!("{} bytes allocated", gpumem::memory_allocated(0));
//! drop(x);
//! gpumem::empty_cache()?;
//! assert_eq!(gpumem::memory_reserved(0), 0);
//! # Ok::<(), gpumem::AllocError>(())
//! ```

use crate::allocator::Allocator;
use crate::config::{AllocatorConfig, Policy, PolicyKind};
use crate::device::cuda::CudaDevice;
use crate::error::AllocError;
use crate::report::stats::MemoryStats;
use parking_lot::Mutex;
use std::sync::Arc;

/// The allocator of one GPU.
pub type CudaAllocator = Allocator<CudaDevice>;

static ALLOCATORS: Mutex<Vec<Option<Arc<CudaAllocator>>>> = Mutex::new(Vec::new());

/// The allocator of GPU `device`, created on first use with the options of
/// `GPUMEM_ALLOC_CONF`: the `gpumem` policy unless they name another (or hold options only
/// PyTorch's algorithm has, which select `torch`).
pub fn allocator(device: usize) -> Result<Arc<CudaAllocator>, AllocError> {
    get_or_create(device, || {
        let mut config = AllocatorConfig::from_env()?;
        config.settle_policy(PolicyKind::Gpumem)?;
        Allocator::new(CudaDevice::new(device)?, config)
    })
    .map(|(a, _)| a)
}

/// Sets the allocator of GPU `device` to a new one with `policy`, if none exists yet.
/// Returns false if the device already has an allocator (it cannot be swapped once used).
pub fn init_with_policy(device: usize, policy: &Policy) -> Result<bool, AllocError> {
    get_or_create(device, || Allocator::with_policy(CudaDevice::new(device)?, policy))
        .map(|(_, created)| created)
}

/// The allocator of `device`, created by `make` and installed if there is none yet; and
/// whether it was created now.
fn get_or_create(
    device: usize,
    make: impl FnOnce() -> Result<CudaAllocator, AllocError>,
) -> Result<(Arc<CudaAllocator>, bool), AllocError> {
    let mut all = ALLOCATORS.lock();
    if let Some(Some(a)) = all.get(device) {
        return Ok((a.clone(), false));
    }
    let a = Arc::new(make()?);
    if all.len() <= device {
        all.resize(device + 1, None);
    }
    all[device] = Some(a.clone());
    Ok((a, true))
}

fn existing(device: usize) -> Option<Arc<CudaAllocator>> {
    ALLOCATORS.lock().get(device).cloned().flatten()
}

/// Bytes held by live tensors on `device` (0 before the device is first used).
pub fn memory_allocated(device: usize) -> u64 {
    existing(device).map_or(0, |a| a.memory_allocated())
}

/// Bytes held from the GPU by the cache on `device`.
pub fn memory_reserved(device: usize) -> u64 {
    existing(device).map_or(0, |a| a.memory_reserved())
}

/// The peak of [`memory_allocated`] since the last reset.
pub fn max_memory_allocated(device: usize) -> u64 {
    existing(device).map_or(0, |a| a.max_memory_allocated())
}

/// The peak of [`memory_reserved`] since the last reset.
pub fn max_memory_reserved(device: usize) -> u64 {
    existing(device).map_or(0, |a| a.max_memory_reserved())
}

/// Starts every peak afresh on `device`.
pub fn reset_peak_memory_stats(device: usize) {
    if let Some(a) = existing(device) {
        a.reset_peak_memory_stats();
    }
}

/// Zeroes the accumulated counters on `device`.
pub fn reset_accumulated_memory_stats(device: usize) {
    if let Some(a) = existing(device) {
        a.reset_accumulated_memory_stats();
    }
}

/// PyTorch's `memory_stats()` for `device` (empty before the device is first used).
pub fn memory_stats(device: usize) -> MemoryStats {
    existing(device).map(|a| a.memory_stats()).unwrap_or_default()
}

/// PyTorch's `memory_summary()` table for `device`.
pub fn memory_summary(device: usize, abbreviated: bool) -> String {
    match existing(device) {
        Some(a) => a.memory_summary(abbreviated),
        None => crate::report::summary::memory_summary(&Default::default(), device, abbreviated),
    }
}

/// Gives every wholly free cached segment and page of every GPU back to the driver.
pub fn empty_cache() -> Result<(), AllocError> {
    let all: Vec<_> = ALLOCATORS.lock().iter().flatten().cloned().collect();
    for a in all {
        a.empty_cache()?;
    }
    Ok(())
}

/// The driver's free and total memory on `device` (`cudaMemGetInfo`).
pub fn mem_get_info(device: usize) -> Result<(u64, u64), AllocError> {
    allocator(device)?.mem_get_info()
}

/// Caps the memory the cache of `device` may reserve at `fraction` of the GPU.
pub fn set_per_process_memory_fraction(fraction: f64, device: usize) -> Result<(), AllocError> {
    allocator(device)?.set_per_process_memory_fraction(fraction)
}
