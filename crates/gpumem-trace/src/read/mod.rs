//! Reading a trace from any supported format, told apart by its content.
//!
//! Each format has its own module that turns the (decompressed) bytes into a
//! [`Trace`]; this one only opens, decompresses, detects and dispatches, and checks what
//! holds for every format (not empty, has allocator events).
//!
//! Input may be hostile or simply wrong (a device file, a FIFO, a gzip bomb, a binary file
//! named `.jsonl`), so reading is bounded everywhere: only regular files are opened; the
//! content is streamed, never decompressed whole, and refused at its first bytes when it is
//! no trace; a line (a record) may not exceed [`MAX_LINE`]; a pickle may not exceed
//! [`pickle::MAX_BYTES`] nor expand beyond its budget. Memory then grows with the events a
//! trace really holds, and nothing else.

mod jsonl;
mod pickle;
mod pickle_frames;
mod pickle_scan;
mod rmm;

use crate::error::{Location, TraceError};
use crate::model::{Format, Trace};
use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The longest line (or CSV record) a text trace may have. Real lines are under 200 bytes,
/// the stats line a few KB; anything longer is not a trace, and is refused before it fills
/// memory.
pub const MAX_LINE: u64 = 1 << 20;

/// How much blank space may come before a trace's first character.
const MAX_LEADING_BLANKS: usize = 64 << 10;

/// Decides the format from the first bytes of the (decompressed) content.
pub fn detect(bytes: &[u8]) -> Option<Format> {
    let text_start = bytes.iter().position(|b| !b.is_ascii_whitespace()).map(|i| &bytes[i..]);
    match bytes.first() {
        Some(0x80) => Some(Format::SnapshotPickle),
        _ => match text_start {
            Some(t) if t.starts_with(b"{") => Some(Format::JsonLines),
            Some(t) if t.starts_with(b"Thread,Time,Action,Pointer,Size,Stream") => Some(Format::RmmCsv),
            _ => None,
        },
    }
}

/// Reads the file at `path`, whatever its format (detected from its content, gzip'd or not).
///
/// Only regular files are read: a device (`/dev/zero`), a FIFO or a directory is refused
/// before it is opened, since reading it may never end (and opening a FIFO blocks until a
/// writer comes).
pub fn read_trace(path: &str) -> Result<Trace, TraceError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| TraceError::new(path, Location::File, format!("cannot read: {e}")))?;
    if !meta.is_file() {
        let what =
            if meta.is_dir() { "a directory" } else { "not a regular file (a device, FIFO or socket)" };
        return Err(TraceError::new(path, Location::File, format!("{what}: give the path of a trace file")));
    }
    let file = std::fs::File::open(path)
        .map_err(|e| TraceError::new(path, Location::File, format!("cannot read: {e}")))?;
    read_trace_from(path, file)
}

/// Reads a trace from bytes (gzip'd or not, in any format); `path` is used in messages.
pub fn read_trace_bytes(path: &str, raw: &[u8]) -> Result<Trace, TraceError> {
    read_trace_from(path, raw)
}

/// Reads plain (not gzip'd) bytes as a trace of the given format, without detection; `path`
/// is used in messages. For tests and fuzzing of one reader.
pub fn read_trace_as(path: &str, format: Format, data: &[u8]) -> Result<Trace, TraceError> {
    let trace = parse(path, format, BufReader::new(Source::new(path, data, false)), 0)?;
    check_events(path, trace)
}

/// Reads a trace from any reader of the file's raw bytes.
fn read_trace_from<R: Read>(path: &str, raw: R) -> Result<Trace, TraceError> {
    let mut raw = BufReader::new(raw);
    let gzip = peek(path, &mut raw, GZIP_MAGIC.len())?.starts_with(&GZIP_MAGIC);
    let src: Box<dyn Read + '_> =
        if gzip { Box::new(flate2::bufread::MultiGzDecoder::new(raw)) } else { Box::new(raw) };
    let mut src = BufReader::new(Source::new(path, src, gzip));
    // Sniff the first (decompressed) bytes, skipping blank space, and refuse a non-trace
    // there, before reading (or decompressing) the rest.
    let (head, lines_skipped) = sniff(path, &mut src)?;
    let format = detect(&head).ok_or_else(|| {
        TraceError::new(
            path,
            Location::Byte(0),
            "not a trace: expected JSON lines, a PyTorch snapshot pickle, or an RMM log CSV",
        )
    })?;
    let trace = parse(path, format, src, lines_skipped)?;
    check_events(path, trace)
}

/// Parses `src` as `format`; `lines_skipped` blank lines came before it.
fn parse<R: BufRead>(path: &str, format: Format, src: R, lines_skipped: usize) -> Result<Trace, TraceError> {
    match format {
        Format::JsonLines => jsonl::parse(path, Limited::new(path, src, lines_skipped)),
        Format::SnapshotPickle => pickle::parse(path, src),
        Format::RmmCsv => rmm::parse(path, Limited::new(path, src, lines_skipped)),
    }
}

fn check_events(path: &str, trace: Trace) -> Result<Trace, TraceError> {
    if trace.events.is_empty() {
        return Err(TraceError::new(path, Location::File, "the trace has no allocator events"));
    }
    // A block or segment that runs past the top of the 64-bit address space exists on no
    // device; refusing it here keeps every later `addr + size` from wrapping.
    let wraps =
        |e: &&crate::model::Event| e.action != gpumem::Action::Oom && e.addr.checked_add(e.size).is_none();
    if let Some(e) = trace.events.iter().find(wraps) {
        return Err(TraceError::new(
            path,
            e.origin,
            format!(
                "{} at {:#x} of {} bytes runs past the end of the 64-bit address space",
                e.action.name(),
                e.addr,
                e.size
            ),
        ));
    }
    Ok(trace)
}

