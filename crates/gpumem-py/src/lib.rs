//! gpumem for Python: the module `gpumem._gpumem`, and the C functions PyTorch's pluggable
//! allocator calls, in one library (Note \[One library, two roles\] in `plugin/mod.rs`).
//!
//! The Python package (`python/gpumem/`) wraps this module: `gpumem.Allocator` and
//! `gpumem.replay` work anywhere; `gpumem.torch.enable()` installs the plugin in PyTorch.
#![warn(missing_docs)]

mod allocator;
mod convert;
mod device;
mod errors;
mod leaks;
mod plugin;
mod replay;
mod stacks;

use allocator::PyAllocator;
use convert::{snapshot_dict, stats_dict, DeviceSnapshot};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

/// Sets the policy (with options, in PyTorch's syntax) and device kind of the plugin's
/// allocators, before the first allocation.
#[pyfunction]
#[pyo3(signature = (policy, device = "cuda", capacity = None))]
fn _plugin_configure(policy: &str, device: &str, capacity: Option<u64>) -> PyResult<()> {
    plugin::configure(policy, device, capacity).map_err(PyRuntimeError::new_err)
}

/// The plugin's allocator of `device`, or None if the device has not allocated yet.
#[pyfunction]
fn _plugin_allocator(device: usize) -> Option<PyAllocator> {
    plugin::existing().find(|(i, _)| *i == device).map(|(_, s)| PyAllocator { inner: Arc::clone(&s.alloc) })
}

/// The plugin's allocator of `device`, made now if needed (it opens the GPU).
#[pyfunction]
fn _plugin_allocator_for(py: Python<'_>, device: usize) -> PyResult<PyAllocator> {
    let a = py.detach(|| plugin::allocator(device)).map_err(errors::to_py)?;
    Ok(PyAllocator { inner: Arc::clone(&a.alloc) })
}

/// The device indices that have an allocator.
#[pyfunction]
fn _plugin_devices() -> Vec<usize> {
    plugin::existing().map(|(i, _)| i).collect()
}

/// The plugin's device kind: "cuda", or "sim" in tests.
#[pyfunction]
fn _plugin_device_kind() -> String {
    plugin::device_kind()
}

/// Starts recording history on every device (`max_entries`, with Python stacks if
/// `stacks`), or stops and clears it with `enabled` false.
#[pyfunction]
#[pyo3(signature = (enabled, max_entries = 1_000_000, stacks = true))]
fn _plugin_record_history(enabled: bool, max_entries: usize, stacks: bool) -> PyResult<()> {
    if enabled && max_entries == 0 {
        return Err(PyValueError::new_err("max_entries must be at least 1"));
    }
    plugin::record_history(enabled.then_some((max_entries, stacks)));
    Ok(())
}

/// Whether history is being recorded on the plugin's allocators, and with stacks.
#[pyfunction]
fn _plugin_history() -> Option<(usize, bool)> {
    plugin::history()
}

/// PyTorch's snapshot dict over every device of the plugin.
#[pyfunction]
fn _plugin_snapshot(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let snaps =
        py.detach(|| plugin::existing().map(|(i, s)| DeviceSnapshot::take(i, &s.alloc)).collect::<Vec<_>>());
    snapshot_dict(py, &snaps)
}

/// `memory_stats()` of a device that has not allocated: every key, at zero.
#[pyfunction]
fn _empty_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    stats_dict(py, &gpumem::DeviceStats::default().to_map())
}

/// PyTorch's `memory_summary()` table for counters that are all zero.
#[pyfunction]
#[pyo3(signature = (device = 0, abbreviated = false))]
fn _empty_summary(device: usize, abbreviated: bool) -> String {
    gpumem::format_memory_summary(&gpumem::DeviceStats::default(), device, abbreviated)
}

/// Whether this process is a child forked from one that used the plugin.
#[pyfunction]
fn _forked() -> bool {
    plugin::forked()
}

/// Whether a CUDA driver can be loaded here.
#[pyfunction]
fn driver_present() -> bool {
    gpumem::driver_present()
}

#[pymodule]
fn _gpumem(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyAllocator>()?;
    m.add_class::<leaks::PyLeakReport>()?;
    m.add("GpumemError", py.get_type::<errors::GpumemError>())?;
    m.add("OutOfMemoryError", py.get_type::<errors::OutOfMemoryError>())?;
    m.add("POLICIES", gpumem::Policy::NAMES.to_vec())?;
    m.add_function(wrap_pyfunction!(replay::_replay, m)?)?;
    m.add_function(wrap_pyfunction!(driver_present, m)?)?;
    m.add_function(wrap_pyfunction!(_plugin_configure, m)?)?;
    m.add_function(wrap_pyfunction!(_plugin_allocator, m)?)?;
    m.add_function(wrap_pyfunction!(_plugin_allocator_for, m)?)?;
    m.add_function(wrap_pyfunction!(_plugin_devices, m)?)?;
    m.add_function(wrap_pyfunction!(_plugin_device_kind, m)?)?;
    m.add_function(wrap_pyfunction!(_plugin_record_history, m)?)?;
    m.add_function(wrap_pyfunction!(_plugin_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(_plugin_history, m)?)?;
    m.add_function(wrap_pyfunction!(_empty_stats, m)?)?;
    m.add_function(wrap_pyfunction!(_empty_summary, m)?)?;
    m.add_function(wrap_pyfunction!(_forked, m)?)?;
    Ok(())
}
