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

use crate::config::AllocatorConfig;

/// All sizes are rounded to at least 512 bytes.
pub const MIN_BLOCK_SIZE: u64 = 512;
/// The largest "small" allocation: 1 MiB.
pub const SMALL_SIZE: u64 = 1 << 20;
/// Small allocations are packed in 2 MiB segments.
pub const SMALL_BUFFER: u64 = 2 << 20;
/// Allocations between 1 and 10 MiB may use a 20 MiB segment.
pub const MIN_LARGE_ALLOC: u64 = 10 << 20;
/// Large allocations are rounded up to 2 MiB.
pub const ROUND_LARGE: u64 = 2 << 20;
/// "Large" allocations may be packed in 20 MiB segments.
pub const LARGE_BUFFER: u64 = 20 << 20;
/// Requests this large or larger are refused at once, as PyTorch does ("more than 1EB").
pub const MAX_REQUEST: u64 = 1 << 60;

/// Rounds a request the way PyTorch's `round_size` does.
pub(crate) fn round_size(size: u64, config: &AllocatorConfig) -> u64 {
    if size < MIN_BLOCK_SIZE {
        return MIN_BLOCK_SIZE;
    }
    let divisions = config.roundup_power2_divisions_for(size);
    if divisions > 1 && size > MIN_BLOCK_SIZE * divisions {
        roundup_power2_next_division(size, divisions)
    } else {
        size.div_ceil(MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE
    }
}

/// Rounds `size` up to the next of `divisions` equal steps between two powers of two
/// (1200 with 4 divisions: steps 1024, 1280, 1536, 1792, so 1280).
pub(crate) fn roundup_power2_next_division(size: u64, divisions: u64) -> u64 {
    if size.is_power_of_two() {
        return size;
    }
    let floor = 1u64 << (63 - size.leading_zeros());
    let step = floor >> (63 - divisions.leading_zeros());
    if step == 0 {
        return floor << 1;
    }
    let rounded = size & !(step - 1);
    if rounded == size {
        size
    } else {
        rounded + step
    }
}

/// The size of the segment to allocate for a rounded request (PyTorch's
/// `get_allocation_size`).
pub(crate) fn allocation_size(size: u64, config: &AllocatorConfig) -> u64 {
    if size <= SMALL_SIZE {
        SMALL_BUFFER
    } else if size < MIN_LARGE_ALLOC {
        config.large_segment_size
    } else {
        size.div_ceil(ROUND_LARGE) * ROUND_LARGE
    }
}

/// Formats a byte count as PyTorch's C++ `format_size` does: `"512 bytes"`, `"1.50 KiB"`,
/// `"381.47 MiB"`, `"2.00 GiB"`.
pub fn format_size(size: u64) -> String {
    let s = size as f64;
    if size <= 1024 {
        format!("{size} bytes")
    } else if size <= 1 << 20 {
        format!("{:.2} KiB", s / 1024.0)
    } else if size <= 1 << 30 {
        format!("{:.2} MiB", s / 1048576.0)
    } else {
        format!("{:.2} GiB", s / 1073741824.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> AllocatorConfig {
        AllocatorConfig::parse(s).unwrap()
    }

    #[test]
    fn rounding_follows_pytorch() {
        let c = cfg("");
        assert_eq!(round_size(1, &c), 512);
        assert_eq!(round_size(512, &c), 512);
        assert_eq!(round_size(513, &c), 1024);
        assert_eq!(round_size((1 << 20) + 1, &c), (1 << 20) + 512);
        let c4 = cfg("roundup_power2_divisions:4");
        // 1200 is below 512 * 4, so it only takes the 512 B rounding.
        assert_eq!(round_size(1200, &c4), 1536);
        assert_eq!(roundup_power2_next_division(1200, 4), 1280);
        assert_eq!(round_size((5 << 20) + 1, &c4), 6 << 20);
        assert_eq!(round_size(4 << 20, &c4), 4 << 20);
    }

    #[test]
    fn segment_sizes_follow_pytorch() {
        let c = cfg("");
        assert_eq!(allocation_size(512, &c), 2 << 20);
        assert_eq!(allocation_size(1 << 20, &c), 2 << 20);
        assert_eq!(allocation_size((1 << 20) + 512, &c), 20 << 20);
        assert_eq!(allocation_size((10 << 20) - 512, &c), 20 << 20);
        assert_eq!(allocation_size(10 << 20, &c), 10 << 20);
        assert_eq!(allocation_size((10 << 20) + 512, &c), 12 << 20);
    }

    #[test]
    fn format_size_matches_the_cpp_helper() {
        assert_eq!(format_size(1024), "1024 bytes");
        assert_eq!(format_size(1536), "1.50 KiB");
        assert_eq!(format_size(400_000_000), "381.47 MiB");
        assert_eq!(format_size(3 << 30), "3.00 GiB");
    }
}
