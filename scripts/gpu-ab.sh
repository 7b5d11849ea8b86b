#!/usr/bin/env bash
# On a GPU machine, from the bundle of scripts/build-gpu-bundle.sh: an earlier build of the
# gpumem binary (put it in the bundle as gpumem-old, say from `git worktree add`) against this
# one, and PyTorch's default allocator, on every trace, in three interleaved rounds (the
# driver's call times drift by up to 2-3x from one minute to the next, so only figures from
# the same rounds compare). Prints the medians.
# Usage: scripts/gpu-ab.sh [OUTDIR]   (run in the bundle directory)
set -uo pipefail
O=${1:-${OUT:-/tmp/gpumem-ab}}
mkdir -p "$O"
T=(traces/*.jsonl.gz)
for r in 1 2 3; do
  python3 bench/torch_replay.py "${T[@]}" 2>/dev/null >> "$O/torch.jsonl"
  ./gpumem-old replay "${T[@]}" --device cuda -p gpumem --json | sed 's/"policy":"gpumem"/"policy":"old"/' >> "$O/ab.jsonl"
  ./gpumem replay "${T[@]}" --device cuda -p gpumem --json | sed 's/"policy":"gpumem"/"policy":"new"/' >> "$O/ab.jsonl"
done
python3 - "$O" <<'PY'
import json, sys, statistics
from collections import defaultdict
o = sys.argv[1]; med = statistics.median
t = defaultdict(list); a = defaultdict(list)
for l in open(f"{o}/torch.jsonl"):
    d = json.loads(l); t[d["trace"]].append(d)
for l in open(f"{o}/ab.jsonl"):
    d = json.loads(l); a[(d["trace"], d["policy"])].append(d)
print("%-26s %8s %8s %8s %6s %6s | %6s %6s %6s %6s %7s %7s" % ("trace", "torch s", "old s", "new s", "old x", "new x", "tst", "old", "new", "oldx", "newx", "ratio"))
for tr in sorted(t):
    ts = med(r["seconds"] for r in t[tr]); tst = med(r["steady_ns_per_op"] for r in t[tr])
    o_, n_ = a[(tr, "old")], a[(tr, "new")]
    os_, ns_ = med(r["seconds"] for r in o_), med(r["seconds"] for r in n_)
    ost, nst = med(r["steady_ns_per_op"] for r in o_), med(r["steady_ns_per_op"] for r in n_)
    print("%-26s %8.4f %8.4f %8.4f %6.2f %6.2f | %6.0f %6.0f %6.0f %6.2f %6.2f %.4f/%.4f" % (tr[:26], ts, os_, ns_, os_/ts, ns_/ts, tst, ost, nst, ost/tst, nst/tst, o_[0]["reserved_ratio"], n_[0]["reserved_ratio"]))
PY
