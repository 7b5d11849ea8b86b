//! `gpumem.Allocator`: one allocator over the simulated device or a GPU, from Python.

use crate::convert::{snapshot_dict, stats_dict, DeviceSnapshot};
use crate::device::AnyDevice;
use crate::errors::to_py;
use crate::leaks::PyLeakReport;
use gpumem::{AllocError, CudaDevice, Policy, SimDevice, StreamId, H100_CAPACITY, MAX_SIM_CAPACITY};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

/// The allocator type every part of the module shares.
pub(crate) type Inner = gpumem::Allocator<AnyDevice>;

/// A caching allocator for one device.
///
/// `policy` is `"gpumem"` (the default), `"torch"` (PyTorch's algorithm) or
/// `"torch-expandable"`, optionally followed by options in PyTorch's syntax
/// (`"torch:max_split_size_mb:128"`). `device` is `"sim"` (a simulated GPU of `capacity`
/// bytes, 80 GiB by default, that holds no data) or `"cuda"` (GPU `index`).
///
/// >>> a = gpumem.Allocator(device="sim")
/// >>> p = a.malloc(1 << 20)
/// >>> a.memory_allocated()
/// 1048576
/// >>> a.free(p); a.empty_cache(); a.memory_reserved()
/// 0
#[pyclass(module = "gpumem", name = "Allocator", frozen)]
pub(crate) struct PyAllocator {
    pub(crate) inner: Arc<Inner>,
}

/// The simulated device's capacity: `capacity`, or an H100's (80 GiB) by default; at most
/// what the simulated device can hold.
pub(crate) fn sim_capacity(capacity: Option<u64>) -> PyResult<u64> {
    let cap = capacity.unwrap_or(H100_CAPACITY);
    if cap == 0 || cap > MAX_SIM_CAPACITY {
        return Err(PyValueError::new_err(format!(
            "capacity {cap} is out of range: the simulated device holds 1 byte to {MAX_SIM_CAPACITY} bytes"
        )));
    }
    Ok(cap)
}

pub(crate) fn make_device(device: &str, index: usize, capacity: Option<u64>) -> PyResult<AnyDevice> {
    match device {
        "sim" => Ok(AnyDevice::Sim(SimDevice::new(sim_capacity(capacity)?))),
        "cuda" => {
            if capacity.is_some() {
                return Err(PyValueError::new_err(
                    "capacity applies to device=\"sim\" only; a GPU has the memory it has (cap it with set_per_process_memory_fraction)",
                ));
            }
            Ok(AnyDevice::Cuda(CudaDevice::new(index).map_err(|e| to_py(AllocError::Device(e)))?))
        }
        other => Err(PyValueError::new_err(format!(
            "unknown device {other:?}: use \"sim\" (simulated, no GPU needed) or \"cuda\""
        ))),
    }
}

pub(crate) fn parse_policy(policy: &str) -> PyResult<Policy> {
    Policy::parse(policy).map_err(|e| PyValueError::new_err(e.to_string()))
}

#[pymethods]
impl PyAllocator {
    #[new]
    #[pyo3(signature = (policy = "gpumem", device = "sim", capacity = None, index = 0))]
    fn new(
        py: Python<'_>,
        policy: &str,
        device: &str,
        capacity: Option<u64>,
        index: usize,
    ) -> PyResult<Self> {
        let policy = parse_policy(policy)?;
        let dev = make_device(device, index, capacity)?;
        let inner = py.detach(|| Inner::with_policy(dev, &policy)).map_err(to_py)?;
        Ok(PyAllocator { inner: Arc::new(inner) })
    }

