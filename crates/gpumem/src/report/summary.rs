//! `memory_summary()`: PyTorch's table, byte for byte.
//!
//! Note [The summary's units]
//! ------------------------------
//! Each column picks its unit from the "all" row's value: it steps up from B to KiB, MiB, ...
//! while that value is at least 768 of the next unit (so 700 MiB still prints as KiB), and the
//! pool rows reuse the "all" row's unit. Sizes are floor-divided. Counts step up by 1000 from
//! 750 K. Tools parse this table, so it reproduces PyTorch's `memory.py` exactly, quirks
//! included.

use crate::report::stats::{DeviceStats, Stat, StatArray};

fn format_size(mut sz: i64, pref: i64) -> String {
    let prefixes = ["B  ", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut prefix = prefixes[0];
    let mut pref = pref as f64;
    for p in &prefixes[1..] {
        if pref < 768.0 * 1024.0 {
            break;
        }
        prefix = p;
        sz = sz.div_euclid(1024);
        pref /= 1024.0;
    }
    format!("{sz:6} {prefix}")
}

fn format_count(mut cnt: i64, pref: i64) -> String {
    let prefixes = [" ", "K", "M"];
    let mut prefix = prefixes[0];
    let mut pref = pref as f64;
    for p in &prefixes[1..] {
        if pref < 750.0 * 1000.0 {
            break;
        }
        prefix = p;
        cnt = cnt.div_euclid(1000);
        pref /= 1000.0;
    }
    format!("{cnt:7} {prefix} ")
}

type Formatter = fn(i64, i64) -> String;

fn row(name: &str, s: &Stat, pref: &Stat, f: Formatter) -> String {
    format!(
        " {:<21} | {} | {} | {} | {} ",
        name,
        f(s.current, pref.current),
        f(s.peak, pref.peak),
        f(s.allocated, pref.allocated),
        f(s.freed, pref.freed)
    )
}

/// Renders `stats` as PyTorch's `torch.cuda.memory_summary(device, abbreviated)` does.
pub fn memory_summary(stats: &DeviceStats, device: usize, abbreviated: bool) -> String {
    let rule = |c: char| c.to_string().repeat(75);
    let mut lines = vec![
        rule('='),
        format!(" {:16} PyTorch CUDA memory summary, device ID {:<17} ", "", device),
        rule('-'),
        format!(
            "  {:9} CUDA OOMs: {:<12} | {:6} cudaMalloc retries: {:<8}  ",
            "", stats.num_ooms, "", stats.num_alloc_retries
        ),
        rule('='),
        "        Metric         | Cur Usage  | Peak Usage | Tot Alloc  | Tot Freed  ".to_string(),
    ];
    let metrics: [(&StatArray, &str, Formatter); 9] = [
        (&stats.allocated_bytes, "Allocated memory", format_size),
        (&stats.active_bytes, "Active memory", format_size),
        (&stats.requested_bytes, "Requested memory", format_size),
        (&stats.reserved_bytes, "GPU reserved memory", format_size),
        (&stats.inactive_split_bytes, "Non-releasable memory", format_size),
        (&stats.allocation, "Allocations", format_count),
        (&stats.active, "Active allocs", format_count),
        (&stats.segment, "GPU reserved segments", format_count),
        (&stats.inactive_split, "Non-releasable allocs", format_count),
    ];
    for (arr, name, f) in metrics {
        lines.push(rule('-'));
        lines.push(row(name, arr.all(), arr.all(), f));
        if !abbreviated {
            lines.push(row("      from large pool", arr.large(), arr.all(), f));
            lines.push(row("      from small pool", arr.small(), arr.all(), f));
        }
    }
    for (s, name) in [
        (&stats.oversize_allocations, "Oversize allocations"),
        (&stats.oversize_segments, "Oversize GPU segments"),
    ] {
        lines.push(rule('-'));
        lines.push(row(name, s, s, format_count));
    }
    lines.push(rule('='));
    format!("|{}|\n", lines.join("|\n|"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_follow_the_all_row() {
        assert_eq!(format_size(0, 0), "     0 B  ");
        assert_eq!(format_size(168882176, 168882176), "164924 KiB");
        assert_eq!(format_size(4096 * 1024, 900 << 20), "     4 MiB");
        assert_eq!(format_count(21, 21), "     21   ");
        assert_eq!(format_count(1_500_000, 1_500_000), "   1500 K ");
    }
}
