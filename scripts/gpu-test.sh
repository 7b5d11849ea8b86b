#!/usr/bin/env bash
# Runs the GPU tests, the demo and `gpumem info` on a GPU machine, from prebuilt binaries (no
# cargo needed): first run scripts/build-gpu-bundle.sh where cargo is, then carry .gpu/ over.
# Usage: scripts/gpu-test.sh [BUNDLE_DIR]   (default: .gpu)
set -uo pipefail
B=${1:-.gpu}
status=0
echo "== GPU tests"
"$B/gpu-tests" || status=1
echo "== gpumem demo --device cuda"
"$B/gpumem" demo --device cuda || status=1
echo "== gpumem info"
"$B/gpumem" info || status=1
echo "== gpu-test.sh: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
