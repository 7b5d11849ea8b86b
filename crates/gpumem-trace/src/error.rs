//! Errors of reading a trace: always one line that names the file and where in it.

use gpumem::escape_for_message as escape;
use std::fmt;

/// Where in a file a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// The whole file.
    File,
    /// A 1-based line (text formats).
    Line(usize),
    /// A byte offset (binary formats).
    Byte(u64),
    /// An entry of a snapshot's trace list (0-based).
    Entry(usize),
}

/// A file that cannot be read as a trace.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct TraceError {
    /// The file.
    pub path: String,
    /// Where.
    pub location: Location,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File => write!(f, "file"),
            Location::Line(n) => write!(f, "line {n}"),
            Location::Byte(n) => write!(f, "byte {n}"),
            Location::Entry(n) => write!(f, "trace entry {n}"),
        }
    }
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Location::File => write!(f, "{}: {}", self.path, self.message),
            at => write!(f, "{}: {at}: {}", self.path, self.message),
        }
    }
}

impl TraceError {
    /// An error at `location` of `path`. The message may quote the input (through the
    /// parsers' own messages too), so it is made safe here: control characters escaped, so
    /// that it stays one line and cannot drive the terminal, and cut to a few hundred
    /// characters, so that a 100 KB line does not come back whole.
    pub(crate) fn new(path: &str, location: Location, message: impl Into<String>) -> TraceError {
        let message: String = message.into();
        TraceError { path: escape(path, MAX_PATH), location, message: escape(&message, MAX_MESSAGE) }
    }
}

/// The longest message an error keeps, in characters.
const MAX_MESSAGE: usize = 400;
/// The longest path an error keeps.
const MAX_PATH: usize = 400;
/// The longest piece of input a message quotes.
const MAX_QUOTE: usize = 80;

/// A piece of input, for a message: in double quotes, its control characters and quotes
/// escaped, and cut after 80 characters. Every reader quotes what it read through this, so
/// that a hostile file cannot put a newline, an escape sequence or a whole line of its own
/// into an error.
///
/// ```
/// assert_eq!(gpumem_trace::quote("teleport"), "\"teleport\"");
/// assert_eq!(gpumem_trace::quote("a\u{1b}[2J\n"), "\"a\\u{1b}[2J\\n\"");
/// assert!(gpumem_trace::quote(&"x".repeat(100_000)).len() < 100);
/// ```
pub fn quote(s: &str) -> String {
    format!("\"{}\"", escape(&s.replace('"', "\\\""), MAX_QUOTE))
}
