//! Rust call stacks as a [`StackSource`]: `std::backtrace`, for Rust programs that want
//! their leak reports and out-of-memory errors to name the Rust lines that allocated.

use crate::report::history::{Frame, Frames, StackSource};
use std::backtrace::Backtrace;
use std::sync::Arc;

/// A [`StackSource`] that captures the Rust call stack (`std::backtrace`, whatever
/// `RUST_BACKTRACE` says) of every allocation and free while history is recorded. The frames
/// of the standard library, of the runtime and of gpumem itself are left out, so the
/// innermost frame is the caller's line. Capturing and symbolizing a backtrace costs tens of
/// microseconds or more: it is for finding a leak, not for production runs. Frames have
/// file and line where the binary has debug information.
///
/// ```
/// use gpumem::{rust_backtrace_source, Allocator, AllocatorConfig, SimDevice, StreamId};
/// let a = Allocator::new(SimDevice::default(), AllocatorConfig::default())?;
/// a.record_history(true, 1000);
/// a.set_stack_source(Some(rust_backtrace_source()));
/// let _kept = a.malloc(1 << 20, StreamId::DEFAULT)?;
/// print!("{}", a.leaks()); // 1 block (1.00 MiB) still live, from 1 site: ... this line
/// # Ok::<(), gpumem::AllocError>(())
/// ```
pub fn rust_backtrace_source() -> StackSource {
    Arc::new(|| parse_backtrace(&Backtrace::force_capture().to_string()))
}

/// Whether a frame belongs to the machinery rather than to the caller.
fn is_internal(name: &str) -> bool {
    const PREFIXES: [&str; 11] = [
        "std::",
        "core::",
        "alloc::",
        "gpumem::",
        "<gpumem::",
        "backtrace::",
        "__rust",
        "__libc",
        "_start",
        "test::",
        "<alloc::",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p)) || name.starts_with("<core::") || name.starts_with("<std::")
}

/// Drops the hash that symbol names end with (`::h0123456789abcdef`).
fn without_hash(name: &str) -> &str {
    match name.rsplit_once("::h") {
        Some((head, h)) if h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()) => head,
        _ => name,
    }
}

/// The frames of a `std::backtrace::Backtrace` as its `Display` prints them
/// (`  3: crate::f\n             at ./src/main.rs:12:5`), without the internal ones.
pub(crate) fn parse_backtrace(text: &str) -> Frames {
    let mut frames: Vec<Frame> = Vec::new();
    let mut keep = false;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(at) = t.strip_prefix("at ") {
            if let (true, Some(f)) = (keep, frames.last_mut()) {
                // path:line:column, where the path may itself hold colons
                let mut parts = at.rsplitn(3, ':');
                let (col, line_no, file) = (parts.next(), parts.next(), parts.next());
                match (file, line_no.and_then(|l| l.parse().ok()), col) {
                    (Some(file), Some(l), Some(_)) => {
                        f.filename = file.to_string();
                        f.line = l;
                    }
                    _ => f.filename = at.to_string(),
                }
            }
            continue;
        }
        let Some((num, name)) = t.split_once(": ") else { continue };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let name = without_hash(name.trim());
        keep = !is_internal(name);
        if keep {
            frames.push(Frame { filename: String::new(), line: 0, name: name.to_string() });
        }
    }
    Arc::from(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_backtrace_becomes_the_callers_frames() {
        let text = "   0: std::backtrace::Backtrace::force_capture
             at /rustc/abc/library/std/src/backtrace.rs:312:13
   1: gpumem::report::backtrace::rust_backtrace_source::{{closure}}
             at ./crates/gpumem/src/report/backtrace.rs:20:17
   2: <gpumem::Allocator<D>>::malloc
             at ./crates/gpumem/src/allocator.rs:160:9
   3: train::step::h0123456789abcdef
             at ./src/train.rs:7:5
   4: train::main
             at C:\\work\\src\\main.rs:20:9
   5: core::ops::function::FnOnce::call_once
             at /rustc/abc/library/core/src/ops/function.rs:250:5
   6: main
   7: __libc_start_main
";
        let f = parse_backtrace(text);
        let got: Vec<(&str, u32, &str)> =
            f.iter().map(|f| (f.filename.as_str(), f.line, f.name.as_str())).collect();
        assert_eq!(
            got,
            [
                ("./src/train.rs", 7, "train::step"),
                ("C:\\work\\src\\main.rs", 20, "train::main"),
                ("", 0, "main")
            ]
        );
    }
}
