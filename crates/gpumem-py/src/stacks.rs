//! The Python call stack of an allocation, for `_record_memory_history(stacks="python")`.
//!
//! Note [Stacks without taking the GIL]
//! ------------------------------------
//! PyTorch calls the allocator from any thread, often with the GIL held (an op called from
//! Python) but also without it (autograd's backward threads, NCCL's watchdog). Taking the
//! GIL inside malloc could deadlock against a thread that holds it and waits for the
//! allocator, so the stack is read only when this thread already holds the GIL
//! (`PyGILState_Check`), and is empty otherwise, as PyTorch records no Python frames for
//! allocations made outside Python either. It is read before the allocator's lock is taken
//! (Note on `gpumem::StackSource`): reading frames allocates Python objects, which may run the
//! garbage collector, which may free tensors, which calls the allocator again.

use gpumem::{Frame, Frames};
use pyo3::prelude::*;
use std::sync::Arc;

extern "C" {
    // Not in pyo3's stable-ABI bindings, but exported by every CPython since 3.4; the one
    // call that tells, without the GIL, whether this thread holds it.
    fn PyGILState_Check() -> std::ffi::c_int;
}

/// How many frames a stack keeps at most, innermost first.
const MAX_FRAMES: usize = 64;

/// The calling thread's Python stack, innermost frame first; empty if the thread does not
/// hold the GIL or the frames cannot be read.
pub(crate) fn python_stack() -> Frames {
    // SAFETY: PyGILState_Check only reads the thread state, and may be called without the GIL.
    if unsafe { PyGILState_Check() } != 1 {
        return Arc::from(Vec::new());
    }
    // SAFETY: this thread holds the GIL (checked above).
    let py = unsafe { Python::assume_attached() };
    read_frames(py).unwrap_or_else(|_| Arc::from(Vec::new()))
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
