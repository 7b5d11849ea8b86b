#!/usr/bin/env bash
# On the GPU machine, inside the bundle of scripts/build-gpu-bundle.sh: installs the gpumem
# wheel into the Python that has torch (gpu-install.sh), then runs the Python tests, the GPU
# ones included. Usage: bash gpu-py.sh [BUNDLE_DIR] [PYTEST ARGS...]
# (the pytest log goes under $OUT when set)
set -uo pipefail
B=$(cd "${1:-.}" && pwd)
shift || true
OUT=${OUT:-/tmp}
PY=$(bash "$B/gpu-install.sh" "$B") || exit 1
"$PY" -c "import gpumem, torch; print('gpumem', gpumem.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
export GPUMEM_TESTDATA="$B/traces"
cd "$B/py-tests" && "$PY" -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest.log"
exit "${PIPESTATUS[0]}"
