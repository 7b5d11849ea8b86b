//! The Python call stack of an allocation, for `_record_memory_history(stacks="python")`.
//!
//! Note [Stacks and the GIL]
//! ---------------------------
//! PyTorch calls malloc from any thread, and its Python bindings release the GIL while an op
//! runs, so the thread that allocates for `torch.randn` does not hold the GIL. Like PyTorch's
//! own allocator when it records stacks, the stack source then takes the GIL to read the
//! frames. That is safe only because the allocator never waits for the GIL while it holds
//! its own lock: the stack is read before the lock is taken (Note on `gpumem::StackSource`),
//! and frees, which run from destructors on any thread, read no stack at all. Reading
//! frames allocates Python objects, which may run the garbage collector, which may free
//! tensors, which calls the allocator again: also fine, since no lock is held yet. All of
//! this happens only while history is recorded with stacks; otherwise malloc never touches
//! Python. A thread the interpreter is shutting down under gets no stack.

use gpumem::{Frame, Frames};
use pyo3::prelude::*;
use std::sync::Arc;

/// How many frames a stack keeps at most, innermost first.
const MAX_FRAMES: usize = 64;

/// The calling thread's Python stack, innermost frame first, taking the GIL if the thread
/// does not hold it (Note \[Stacks and the GIL\]); empty for a thread with no Python frames
/// or while the interpreter shuts down.
pub(crate) fn python_stack() -> Frames {
    Python::try_attach(|py| read_frames(py).ok()).flatten().unwrap_or_else(|| Arc::from(Vec::new()))
}

fn read_frames(py: Python<'_>) -> PyResult<Frames> {
    let mut frames = Vec::new();
    let mut f = py.import("sys")?.getattr("_getframe")?.call1((0,))?;
    while !f.is_none() && frames.len() < MAX_FRAMES {
        let code = f.getattr("f_code")?;
        frames.push(Frame {
            filename: code.getattr("co_filename")?.extract()?,
            line: f.getattr("f_lineno")?.extract::<Option<u32>>()?.unwrap_or(0),
            name: code.getattr("co_name")?.extract()?,
        });
        f = f.getattr("f_back")?;
    }
    Ok(Arc::from(frames))
}