/// The first `n` bytes of `r` (fewer at its end), left in `r` to be read again.
fn peek<R: BufRead>(path: &str, r: &mut R, n: usize) -> Result<Vec<u8>, TraceError> {
    let buf = r.fill_buf().map_err(|e| io_error(path, Location::Byte(0), e))?;
    Ok(buf[..buf.len().min(n)].to_vec())
}

/// Skips leading blank space (a bounded amount) and returns the first bytes after it, left
/// in `r`, and the number of lines skipped; an error where the content is empty or only
/// blank.
fn sniff<R: BufRead>(path: &str, r: &mut R) -> Result<(Vec<u8>, usize), TraceError> {
    let (mut skipped, mut lines) = (0, 0);
    loop {
        let buf = r.fill_buf().map_err(|e| io_error(path, Location::Byte(skipped as u64), e))?;
        if buf.is_empty() {
            return Err(TraceError::new(path, Location::File, "the file is empty"));
        }
        // a pickle starts with 0x80 at its first byte; blank space before it is no pickle
        if skipped == 0 && buf[0] == 0x80 {
            return Ok((buf[..buf.len().min(64)].to_vec(), 0));
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            // the blanks before it in this buffer stay, for the parser to count
            Some(i) => return Ok((buf[i..buf.len().min(i + 64)].to_vec(), lines)),
            None => {
                let n = buf.len();
                lines += buf.iter().filter(|&&b| b == b'\n').count();
                skipped += n;
                r.consume(n);
                if skipped > MAX_LEADING_BLANKS {
                    return Err(TraceError::new(
                        path,
                        Location::Byte(skipped as u64),
                        "not a trace: more than 64 KiB of blank space and nothing else at its start",
                    ));
                }
            }
        }
    }
}

/// An error of the underlying reader that carries its own [`TraceError`] (broken gzip data,
/// an overlong line), passed through `io::Error` so that any parser returns it as it is.
#[derive(Debug)]
struct ReadFailure(TraceError);

impl std::fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.message.fmt(f)
    }
}

impl std::error::Error for ReadFailure {}

/// The [`TraceError`] for an error of reading at `location`: the reader's own where it has
/// one, else "cannot read".
pub(super) fn io_error(path: &str, location: Location, e: io::Error) -> TraceError {
    match e.get_ref().and_then(|x| x.downcast_ref::<ReadFailure>()) {
        Some(ReadFailure(t)) => t.clone(),
        None => TraceError::new(path, location, format!("cannot read: {e}")),
    }
}

/// The file's content (decompressed): counts the bytes read, and turns a failure to
/// decompress into a message that says where and why.
struct Source<'p, R> {
    path: &'p str,
    inner: R,
    gzip: bool,
    read: u64,
}

impl<'p, R: Read> Source<'p, R> {
    fn new(path: &'p str, inner: R, gzip: bool) -> Self {
        Source { path, inner, gzip, read: 0 }
    }
}

impl<R: Read> Read for Source<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.read += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let (loc, msg) = if self.gzip {
                    (
                        Location::Byte(self.read),
                        format!(
                            "broken gzip data ({e}) after {} decompressed bytes; is the file truncated?",
                            self.read
                        ),
                    )
                } else {
                    (Location::Byte(self.read), format!("cannot read: {e}"))
                };
                let t = TraceError::new(self.path, loc, msg);
                Err(io::Error::new(io::ErrorKind::InvalidData, ReadFailure(t)))
            }
        }
    }
}

/// A reader that refuses to read more than [`MAX_LINE`] bytes (plus a buffer's worth) past
/// the start of the current record: the parser moves its allowance on after each record
/// ([`Limited::allow`]). It bounds the memory of a line (or a quoted CSV field) that never
/// ends.
pub(super) struct Limited<'p, R> {
    path: &'p str,
    inner: R,
    read: u64,
    /// Lines before the parser's first (blank lines skipped while sniffing).
    pub lines_skipped: usize,
    /// The file line the current record starts on, and the offset it may not read past.
    allowance: Rc<Cell<(usize, u64)>>,
}

impl<'p, R: BufRead> Limited<'p, R> {
    fn new(path: &'p str, inner: R, lines_skipped: usize) -> Self {
        let allowance = Rc::new(Cell::new((lines_skipped + 1, 2 * MAX_LINE)));
        Limited { path, inner, read: 0, lines_skipped, allowance }
    }

    /// The handle with which the parser moves the allowance on.
    pub(super) fn allowance(&self) -> Rc<Cell<(usize, u64)>> {
        self.allowance.clone()
    }

    /// Lets the record that starts at byte `offset` (of what the parser read), on file line
    /// `line`, be read; a buffer's read-ahead is not the record's, hence twice the limit.
    pub(super) fn allow(allowance: &Cell<(usize, u64)>, line: usize, offset: u64) {
        allowance.set((line, offset + 2 * MAX_LINE));
    }
}

impl<R: BufRead> Read for Limited<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (line, until) = self.allowance.get();
        if self.read >= until {
            let t = TraceError::new(
                self.path,
                Location::Line(line),
                format!("a line longer than {} MiB: this is not a trace", MAX_LINE >> 20),
            );
            return Err(io::Error::new(io::ErrorKind::InvalidData, ReadFailure(t)));
        }
        let room = (until - self.read).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room])?;
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_needs_the_first_bytes_only() {
        assert_eq!(detect(b"  \n{\"a\""), Some(Format::JsonLines));
        assert_eq!(detect(b"\x80\x04"), Some(Format::SnapshotPickle));
        assert_eq!(detect(b"Thread,Time,Action,Pointer,Size,Stream\n"), Some(Format::RmmCsv));
        assert_eq!(detect(b"\x7fELF"), None);
    }
}
