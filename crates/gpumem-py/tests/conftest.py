"""Shared helpers for gpumem's Python tests.

The tests run on the simulated device anywhere; those that need PyTorch on a GPU
(test_torch_*.py) skip by name where there is no CUDA driver. The plugin's allocators are
per process and made once, so every test of the plugin runs its own Python process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# the repository's testdata/, or where GPUMEM_TESTDATA says (the GPU bundle's traces/)
TESTDATA = os.environ.get("GPUMEM_TESTDATA") or os.path.join(os.path.dirname(__file__), "..", "..", "..", "testdata")


def run_python(code: str, *, env: dict | None = None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter; fails the test with its output if it fails."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check and p.returncode != 0:
        pytest.fail(f"the child failed with {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p


def trace(name: str) -> str:
    path = os.path.abspath(os.path.join(TESTDATA, name))
    if not os.path.exists(path):
        pytest.skip(f"trace {name} is not in testdata/ (run from the repository)")
    return path
