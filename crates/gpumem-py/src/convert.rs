//! The allocator's figures as Python objects, in the shapes PyTorch's own functions return:
//! `memory_stats()` keys, and the snapshot dict of `torch.cuda.memory._snapshot()` that
//! `torch.cuda._memory_viz` and pytorch.org/memory_viz read.

use crate::device::AnyDevice;
use gpumem::{Action, Allocator, Frame, MemoryStats, SegmentInfo, TraceEntry};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

/// `memory_stats()` as a flat dict under PyTorch's key names.
pub(crate) fn stats_dict<'py>(py: Python<'py>, stats: &MemoryStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in stats {
        d.set_item(k, v)?;
    }
    Ok(d)
}

fn frames_list<'py>(py: Python<'py>, frames: &[Frame]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for f in frames {
        let d = PyDict::new(py);
        d.set_item("filename", &f.filename)?;
        d.set_item("line", f.line)?;
        d.set_item("name", &f.name)?;
        list.append(d)?;
    }
    Ok(list)
}

fn segment_dict<'py>(py: Python<'py>, device: usize, s: &SegmentInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("device", device)?;
    d.set_item("address", s.address)?;
    d.set_item("total_size", s.total_size)?;
    d.set_item("allocated_size", s.allocated_size)?;
    d.set_item("active_size", s.active_size)?;
    d.set_item("requested_size", s.requested_size)?;
    d.set_item("stream", s.stream.0)?;
    d.set_item("segment_type", s.pool.name())?;
    d.set_item("segment_pool_id", PyTuple::new(py, [0u64, 0u64])?)?;
    d.set_item("is_expandable", s.is_expandable)?;
    d.set_item("frames", PyList::empty(py))?;
    let blocks = PyList::empty(py);
    for b in &s.blocks {
        let bd = PyDict::new(py);
        bd.set_item("address", b.address)?;
        bd.set_item("size", b.size)?;
        bd.set_item("requested_size", b.requested_size)?;
        bd.set_item("state", b.state.name())?;
        bd.set_item("frames", frames_list(py, &b.frames)?)?;
        blocks.append(bd)?;
    }
    d.set_item("blocks", blocks)?;
    Ok(d)
}

fn entry_dict<'py>(py: Python<'py>, e: &TraceEntry) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("action", e.action.name())?;
    if e.action == Action::Oom {
        d.set_item("device_free", e.addr)?;
        d.set_item("addr", 0)?;
    } else {
        d.set_item("addr", e.addr)?;
    }
    d.set_item("size", e.size)?;
    d.set_item("stream", e.stream.0)?;
    d.set_item("time_us", e.time_us)?;
    d.set_item("frames", frames_list(py, &e.frames)?)?;
    d.set_item("compile_context", "N/A")?;
    d.set_item("user_metadata", &e.tag)?;
    Ok(d)
}

/// One device's part of a snapshot: its segments and its history.
pub(crate) struct DeviceSnapshot {
    pub(crate) index: usize,
    pub(crate) segments: Vec<SegmentInfo>,
    pub(crate) history: Vec<TraceEntry>,
}

impl DeviceSnapshot {
    /// Takes the allocator's segments and history (with its lock, without the GIL's help).
    pub(crate) fn take(index: usize, a: &Allocator<AnyDevice>) -> DeviceSnapshot {
        DeviceSnapshot { index, segments: a.snapshot(), history: a.history() }
    }
}

/// PyTorch's snapshot dict: `segments` of every device, and `device_traces` with one list per
/// device index up to the highest (PyTorch's viewers index it by the segments' devices).
pub(crate) fn snapshot_dict<'py>(
    py: Python<'py>,
    devices: &[DeviceSnapshot],
) -> PyResult<Bound<'py, PyDict>> {
    let segments = PyList::empty(py);
    let count = devices.iter().map(|d| d.index + 1).max().unwrap_or(1);
    let traces: Vec<Bound<'py, PyList>> = (0..count).map(|_| PyList::empty(py)).collect();
    for d in devices {
        for s in &d.segments {
            segments.append(segment_dict(py, d.index, s)?)?;
        }
        for e in &d.history {
            traces[d.index].append(entry_dict(py, e)?)?;
        }
    }
    let out = PyDict::new(py);
    out.set_item("segments", segments)?;
    out.set_item("device_traces", PyList::new(py, traces)?)?;
    out.set_item("allocator_settings", PyDict::new(py))?;
    out.set_item("external_annotations", PyList::empty(py))?;
    Ok(out)
}
