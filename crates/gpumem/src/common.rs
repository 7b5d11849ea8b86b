//! What both policies share: request rounding, the request limit, the pointer map, and
//! PyTorch's way of printing a byte count; and how any part of gpumem shows input in a
//! message. Neither policy imports the other; both import this.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// All sizes are rounded to at least 512 bytes.
pub const MIN_BLOCK_SIZE: u64 = 512;
/// Requests this large or larger are refused at once, as PyTorch does ("more than 1EB").
pub const MAX_REQUEST: u64 = 1 << 60;

/// Rounds a request the way PyTorch's `round_size` does; `divisions` is the `roundup_power2_divisions` setting that applies to `size`
/// (`AllocatorConfig::roundup_power2_divisions_for`).
pub(crate) fn round_size(size: u64, divisions: u64) -> u64 {
    if size < MIN_BLOCK_SIZE {
        return MIN_BLOCK_SIZE;
    }
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

/// `s` for a message: control characters and bidirectional overrides escaped (`\n`,
/// `\u{1b}`, `\u{202e}`: a hostile file name, option or trace must not move the terminal's
/// cursor or reorder what it shows) and cut after `max` characters, marked with `...`. The
/// options parser, the trace readers and the command line all show input through this.
///
/// ```
/// assert_eq!(gpumem::escape_for_message("a\u{1b}[2J\n", 80), "a\\u{1b}[2J\\n");
/// assert_eq!(gpumem::escape_for_message("abcdef", 3), "abc...");
/// ```
pub fn escape_for_message(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
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

/// A fast hasher for pointer keys (a multiplicative mix; pointers are already well spread).
#[derive(Default)]
pub(crate) struct PtrHasher(u64);

impl Hasher for PtrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        self.0 ^= self.0 >> 32;
    }
}

pub(crate) type PtrMap<V> = HashMap<u64, V, BuildHasherDefault<PtrHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_follows_pytorch() {
        assert_eq!(round_size(1, 0), 512);
        assert_eq!(round_size(512, 0), 512);
        assert_eq!(round_size(513, 0), 1024);
        assert_eq!(round_size((1 << 20) + 1, 0), (1 << 20) + 512);
        // 1200 is below 512 * 4, so it only takes the 512 B rounding.
        assert_eq!(round_size(1200, 4), 1536);
        assert_eq!(roundup_power2_next_division(1200, 4), 1280);
        assert_eq!(round_size((5 << 20) + 1, 4), 6 << 20);
        assert_eq!(round_size(4 << 20, 4), 4 << 20);
    }

    #[test]
    fn format_size_matches_the_cpp_helper() {
        assert_eq!(format_size(1024), "1024 bytes");
        assert_eq!(format_size(1536), "1.50 KiB");
        assert_eq!(format_size(400_000_000), "381.47 MiB");
        assert_eq!(format_size(3 << 30), "3.00 GiB");
    }
}
