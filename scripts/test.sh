#!/usr/bin/env bash
# The tests, all of them: Rust (unit, integration, property, and the GPU tests, which skip by
# name without a driver), then the Python package installed in a fresh virtual environment
# and its pytest suite (on the simulated device; the PyTorch-on-GPU tests skip by name where
# there is no driver or no torch).
# Needs: a Rust toolchain, and Python >= 3.10 with pip (pip fetches maturin and pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
venv=target/py-venv
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet pytest
"$venv/bin/pip" install --quiet ./crates/gpumem-py
(cd crates/gpumem-py/tests && "../../../$venv/bin/python" -m pytest -q -rs -p no:cacheprovider)
