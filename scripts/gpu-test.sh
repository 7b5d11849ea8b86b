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
# Replays of real traces on real memory, every block stamped and checked when freed: the
# 24-step GPT-2 follows a periodic plan (no device call in its second half), the others
# recycle pages (the default) or compact under live blocks (compaction:True); the offload trace frees blocks used on a side stream;
# the decoding trace grows a KV cache by torch.cat at every token; diffusion sampling refuses
# its periodic plan (Note [What a plan leaves outside its region]).
echo "== gpumem replay --device cuda --check-contents"
T="$B/traces"
if "$B/gpumem" replay "$T/gpt2_train_bf16_24steps.jsonl.gz" "$T/vit_train_amp_24steps.jsonl.gz" \
  "$T/offload_side_stream.jsonl.gz" "$T/bert_varlen_train.jsonl.gz" "$T/llm_decode_kvcache.jsonl.gz" \
  "$T/gan_train.jsonl.gz" "$T/diffusion_sampling.jsonl.gz" --device cuda -p gpumem \
  -p gpumem:compaction:True --check-contents --json > /tmp/gpumem-contents.jsonl; then
  python3 - /tmp/gpumem-contents.jsonl <<'PY' || status=1
import json, sys
ok = True
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("%-34s %-24s %6d blocks checked, %d lost a stamp; second-half device calls %d"
          % (r["trace"], r["policy"], r["contents_checked"], r["contents_corrupted"], r["steady_device_calls"]))
    ok &= r["contents_checked"] > 400 and r["contents_corrupted"] == 0
    if r["trace"].startswith("gpt2_train_bf16_24") and r["policy"] == "gpumem":
        ok &= r["steady_device_calls"] == 0  # the plan was followed
sys.exit(0 if ok else 1)
PY
else
  status=1
fi
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
