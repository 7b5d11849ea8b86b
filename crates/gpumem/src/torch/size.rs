//! PyTorch's size rules: rounding a request, choosing its pool, and sizing a new segment.
//!
//! Note [Why these constants]
//! ------------------------------
//! Every size is rounded to 512 B so that splits stay aligned for any dtype. Requests of
//! 1 MiB or less share 2 MiB segments (the small pool); this keeps the many tiny tensors of
//! a model (biases, norms, scalars) from each costing a driver call. Requests between 1 MiB
//! and 10 MiB take 20 MiB segments, split among several such requests, because a driver
//! call costs ~50 µs. Anything larger gets a segment of its own size rounded to 2 MiB, the
//! GPU's page size. These numbers come from PyTorch (PR #17120) and are reproduced exactly:
//! the `torch` policy must make the very same driver calls as PyTorch.

/// The largest "small" allocation: 1 MiB.
pub const SMALL_SIZE: u64 = 1 << 20;
/// Small allocations are packed in 2 MiB segments.
pub const SMALL_BUFFER: u64 = 2 << 20;
/// Allocations between 1 and 10 MiB may use a 20 MiB segment.
pub const MIN_LARGE_ALLOC: u64 = 10 << 20;
/// Large allocations are rounded up to 2 MiB.
pub const ROUND_LARGE: u64 = 2 << 20;

/// The size of the segment to allocate for a rounded request (PyTorch's
/// `get_allocation_size`); `large_segment_size` is the `large_segment_size_mb` setting.
pub(crate) fn allocation_size(size: u64, large_segment_size: u64) -> u64 {
    if size <= SMALL_SIZE {
        SMALL_BUFFER
    } else if size < MIN_LARGE_ALLOC {
        large_segment_size
    } else {
        size.div_ceil(ROUND_LARGE) * ROUND_LARGE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// The default `large_segment_size_mb`: "large" allocations may share 20 MiB segments.
    const LARGE_BUFFER: u64 = 20 << 20;

    #[test]
    fn segment_sizes_follow_pytorch() {
        assert_eq!(allocation_size(512, LARGE_BUFFER), 2 << 20);
        assert_eq!(allocation_size(1 << 20, LARGE_BUFFER), 2 << 20);
        assert_eq!(allocation_size((1 << 20) + 512, LARGE_BUFFER), 20 << 20);
        assert_eq!(allocation_size((10 << 20) - 512, LARGE_BUFFER), 20 << 20);
        assert_eq!(allocation_size(10 << 20, LARGE_BUFFER), 10 << 20);
        assert_eq!(allocation_size((10 << 20) + 512, LARGE_BUFFER), 12 << 20);
    }
}