    /// The policy in force: `"gpumem"`, `"torch"` or `"torch-expandable"`.
    #[getter]
    fn policy(&self) -> &'static str {
        Policy::kind_name(self.inner.policy())
    }

    /// `"sim"` or `"cuda"`.
    #[getter]
    fn device(&self) -> &'static str {
        self.inner.with_device(|d| d.kind())
    }

    /// Allocates `size` bytes for use on `stream` (0: the default stream); returns the
    /// address. Raises `gpumem.OutOfMemoryError` when even an emptied cache cannot fit it.
    ///
    /// It keeps the GIL (unlike the slower calls here): a history recorded with stacks
    /// reads the caller's Python frames (Note \[Stacks and the GIL\] in `stacks.rs`).
    #[pyo3(signature = (size, stream = 0))]
    fn malloc(&self, size: u64, stream: u64) -> PyResult<u64> {
        self.inner.malloc(size, StreamId(stream)).map_err(to_py)
    }

    /// Frees the block at `ptr` (0 does nothing). A pointer this allocator did not hand
    /// out, or one freed already, raises `ValueError` and changes nothing.
    fn free(&self, ptr: u64) -> PyResult<()> {
        self.inner.free(ptr).map_err(to_py)
    }

    /// Records that the block at `ptr` is also used on `stream`: once freed, it waits for
    /// that stream's work so far before it is reused.
    fn record_stream(&self, py: Python<'_>, ptr: u64, stream: u64) -> PyResult<()> {
        py.detach(|| self.inner.record_stream(ptr, StreamId(stream))).map_err(to_py)
    }

    /// Gives every wholly free cached segment or page back to the device.
    fn empty_cache(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.empty_cache()).map_err(to_py)
    }

    /// Caps reserved memory at `fraction` (0 to 1) of the device's memory.
    fn set_per_process_memory_fraction(&self, py: Python<'_>, fraction: f64) -> PyResult<()> {
        py.detach(|| self.inner.set_per_process_memory_fraction(fraction)).map_err(to_py)
    }

    /// The cap on reserved memory as a fraction of the device (1.0 when none is set).
    fn per_process_memory_fraction(&self, py: Python<'_>) -> f64 {
        py.detach(|| self.inner.per_process_memory_fraction())
    }

    /// Bytes in blocks handed out.
    fn memory_allocated(&self, py: Python<'_>) -> u64 {
        py.detach(|| self.inner.memory_allocated())
    }

    /// The peak of `memory_allocated()` since the last reset.
    fn max_memory_allocated(&self, py: Python<'_>) -> u64 {
        py.detach(|| self.inner.max_memory_allocated())
    }

    /// Bytes held from the device.
    fn memory_reserved(&self, py: Python<'_>) -> u64 {
        py.detach(|| self.inner.memory_reserved())
    }

    /// The peak of `memory_reserved()` since the last reset.
    fn max_memory_reserved(&self, py: Python<'_>) -> u64 {
        py.detach(|| self.inner.max_memory_reserved())
    }

    /// Makes every peak equal its current value.
    fn reset_peak_memory_stats(&self, py: Python<'_>) {
        py.detach(|| self.inner.reset_peak_memory_stats())
    }

    /// Zeroes the accumulated totals and event counters.
    fn reset_accumulated_memory_stats(&self, py: Python<'_>) {
        py.detach(|| self.inner.reset_accumulated_memory_stats())
    }

    /// Every counter, under PyTorch's `memory_stats()` key names.
    fn memory_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = py.detach(|| self.inner.memory_stats());
        stats_dict(py, &stats)
    }

    /// PyTorch's `memory_summary()` table.
    #[pyo3(signature = (abbreviated = false))]
    fn memory_summary(&self, py: Python<'_>, abbreviated: bool) -> String {
        py.detach(|| self.inner.memory_summary(abbreviated))
    }

    /// The segments, blocks and recorded history, as `torch.cuda.memory._snapshot()`
    /// returns them (pickle it with protocol 4 for pytorch.org/memory_viz).
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let index = self.inner.with_device(gpumem::Device::index);
        let snap = py.detach(|| DeviceSnapshot::take(index, &self.inner));
        snapshot_dict(py, &[snap])
    }

    /// Starts (or, with `enabled` false, stops and clears) recording every event, keeping at
    /// most `max_entries`; with `stacks`, each allocation keeps the Python stack that made it.
    #[pyo3(signature = (enabled = true, max_entries = 100_000, stacks = true))]
    fn record_history(&self, enabled: bool, max_entries: usize, stacks: bool) {
        self.inner.record_history(enabled, max_entries);
        self.inner.set_stack_source(
            (enabled && stacks).then(|| Arc::new(crate::stacks::python_stack) as gpumem::StackSource),
        );
    }

    /// The blocks live now, grouped by the stack that allocated them (recorded while
    /// history is on; blocks allocated without it share one site with no frames).
    fn leaks(&self, py: Python<'_>) -> PyLeakReport {
        PyLeakReport { inner: py.detach(|| self.inner.leaks()) }
    }

    /// A mark in the order of allocations, for `leaks_since`.
    fn allocation_mark(&self) -> u64 {
        self.inner.allocation_mark()
    }

    /// The blocks allocated at or after `mark` (while history was on) that are live now.
    fn leaks_since(&self, py: Python<'_>, mark: u64) -> PyLeakReport {
        PyLeakReport { inner: py.detach(|| self.inner.leaks_since(mark)) }
    }

    /// Free and total device memory, as the driver reports it.
    fn mem_get_info(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        py.detach(|| self.inner.mem_get_info()).map_err(to_py)
    }

    /// Checks every counter against a recount of the segments, and the policy's own
    /// bookkeeping; raises `AssertionError` naming what disagrees.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.check_stats()).map_err(pyo3::exceptions::PyAssertionError::new_err)
    }

    fn __repr__(&self) -> String {
        format!(
            "gpumem.Allocator(policy={:?}, device={:?}, allocated={}, reserved={})",
            Policy::kind_name(self.inner.policy()),
            self.inner.with_device(|d| d.kind()),
            self.inner.memory_allocated(),
            self.inner.memory_reserved()
        )
    }
}
