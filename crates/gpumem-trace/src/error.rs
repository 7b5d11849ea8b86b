//! Errors of reading a trace: always one line that names the file and where in it.

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
    pub(crate) fn new(path: &str, location: Location, message: impl Into<String>) -> TraceError {
        let message: String = message.into();
        // one line, always
        let message = message.replace('\n', " ");
        TraceError { path: path.to_string(), location, message }
    }
}
