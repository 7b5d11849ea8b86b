#!/usr/bin/env bash
# On a GPU machine, from the bundle that scripts/build-gpu-bundle.sh makes: the figures of
# issue 20 (docs/performance.md), gpumem's and PyTorch's C++ allocator's side by side.
#
# A shared GPU host's timings drift from minute to minute, so `gpumem bench` (both policies)
# and bench/torch_alloc_bench.py run ROUNDS times, interleaved, and the table gives the
# median and the range of each figure. Logs go under OUTDIR. Takes 2-3 minutes, the first
# round's compilation of PyTorch's C++ extension included.
# Usage: ./gpu-perf.sh [BUNDLE_DIR] [OUTDIR]     (ROUNDS=3 by default; BUNDLE_DIR: this
# script's folder)
set -uo pipefail
B=$(cd "${1:-$(dirname "$0")}" && pwd)
O=${2:-${OUT:-/tmp/gpumem-perf}}
ROUNDS=${ROUNDS:-3}
mkdir -p "$O"
cd "$B"
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$O/gpu.txt" 2>&1
nproc >> "$O/gpu.txt"
: > "$O/gpumem-bench.jsonl"
: > "$O/torch-bench.log"
for round in $(seq "$ROUNDS"); do
  echo "round $round at ${SECONDS}s" >&2
  # the first round also compiles the C++ extension (about a minute)
  timeout $((round == 1 ? 150 : 90)) python3 bench/torch_alloc_bench.py >> "$O/torch-bench.log" 2>> "$O/torch-bench.err"
  echo "end_of_round $round" >> "$O/torch-bench.log"
  timeout 90 ./gpumem bench --device cuda -p torch -p gpumem --threads 8 --quick --json \
    >> "$O/gpumem-bench.jsonl" 2>> "$O/gpumem-bench.err"
done
# --verify on every trace: the torch policy still makes PyTorch's decisions
timeout 60 ./gpumem replay traces/*.jsonl.gz -p torch --verify --json > "$O/verify.jsonl" 2> "$O/verify.err"
echo "verify exit $?" >> "$O/verify.err"
echo "total ${SECONDS}s (from ${start}s)" >&2
python3 - "$O" <<'PY' | tee "$O/table.txt"
import json, re, sys, statistics
from collections import defaultdict
o = sys.argv[1]
def span(v):
    return "-" if not v else "%.0f (%.0f-%.0f)" % (statistics.median(v), min(v), max(v))
def spanx(v):
    return "-" if not v else "%.2fx (%.2f-%.2f)" % (statistics.median(v), min(v), max(v))
# PyTorch: per round, pair_ns at 1 MiB and threads=8 / threads=1
pair, s8 = [], []
rounds = open(f"{o}/torch-bench.log").read().split("end_of_round")
for r in rounds:
    m = re.search(r"size=1048576 pair_ns=([\d.]+)", r)
    if m:
        pair.append(float(m.group(1)))
    t = dict((int(a), float(b)) for a, b in re.findall(r"threads=(\d+) pairs_per_s=([\d.]+)", r))
    if 1 in t and 8 in t:
        s8.append(t[8] / t[1])
rows = [("PyTorch's C++ allocator", pair, s8, [])]
ours = defaultdict(lambda: defaultdict(list))
for l in open(f"{o}/gpumem-bench.jsonl"):
    try:
        d = json.loads(l)
    except ValueError:
        continue
    ours[d["policy"]][d["bench"]].append(d["value"])
for p in ("torch", "gpumem"):
    b = ours[p]
    rows.append((f"gpumem, `{p}` policy", b["hit_pair_1MiB_busy"], b["scaling_8_streams"], b["scaling_8_one_stream"]))
print("median (min-max) of %d rounds" % max(len(pair), 1))
print("| | cache-hit pair (1 MiB, busy cache) ns | 8 threads / 1 thread, own streams | 8 threads / 1 thread, one stream |")
print("|---|---|---|---|")
for name, a, b, c in rows:
    print(f"| {name} | {span(a)} | {spanx(b)} | {spanx(c)} |")
for p in ("torch", "gpumem"):
    b = ours[p]
    print(p, "k pairs/s: 1 thread", span([x * 1000 for x in b["threads_1"]]),
          "; 8 threads", span([x * 1000 for x in b["threads_8"]]),
          "; 8 threads, one stream", span([x * 1000 for x in b["threads_8_one_stream"]]))
v = [json.loads(l) for l in open(f"{o}/verify.jsonl") if l.startswith("{")]
bad = [d["trace"] for d in v if d.get("segments_matched") != d.get("segments_expected") or d.get("allocs_matched") != d.get("allocs_expected")]
print("verify: %d traces, %s" % (len(v), "all exact" if not bad else "NOT exact: " + ", ".join(bad)))
PY
