//! Leak reports: the blocks still live, grouped by the call stack that allocated them (the
//! allocation *site*), with count and bytes, largest first.
//!
//! The allocator builds one from its snapshot and the stacks its history keeps
//! ([`crate::Allocator::leaks`], [`crate::Allocator::leaks_since`]); the trace tools build one
//! from a trace's own frames ([`LeakReport::from_blocks`]), so that both group and print the
//! same way.

use crate::common::format_size;
use crate::device::StreamId;
use crate::report::history::{Frame, Frames};
use std::collections::HashMap;
use std::fmt;

/// One block still live, as a leak report sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveBlock {
    /// Its address.
    pub address: u64,
    /// The bytes the caller asked for.
    pub size: u64,
    /// The stream it was allocated on.
    pub stream: StreamId,
    /// Its place in the allocation order ([`crate::Allocator::allocation_mark`]), where the
    /// history was on when it was allocated.
    pub seq: Option<u64>,
    /// The call stack that allocated it, innermost first (empty if none was recorded).
    pub frames: Frames,
}

/// The live blocks of one allocation site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeakSite {
    /// The frames that name the site, innermost first ([`site_frames`]); empty where no
    /// stack was recorded.
    pub frames: Frames,
    /// How many blocks.
    pub count: u64,
    /// Their requested bytes.
    pub bytes: u64,
    /// The blocks, largest first.
    pub blocks: Vec<LiveBlock>,
}

/// The live blocks, by site, largest site first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeakReport {
    /// The sites, by bytes held (the most first; ties by count, then by frames).
    pub sites: Vec<LeakSite>,
    /// Blocks in all.
    pub count: u64,
    /// Their requested bytes.
    pub bytes: u64,
}

/// The frames of a stack that name its allocation site: those with a line number (the
/// Python lines of a PyTorch stack, whose C++ frames have none) where it has any, else the
/// whole stack less the frames of the stack capture and of PyTorch's allocator itself. Two
/// allocations from the same Python line through different C++ paths are then one site.
pub fn site_frames(frames: &[Frame]) -> Frames {
    if frames.iter().any(|f| f.line > 0) {
        frames.iter().filter(|f| f.line > 0).cloned().collect()
    } else {
        const MACHINERY: [&str; 4] = [
            "torch::unwind::",
            "torch::CapturedTraceback::",
            "torch::cuda::(anonymous namespace)::gather",
            "c10::cuda::CUDACachingAllocator::",
        ];
        let inner = frames.iter().take_while(|f| MACHINERY.iter().any(|m| f.name.starts_with(m))).count();
        frames[inner..].iter().cloned().collect()
    }
}

/// How many frames of a site [`LeakReport`]'s text shows: the innermost, and the two
/// outermost (the program's own lines, in a Python stack), where it has more.
const SHOWN_FRAMES: usize = 8;
/// How many sites its text shows.
const SHOWN_SITES: usize = 20;

impl LeakReport {
    /// Groups `blocks` by site ([`site_frames`] of their stacks), sites holding the most
    /// bytes first.
    pub fn from_blocks(blocks: impl IntoIterator<Item = LiveBlock>) -> LeakReport {
        let mut by_site: HashMap<Frames, LeakSite> = HashMap::new();
        let (mut count, mut bytes) = (0, 0u64);
        for b in blocks {
            count += 1;
            bytes = bytes.saturating_add(b.size);
            let key = site_frames(&b.frames);
            let site = by_site.entry(key.clone()).or_insert_with(|| LeakSite {
                frames: key,
                count: 0,
                bytes: 0,
                blocks: Vec::new(),
            });
            site.count += 1;
            site.bytes = site.bytes.saturating_add(b.size);
            site.blocks.push(b);
        }
        let mut sites: Vec<LeakSite> = by_site.into_values().collect();
        for s in &mut sites {
            s.blocks.sort_by(|a, b| b.size.cmp(&a.size).then(a.address.cmp(&b.address)));
        }
        sites.sort_by(|a, b| {
            b.bytes.cmp(&a.bytes).then(b.count.cmp(&a.count)).then_with(|| a.frames.cmp(&b.frames))
        });
        LeakReport { sites, count, bytes }
    }

    /// The `n` sites that hold the most.
    pub fn top(&self, n: usize) -> &[LeakSite] {
        &self.sites[..n.min(self.sites.len())]
    }

    /// Whether no block is live.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl LeakSite {
    /// The innermost frame, as `file:line in function`, or `(no stack recorded)`.
    pub fn location(&self) -> String {
        self.frames.first().map_or_else(|| "(no stack recorded)".to_string(), show_frame)
    }
}

