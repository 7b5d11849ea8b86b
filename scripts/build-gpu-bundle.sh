#!/usr/bin/env bash
# Builds everything a GPU machine needs into .gpu/ (git-ignored): the gpumem binary, the GPU
# test executable, the traces, and PyTorch's bench scripts. The GPU machine then needs no
# cargo: run scripts/gpu-test.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin gpumem
exe=$(cargo test --release -p gpumem --test gpu --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')
rm -rf .gpu && mkdir -p .gpu/traces .gpu/bench
cp target/release/gpumem .gpu/
cp "$exe" .gpu/gpu-tests
cp testdata/*.jsonl.gz testdata/snapshot_sample.pickle .gpu/traces/
if [ -d ../shared/bench ]; then cp ../shared/bench/*.py .gpu/bench/; fi
strip --strip-debug .gpu/gpumem .gpu/gpu-tests
cp scripts/gpu-test.sh scripts/gpu-bench.sh scripts/gpu-perf.sh scripts/gpu-ab.sh scripts/record_traces.py scripts/record_long.py .gpu/
# The Python package as a wheel (abi3: any Python >= 3.10), pytest to test it (the GPU machine
# has no network), and its tests.
mkdir -p .gpu/wheels .gpu/py-tests
maturin build --release -m crates/gpumem-py/Cargo.toml --compatibility linux -o .gpu/wheels --quiet
pip download --quiet --no-deps -d .gpu/wheels pytest iniconfig pluggy packaging pygments
cp crates/gpumem-py/tests/*.py .gpu/py-tests/
cp scripts/gpu-py.sh scripts/gpu-install.sh .gpu/
for f in scripts/train_bench.py scripts/ddp_bench.py scripts/torch_memory_tests.py; do if [ -f "$f" ]; then cp "$f" .gpu/; fi; done
if [ -d .gpu-extra ]; then cp -r .gpu-extra .gpu/extra; fi
echo "bundle in .gpu/: $(du -sh .gpu | cut -f1)"
