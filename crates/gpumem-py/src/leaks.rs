//! `gpumem.LeakReport`: what is still live, by the line that allocated it.

use gpumem::{show_frame, LeakReport};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// The blocks still live, grouped by allocation site (the stack recorded when history is
/// on), largest first. `str()` gives the table `gpumem leaks` prints.
#[pyclass(module = "gpumem", name = "LeakReport", frozen)]
pub(crate) struct PyLeakReport {
    pub(crate) inner: LeakReport,
}

#[pymethods]
impl PyLeakReport {
    /// Live blocks in all.
    #[getter]
    fn count(&self) -> u64 {
        self.inner.count
    }

    /// Their requested bytes.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.bytes
    }

    /// The sites, most bytes first: dicts with `location` (the innermost frame, as
    /// "file:line in function"), `frames`, `count`, `bytes` and `blocks` (address, size,
    /// stream of each).
    #[getter]
    fn sites<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for site in &self.inner.sites {
            let d = PyDict::new(py);
            d.set_item("location", site.location())?;
            let frames = PyList::empty(py);
            for f in site.frames.iter() {
                let fd = PyDict::new(py);
                fd.set_item("filename", &f.filename)?;
                fd.set_item("line", f.line)?;
                fd.set_item("name", &f.name)?;
                fd.set_item("text", show_frame(f))?;
                frames.append(fd)?;
            }
            d.set_item("frames", frames)?;
            d.set_item("count", site.count)?;
            d.set_item("bytes", site.bytes)?;
            let blocks = PyList::empty(py);
            for b in &site.blocks {
                let bd = PyDict::new(py);
                bd.set_item("address", b.address)?;
                bd.set_item("size", b.size)?;
                bd.set_item("stream", b.stream.0)?;
                blocks.append(bd)?;
            }
            d.set_item("blocks", blocks)?;
            out.append(d)?;
        }
        Ok(out)
    }

    fn __len__(&self) -> usize {
        self.inner.count as usize
    }

    fn __str__(&self) -> String {
        self.inner.to_string()
    }

    fn __repr__(&self) -> String {
        format!(
            "<gpumem.LeakReport: {} live block(s), {} bytes, {} site(s)>",
            self.inner.count,
            self.inner.bytes,
            self.inner.sites.len()
        )
    }
}
