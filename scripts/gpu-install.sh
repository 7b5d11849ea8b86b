#!/usr/bin/env bash
# On the GPU machine: installs the bundle's gpumem wheel (and pytest, if missing) into the
# Python that has torch, from the bundle alone (no network there), and prints that Python's
# path, for the caller to run with: PY=$(bash gpu-install.sh BUNDLE_DIR)
set -euo pipefail
B=$(cd "${1:-.}" && pwd)
PY=$(command -v python3)
for p in python3 python /opt/torch/.venv/bin/python; do
  if command -v "$p" >/dev/null && "$p" -c "import torch" 2>/dev/null; then PY=$(command -v "$p"); break; fi
done
install() {
  "$PY" -m pip install --quiet --no-index --find-links "$B/wheels" "$@" >&2 2>/dev/null ||
    pip --python "$PY" install --quiet --no-index --find-links "$B/wheels" "$@" >&2
}
install --force-reinstall --no-deps gpumem
"$PY" -c "import pytest" 2>/dev/null || install pytest
echo "$PY"
