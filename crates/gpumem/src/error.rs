//! Errors, above all the out-of-memory report.

use crate::common::format_size;
use crate::config::ConfigError;
use crate::device::DeviceError;
use crate::report::leaks::LeakSite;
use std::fmt;

/// An allocation the device could not satisfy even after every cached block was freed.
///
/// It says what was asked, what the device has, and where the memory went, and suggests the
/// setting that fits the case, like PyTorch's message but with the fragmentation figures
/// PyTorch users have long asked for (pytorch/pytorch#29554).
#[derive(Clone, Debug, PartialEq)]
pub struct OutOfMemory {
    /// The device index.
    pub device: usize,
    /// Bytes the caller asked for.
    pub requested: u64,
    /// Bytes the allocator tried to get from the device for it (a whole segment).
    pub alloc_size: u64,
    /// The device's total memory.
    pub total: u64,
    /// The device's free memory, as the driver reports it.
    pub free: u64,
    /// The cap set by a per-process memory fraction, if any.
    pub allowed: Option<u64>,
    /// Bytes in live blocks.
    pub allocated: u64,
    /// Bytes held from the device.
    pub reserved: u64,
    /// The largest free block in the cache.
    pub largest_free_block: u64,
    /// Free bytes in segments that also hold live blocks (`empty_cache` cannot free them).
    pub non_releasable: u64,
    /// What to try.
    pub hint: String,
    /// With history recorded, the (at most three) allocation sites that hold the most live
    /// memory, largest first ([`crate::Allocator::leaks`]); empty otherwise.
    pub sites: Vec<LeakSite>,
}

/// The hint for an out-of-memory error whose cause is not the cache: an allocation of
/// `need` bytes larger than the device's `total` memory on its own (no freeing or setting
/// helps, and saying that live tensors hold the memory would send the user looking for a
/// leak that is not there), or the per-process memory fraction, where `allowed` is below
/// `total` and the device has the bytes. `None` where neither is the cause.
pub(crate) fn fraction_hint(allowed: Option<u64>, need: u64, free: u64, total: u64) -> Option<String> {
    if need > total {
        return Some(format!(
            "The request alone ({}) is larger than the GPU's total memory ({}): no freeing or setting makes it fit; check the size computation, or split the work into smaller pieces.",
            format_size(need),
            format_size(total)
        ));
    }
    let max = allowed.filter(|&m| m < total && need <= free)?;
    Some(format!(
        "The per-process memory fraction caps this process at {}, and the device itself has room: raise the fraction (set_per_process_memory_fraction or per_process_memory_fraction).",
        format_size(max)
    ))
}

impl OutOfMemory {
    /// Reserved but unallocated bytes: the cache, after every releasable block was released.
    pub fn reserved_unallocated(&self) -> u64 {
        self.reserved.saturating_sub(self.allocated)
    }
}

impl OutOfMemory {
    /// Where the memory is, after the message's first sentences (what was asked, and the
    /// device's capacity and free memory): the cap, allocated and reserved-but-unallocated
    /// bytes, the hint, and the sites that hold the most. PyTorch's plugin puts it after
    /// PyTorch's own first sentences, which programs match on.
    pub fn details(&self) -> String {
        let mut out = String::new();
        if let Some(a) = self.allowed {
            out += &format!("{} allowed to this process; ", format_size(a));
        }
        out += &format!(
            "Of the reserved memory {} is allocated and {} is reserved but unallocated (largest free block {}, {} of it in segments pinned by live blocks). {}",
            format_size(self.allocated),
            format_size(self.reserved_unallocated()),
            format_size(self.largest_free_block),
            format_size(self.non_releasable),
            self.hint
        );
        if !self.sites.is_empty() {
            let sites: Vec<String> = self
                .sites
                .iter()
                .map(|s| {
                    let n = if s.count == 1 { "block" } else { "blocks" };
                    format!("{} in {} {n} from {}", format_size(s.bytes), s.count, s.location())
                })
                .collect();
            out += &format!(" Held the most by: {}.", sites.join("; "));
        }
        out
    }
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GPU out of memory: tried to allocate {} (asked for {}). GPU {} has a total capacity of {} of which {} is free. {}",
            format_size(self.alloc_size),
            format_size(self.requested),
            self.device,
            format_size(self.total),
            format_size(self.free),
            self.details()
        )
    }
}

/// What an allocator call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Out of memory; the allocator keeps working after it.
    #[error("{0}")]
    OutOfMemory(Box<OutOfMemory>),
    /// A free or `record_stream` of a pointer this allocator did not hand out, or already freed.
    #[error("invalid device pointer {0:#x}: not allocated by this allocator, or already freed; nothing was changed")]
    InvalidPointer(u64),
    /// A request too large to be real (1 EiB or more).
    #[error("tried to allocate {0} bytes, more than 1 EiB; check the size computation")]
    TooLarge(u64),
    /// A per-process memory fraction outside [0, 1].
    #[error("invalid memory fraction {0}: it must be between 0.0 and 1.0")]
    InvalidFraction(f64),
    /// A bad argument, such as a shape whose element count overflows or does not match the data.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Bad allocator options.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An earlier call panicked inside the allocator, which may have left it half-updated;
    /// it refuses further work rather than hand out memory from broken bookkeeping.
    #[error("the allocator is unusable: an earlier call panicked inside it and may have left it half-updated; create a new allocator (and please report the panic)")]
    Poisoned,
    /// The device failed in a way the allocator cannot recover from.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl AllocError {
    /// Whether this is an out-of-memory error.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, AllocError::OutOfMemory(_))
    }
}
