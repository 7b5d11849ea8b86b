//! `gpumem.replay`: a recorded trace through any policy, without a GPU.

use crate::allocator::{parse_policy, sim_capacity};
use gpumem::{Policy, SimDevice};
use gpumem_trace::{read_trace, replay, ReplayOptions};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Replays each trace through each policy on the simulated device and returns, for each
/// (trace, policy), the JSON object `gpumem replay --json` prints, as a string.
#[pyfunction]
#[pyo3(signature = (paths, policies = None, capacity = None, verify = false))]
pub(crate) fn _replay(
    py: Python<'_>,
    paths: Vec<String>,
    policies: Option<Vec<String>>,
    capacity: Option<u64>,
    verify: bool,
) -> PyResult<Vec<String>> {
    let names: Vec<String> =
        policies.unwrap_or_else(|| Policy::NAMES.iter().map(|s| s.to_string()).collect());
    let policies = names.iter().map(|n| parse_policy(n)).collect::<PyResult<Vec<_>>>()?;
    let cap = sim_capacity(capacity)?;
    let opts = ReplayOptions { verify, ..Default::default() };
    py.detach(|| {
        let mut out = Vec::new();
        for path in &paths {
            let trace = read_trace(path).map_err(|e| PyValueError::new_err(e.to_string()))?;
            for policy in &policies {
                let report = replay(&trace, policy, SimDevice::new(cap), &opts, &mut |_, _| {})
                    .map_err(|e| PyRuntimeError::new_err(format!("{path} / {policy}: {e}")))?;
                out.push(serde_json::to_string(&report).map_err(|e| PyRuntimeError::new_err(e.to_string()))?);
            }
        }
        Ok(out)
    })
}
