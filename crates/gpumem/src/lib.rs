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
mod block;
mod config;
mod device;
mod engine;
mod error;
mod expandable;
mod history;
mod pool;
mod release;
mod sim;
mod size;
mod snapshot;
mod stats;
mod summary;

pub use allocator::Allocator;
pub use config::{AllocatorConfig, ConfigError, Policy, PolicyKind, ENV_VAR};
pub use device::{Device, DeviceError, EventId, StreamId};
pub use error::{AllocError, OutOfMemory};
pub use history::{Action, TraceEntry};
pub use sim::{SimCounters, SimDevice, H100_CAPACITY};
pub use size::format_size;
pub use snapshot::{recount, BlockInfo, BlockState, SegmentInfo};
pub use stats::{DeviceStats, MemoryStats, PoolKind, Stat, StatArray};
pub use summary::memory_summary;
