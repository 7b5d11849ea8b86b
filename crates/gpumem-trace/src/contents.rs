//! `--check-contents`: a replay that checks the allocator never loses data.
//!
//! Each block gets stamps of its own when it is allocated: 8-byte words at its first and last
//! bytes and at the start of every 2 MiB page inside it. When the block is freed, its stamps
//! must still be there. A stamp overwritten means two live blocks shared memory; a stamp lost
//! means a page under a live block was unmapped or remapped without its contents (recycling,
//! compaction and periodic plans all move pages under live blocks). On the simulated device
//! the words are its simulated contents, which unmapping loses and `remap` keeps only where
//! it was told to; on a GPU they are written and read one by one with synchronous copies, so
//! a checked replay there is slow and its timings mean nothing.

use crate::device::ReplayDevice;
use gpumem::DeviceError;

/// The page size the stamps follow (the GPU's mapping granularity).
const PAGE: u64 = 2 << 20;
/// At most this many stamps per block (evenly spread over its pages).
const MAX_STAMPS: usize = 64;

/// Where a block of `size` bytes at `ptr` gets its stamps (8-byte aligned addresses).
fn stamp_addrs(ptr: u64, size: u64) -> Vec<u64> {
    // a block that would wrap the address space gets none (no device hands one out)
    let Some(end) = ptr.checked_add(size) else {
        return Vec::new();
    };
    if size < 8 || !ptr.is_multiple_of(8) {
        return Vec::new();
    }
    let last = (end - 8) / 8 * 8;
    let first_page = ptr.checked_next_multiple_of(PAGE).unwrap_or(u64::MAX);
    let pages: Vec<u64> = (first_page..last).step_by(PAGE as usize).filter(|&a| a > ptr).collect();
    let step = pages.len().div_ceil(MAX_STAMPS - 2).max(1);
    let mut out = vec![ptr];
    out.extend(pages.into_iter().step_by(step));
    if last > ptr {
        out.push(last);
    }
    out
}

/// The word block `id` keeps at `addr`: different for every block and every place in it.
fn stamp(id: u32, addr: u64) -> u64 {
    (id as u64 ^ 0x5eed_0000_0000).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ addr
}

/// Writes block `id`'s stamps.
pub(crate) fn write_stamps<D: ReplayDevice>(
    dev: &D,
    id: u32,
    ptr: u64,
    size: u64,
) -> Result<(), DeviceError> {
    stamp_addrs(ptr, size).into_iter().try_for_each(|a| dev.write_word(a, stamp(id, a)))
}

/// Whether block `id`'s stamps are all where they were written.
pub(crate) fn stamps_intact<D: ReplayDevice>(
    dev: &D,
    id: u32,
    ptr: u64,
    size: u64,
) -> Result<bool, DeviceError> {
    for a in stamp_addrs(ptr, size) {
        if dev.read_word(a)? != Some(stamp(id, a)) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpumem::{Device, SimDevice};

    #[test]
    fn a_block_written_over_or_unmapped_loses_its_stamps() {
        let sim = SimDevice::new(1 << 30);
        let seg = sim.malloc(8 * PAGE).unwrap();
        write_stamps(&sim, 1, seg, 3 * PAGE).unwrap();
        write_stamps(&sim, 2, seg + 4 * PAGE, PAGE).unwrap();
        assert!(stamps_intact(&sim, 1, seg, 3 * PAGE).unwrap());
        assert!(stamps_intact(&sim, 2, seg + 4 * PAGE, PAGE).unwrap());
        // the wrong block at that place, and a block handed out over block 1's last page
        assert!(!stamps_intact(&sim, 2, seg, 3 * PAGE).unwrap());
        write_stamps(&sim, 3, seg + 2 * PAGE, PAGE).unwrap();
        assert!(!stamps_intact(&sim, 1, seg, 3 * PAGE).unwrap());
        // memory given back under a live block
        sim.free(seg).unwrap();
        assert!(!stamps_intact(&sim, 2, seg + 4 * PAGE, PAGE).unwrap());
    }

    #[test]
    fn stamps_cover_the_ends_and_the_pages_inside() {
        let a = stamp_addrs(PAGE - 512, 3 * PAGE);
        assert_eq!(a.first(), Some(&(PAGE - 512)));
        assert_eq!(a.last(), Some(&(4 * PAGE - 512 - 8)));
        assert!(a.contains(&PAGE) && a.contains(&(2 * PAGE)) && a.contains(&(3 * PAGE)));
        assert!(stamp_addrs(4096, 4).is_empty());
        assert_eq!(stamp_addrs(4096, 8), vec![4096]);
        // a 1.5 GiB block keeps at most MAX_STAMPS, the ends among them
        let big = stamp_addrs(PAGE, 768 * PAGE);
        assert!(big.len() <= MAX_STAMPS, "{}", big.len());
        assert_eq!(big.last(), Some(&(769 * PAGE - 8)));
        assert_ne!(stamp(1, PAGE), stamp(2, PAGE));
        // at the top of the address space: no wrap, no panic
        assert_eq!(stamp_addrs(u64::MAX - 15, 8), vec![u64::MAX - 15]);
        assert!(stamp_addrs(u64::MAX - 7, 8).is_empty() && stamp_addrs(u64::MAX - 7, 16).is_empty());
        assert_eq!(stamp_addrs(u64::MAX - PAGE - 15, PAGE + 8).last(), Some(&(u64::MAX - 15)));
        assert_ne!(stamp(1, PAGE), stamp(1, 2 * PAGE));
    }
}
