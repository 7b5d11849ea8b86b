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
# With another process holding GPU memory, info lists it (pid, name, bytes).
if python3 -c "import torch" 2>/dev/null; then
  python3 -c "import torch, time; x = torch.empty(1 << 30, dtype=torch.uint8, device='cuda'); print('holder ready', flush=True); time.sleep(30)" > /tmp/gpumem-holder.log 2>&1 &
  holder=$!
  for _ in $(seq 60); do grep -q ready /tmp/gpumem-holder.log 2>/dev/null && break; sleep 0.5; done
  echo "== gpumem info, with a PyTorch process (pid $holder) holding 1 GiB"
  "$B/gpumem" info | tee /tmp/gpumem-info.txt || status=1
  grep -q "pid *$holder" /tmp/gpumem-info.txt || { echo "info did not list pid $holder"; status=1; }
  "$B/gpumem" info --json > /dev/null || status=1
  kill $holder 2>/dev/null; wait $holder 2>/dev/null
fi
echo "== gpu-test.sh: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