/// A frame as `file:line in function` (`function` alone where the file is unknown).
pub fn show_frame(f: &Frame) -> String {
    match (f.filename.is_empty() || f.filename == "??", f.line) {
        (true, _) => f.name.clone(),
        (false, 0) => format!("{} in {}", f.filename, f.name),
        (false, l) => format!("{}:{l} in {}", f.filename, f.name),
    }
}

fn blocks(n: u64) -> &'static str {
    if n == 1 {
        "block"
    } else {
        "blocks"
    }
}

impl fmt::Display for LeakReport {
    /// The sites, largest first, each with its innermost frames:
    ///
    /// ```text
    /// 3 blocks (1.50 GiB) still live, from 2 sites:
    ///   1.00 GiB in 2 blocks
    ///     train.py:7 in step
    ///     train.py:20 in main
    ///   512.00 MiB in 1 block
    ///     (no stack recorded)
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.sites.len();
        write!(f, "{} {} ({}) still live", self.count, blocks(self.count), format_size(self.bytes))?;
        if n == 0 {
            return writeln!(f, ".");
        }
        writeln!(f, ", from {n} site{}:", if n == 1 { "" } else { "s" })?;
        for s in self.top(SHOWN_SITES) {
            writeln!(f, "  {} in {} {}", format_size(s.bytes), s.count, blocks(s.count))?;
            if s.frames.is_empty() {
                writeln!(f, "    (no stack recorded)")?;
            }
            let n = s.frames.len();
            for (i, fr) in s.frames.iter().enumerate() {
                if n <= SHOWN_FRAMES || i < SHOWN_FRAMES - 3 || i >= n - 2 {
                    writeln!(f, "    {}", show_frame(fr))?;
                } else if i == SHOWN_FRAMES - 3 {
                    writeln!(f, "    ... {} more frames", n - SHOWN_FRAMES + 1)?;
                }
            }
        }
        if n > SHOWN_SITES {
            let rest = &self.sites[SHOWN_SITES..];
            let bytes: u64 = rest.iter().map(|s| s.bytes).sum();
            writeln!(f, "  ... and {} more sites ({})", n - SHOWN_SITES, format_size(bytes))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn frame(file: &str, line: u32, name: &str) -> Frame {
        Frame { filename: file.into(), line, name: name.into() }
    }

    fn block(address: u64, size: u64, frames: &[Frame]) -> LiveBlock {
        LiveBlock { address, size, stream: StreamId::DEFAULT, seq: None, frames: Arc::from(frames.to_vec()) }
    }

    #[test]
    fn blocks_group_by_their_python_lines_largest_site_first() {
        let cpp = frame("Blas.cpp", 0, "addmm");
        let other_cpp = frame("Conv.cpp", 0, "conv");
        let step = frame("train.py", 7, "step");
        let main = frame("train.py", 20, "main");
        let r = LeakReport::from_blocks([
            block(0x1000, 100, &[cpp.clone(), step.clone(), main.clone()]),
            // the same Python lines through another C++ path: the same site
            block(0x2000, 300, &[other_cpp, step.clone(), main.clone()]),
            block(0x3000, 1000, &[]),
            block(0x4000, 50, &[cpp]),
        ]);
        assert_eq!((r.count, r.bytes), (4, 1450));
        let got: Vec<(u64, u64, usize)> =
            r.sites.iter().map(|s| (s.bytes, s.count, s.frames.len())).collect();
        assert_eq!(got, [(1000, 1, 0), (400, 2, 2), (50, 1, 1)]);
        assert_eq!(r.sites[1].frames[0], step);
        assert_eq!(r.sites[1].blocks[0].address, 0x2000, "largest block first");
        assert_eq!(r.sites[2].location(), "Blas.cpp in addmm");
        assert_eq!(r.top(2).len(), 2);
        let text = r.to_string();
        assert!(text.starts_with("4 blocks (1.42 KiB) still live, from 3 sites:"), "{text}");
        assert!(
            text.contains("  400 bytes in 2 blocks\n    train.py:7 in step\n    train.py:20 in main\n"),
            "{text}"
        );
        assert!(text.contains("(no stack recorded)"), "{text}");
    }

    #[test]
    fn an_empty_report_says_so() {
        let r = LeakReport::from_blocks([]);
        assert!(r.is_empty());
        assert_eq!(r.to_string(), "0 blocks (0 bytes) still live.\n");
    }
}
