//! gpumem's errors as Python exceptions.

use gpumem::AllocError;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::{create_exception, PyErr};

create_exception!(
    gpumem,
    GpumemError,
    PyRuntimeError,
    "An allocator call failed: a device error, or an allocator unusable after an internal error."
);
create_exception!(
    gpumem,
    OutOfMemoryError,
    GpumemError,
    "The device cannot fit the request even after the cache was emptied. The message says what was asked, what is free, allocated, and reserved but unallocated, and what to try."
);

/// The Python exception for an allocator error: `ValueError` for bad arguments (a foreign
/// pointer, a double free, a bad fraction or option), `OutOfMemoryError`, else `GpumemError`.
pub(crate) fn to_py(e: AllocError) -> PyErr {
    match e {
        AllocError::OutOfMemory(_) => OutOfMemoryError::new_err(e.to_string()),
        AllocError::InvalidPointer(_)
        | AllocError::TooLarge(_)
        | AllocError::InvalidFraction(_)
        | AllocError::InvalidArgument(_)
        | AllocError::Config(_) => PyValueError::new_err(e.to_string()),
        AllocError::Poisoned | AllocError::Device(_) => GpumemError::new_err(e.to_string()),
    }
}
