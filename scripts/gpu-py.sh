#!/usr/bin/env bash
# On the GPU machine, inside the bundle of scripts/build-gpu-bundle.sh: installs the gpumem
# wheel (and pytest, if missing) from the bundle, which needs no network, into the Python that
# has torch, then runs the Python tests, the GPU ones included.
# Usage: bash gpu-py.sh [BUNDLE_DIR]   (the pytest log goes under $OUT when set)
set -uo pipefail
B=$(cd "${1:-.}" && pwd)
OUT=${OUT:-/tmp}
PY=$(command -v python3)
for p in python3 python /opt/torch/.venv/bin/python; do
  if command -v "$p" >/dev/null && "$p" -c "import torch" 2>/dev/null; then PY=$(command -v "$p"); break; fi
done
install() {
  "$PY" -m pip install --quiet --no-index --find-links "$B/wheels" "$@" 2>/dev/null ||
    pip --python "$PY" install --quiet --no-index --find-links "$B/wheels" "$@"
}
install --force-reinstall --no-deps gpumem
"$PY" -c "import pytest" 2>/dev/null || install pytest
"$PY" -c "import gpumem, torch; print('gpumem', gpumem.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
export GPUMEM_TESTDATA="$B/traces"
cd "$B/py-tests" && "$PY" -m pytest -q -rs -p no:cacheprovider "${PYTEST_ARGS[@]:-.}" 2>&1 | tee "$OUT/pytest.log"
exit "${PIPESTATUS[0]}"
