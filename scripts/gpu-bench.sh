#!/usr/bin/env bash
# On a GPU machine, from the bundle that scripts/build-gpu-bundle.sh makes: every figure of
# docs/policy.md, with PyTorch's own allocator measured in the same run.
# Usage: scripts/gpu-bench.sh [BUNDLE_DIR] [OUTDIR]
set -uo pipefail
B=$(cd "${1:-.gpu}" && pwd)
O=${2:-${OUT:-/tmp/gpumem-bench}}
mkdir -p "$O"
cd "$B"
./gpumem replay traces/*.jsonl.gz --device cuda -p torch -p torch-expandable -p gpumem --json > "$O/replay-cuda.jsonl"
./gpumem replay traces/*.jsonl.gz --device sim --json > "$O/replay-sim.jsonl"
for conf in "" expandable_segments:True; do
  PYTORCH_CUDA_ALLOC_CONF=$conf python3 bench/torch_replay.py traces/*.jsonl.gz 2>/dev/null
done > "$O/torch.jsonl"
./gpumem bench --device cuda --json > "$O/bench.jsonl" 2>&1
# traces of other workloads, recorded here, replayed on the simulated device
mkdir -p new_traces
python3 record_traces.py new_traces bench > "$O/record.log" 2>&1
ls new_traces/*.jsonl.gz >/dev/null 2>&1 && ./gpumem replay new_traces/*.jsonl.gz --json > "$O/replay-new.jsonl"
tar czf "$O/new_traces.tgz" new_traces 2>/dev/null
python3 - "$O" <<'PY'
import json, sys
o = sys.argv[1]
torch = {}
for l in open(f"{o}/torch.jsonl"):
    d = json.loads(l); torch[(d["trace"], d["conf"])] = d
print("%-28s %-17s %8s %9s %9s %9s %9s %7s" % ("trace", "policy", "ratio", "seconds", "torch s", "steady", "torch st", "calls"))
for l in open(f"{o}/replay-cuda.jsonl"):
    d = json.loads(l); t = torch.get((d["trace"], ""), {})
    print("%-28s %-17s %8.4f %9.4f %9.4f %9.0f %9.0f %7d" % (d["trace"], d["policy"], d["reserved_ratio"], d["seconds"],
          t.get("seconds", 0), d["steady_ns_per_op"], t.get("steady_ns_per_op", 0), d["device_allocs"] + d["device_frees"]))
try:
    for l in open(f"{o}/replay-new.jsonl"):
        d = json.loads(l)
        print("new: %-28s %-17s ratio %.4f calls %d" % (d["trace"], d["policy"], d["reserved_ratio"], d["device_allocs"] + d["device_frees"]))
except FileNotFoundError:
    pass
PY
