"""Record longer runs (more training steps) of the shared workloads, to check that a policy's
figures hold over a real training run and not only over a four-step trace. Runs on a GPU
machine with PyTorch, beside shared/bench/gen_traces.py (whose workloads and recorder it
reuses: same format, the same model and data, only more steps):

    python3 scripts/record_long.py WORKLOAD OUT.jsonl.gz STEPS [GEN_TRACES_DIR]

testdata/*_24steps.jsonl.gz were recorded this way on an H100 with PyTorch 2.11.
"""
import os, sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, sys.argv[4] if len(sys.argv) > 4 else os.path.join(HERE, "..", "..", "shared", "bench"))
sys.path.insert(0, "bench")  # in the GPU bundle
import gen_traces

steps = int(sys.argv[3])
shared_workload = gen_traces.workload


def longer(name):
    step, _ = shared_workload(name)
    return step, steps


gen_traces.workload = longer
gen_traces.run_one(sys.argv[1], sys.argv[2], True)
