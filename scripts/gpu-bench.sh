#!/usr/bin/env bash
# On a GPU machine, from the bundle that scripts/build-gpu-bundle.sh makes: every figure of
# docs/policy.md, with PyTorch's own allocator measured in the same run.
#
# Driver call times on a shared GPU machine vary from run to run by up to 2-3x (the same
# binary, the same trace, one minute apart), so every replay, ours and PyTorch's, runs
# ROUNDS times, interleaved, and the tables give the median of each figure.
# Usage: scripts/gpu-bench.sh [BUNDLE_DIR] [OUTDIR]     (ROUNDS=3 by default)
set -uo pipefail
B=$(cd "${1:-.gpu}" && pwd)
O=${2:-${OUT:-/tmp/gpumem-bench}}
ROUNDS=${ROUNDS:-3}
POLICIES=${POLICIES:--p torch -p gpumem -p gpumem:periodic_plan:False -p gpumem:compaction:False}
mkdir -p "$O"
cd "$B"
# traces of other workloads, recorded here first; those not in the bundle join the rounds
TRACES=(traces/*.jsonl.gz)
if [ "${RECORD:-1}" = 1 ]; then
  mkdir -p new_traces
  python3 record_traces.py new_traces bench > "$O/record.log" 2>&1
  ls new_traces/*.jsonl.gz >/dev/null 2>&1 && ./gpumem replay new_traces/*.jsonl.gz --json > "$O/replay-new.jsonl"
  tar czf "$O/new_traces.tgz" new_traces 2>/dev/null
  for t in new_traces/*.jsonl.gz; do
    [ -e "$t" ] && [ ! -e "traces/$(basename "$t")" ] && TRACES+=("$t")
  done
fi
: > "$O/replay-cuda.jsonl"
: > "$O/torch.jsonl"
for round in $(seq "$ROUNDS"); do
  for conf in "" expandable_segments:True; do
    PYTORCH_CUDA_ALLOC_CONF=$conf python3 bench/torch_replay.py "${TRACES[@]}" 2>/dev/null
  done >> "$O/torch.jsonl"
  # shellcheck disable=SC2086
  ./gpumem replay "${TRACES[@]}" --device cuda $POLICIES --json \
    >> "$O/replay-cuda.jsonl"
done
./gpumem replay "${TRACES[@]}" --device sim --json > "$O/replay-sim.jsonl"
./gpumem bench --device cuda --json > "$O/bench.jsonl" 2>&1
python3 - "$O" <<'PY'
import json, sys, statistics
from collections import defaultdict
o = sys.argv[1]
med = statistics.median
torch = defaultdict(list)
for l in open(f"{o}/torch.jsonl"):
    d = json.loads(l); torch[(d["trace"], d["conf"])].append(d)
ours = defaultdict(list)
for l in open(f"{o}/replay-cuda.jsonl"):
    d = json.loads(l); ours[(d["trace"], d["policy"])].append(d)
print("median of %d rounds; x = gpumem / PyTorch default, in the same rounds" % len(next(iter(torch.values()))))
print("%-24s %-22s %7s %8s %8s %8s %6s %7s %7s %6s %6s" % ("trace", "policy", "ratio", "seconds", "driver", "torch s", "x", "steady", "torch", "x", "calls"))
for (trace, policy), runs in ours.items():
    t = torch.get((trace, ""), [])
    if not t:
        continue
    s, ts = med(r["seconds"] for r in runs), med(r["seconds"] for r in t)
    st, tst = med(r["steady_ns_per_op"] for r in runs), med(r["steady_ns_per_op"] for r in t)
    drv = med(r.get("device_seconds", 0.0) for r in runs)
    print("%-24s %-22s %7.4f %8.4f %8.4f %8.4f %6.2f %7.0f %7.0f %6.2f %6d" % (trace[:24], policy, runs[0]["reserved_ratio"], s, drv, ts, s / ts,
          st, tst, st / tst, runs[0]["device_maps"] + runs[0]["device_unmaps"]))
for (trace, conf), t in torch.items():
    if conf:
        print("%-24s %-22s %7.4f %8.4f %8s %6s %7.0f" % (trace[:24], "PyTorch " + conf, t[0]["ratio"], med(r["seconds"] for r in t), "", "",
              med(r["steady_ns_per_op"] for r in t)))
try:
    for l in open(f"{o}/replay-new.jsonl"):
        d = json.loads(l)
        print("new: %-28s %-17s ratio %.4f calls %d" % (d["trace"], d["policy"], d["reserved_ratio"], d["device_maps"] + d["device_unmaps"]))
except FileNotFoundError:
    pass
PY
