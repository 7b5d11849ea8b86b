//! gpumem: a GPU caching memory allocator.
//!
//! Tensors take device memory from a cache; freeing returns the block to the cache;
//! [`Allocator::empty_cache`] hands unused cached memory back to the GPU. The `torch` policy
//! is PyTorch's CUDA caching allocator reproduced exactly, with PyTorch's stats keys, summary
//! table and configuration syntax.
//!
//! The engine is generic over a [`Device`]: [`SimDevice`] simulates a GPU (tests, trace
//! replays, machines without a GPU).
//!
//! ```
//! use gpumem::{Allocator, AllocatorConfig, SimDevice, StreamId};
//! let alloc = Allocator::new(SimDevice::default(), AllocatorConfig::parse("max_split_size_mb:128")?)?;
//! let p = alloc.malloc((1 << 20) + 1, StreamId::DEFAULT)?;
//! assert_eq!(alloc.memory_reserved(), 20 << 20); // 1-10 MiB requests share 20 MiB segments
//! alloc.free(p)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod allocator;
mod common;
mod config;
mod device;
mod error;
mod global;
mod packed;
mod policy;
mod report;
mod tensor;
mod torch;

pub use allocator::Allocator;
pub use common::{escape_for_message, format_size};
pub use config::{AllocatorConfig, ConfigError, PackedOptions, Policy, PolicyKind, ENV_VAR};
pub use device::cuda::{device_count, driver_present, CudaCounters, CudaDevice};
pub use device::oracle::{StreamOracle, StreamReport, StreamViolation};
pub use device::sim::{SimCounters, SimDevice, H100_CAPACITY, MAX_SIM_CAPACITY};
pub use device::{Device, DeviceError, EventId, StreamId};
pub use error::{AllocError, OutOfMemory};
pub use global::{
    allocator, empty_cache, init_with_policy, max_memory_allocated, max_memory_reserved, mem_get_info,
    memory_allocated, memory_reserved, memory_stats, memory_summary, reset_accumulated_memory_stats,
    reset_peak_memory_stats, set_per_process_memory_fraction, CudaAllocator,
};
pub use half::{bf16, f16};
pub use report::backtrace::rust_backtrace_source;
pub use report::history::{Action, Frame, Frames, StackSource, TraceEntry};
pub use report::leaks::{show_frame, site_frames, LeakReport, LeakSite, LiveBlock};
pub use report::snapshot::{recount, BlockInfo, BlockState, SegmentInfo};
pub use report::stats::{DeviceStats, MemoryStats, PoolKind, Stat, StatArray};
pub use report::summary::memory_summary as format_memory_summary;
pub use tensor::{Element, FloatElement, KernelArg, Tensor};
