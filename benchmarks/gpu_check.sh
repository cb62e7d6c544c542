#!/usr/bin/env bash
# Issue 4's action-head figures on a GPU, as one short prepared call of the device tool (an H200 there has torch
# but not this package's other dependencies; benchmarks/action_head.py needs only torch and our pure-torch
# components, so it runs from the checkout with PYTHONPATH=.):
#   device run: bash benchmarks/gpu_check.sh          -> $OUT/action_head_bf16-mixed.json, _32-true.json, gpu.txt
# Each JSON is action_head.py's report at N1 sizes: training step (fraction of the matmul peak in that precision,
# grouped adapters vs per-sample gather), one 16-action chunk at batch 1 with vs without the K-V cache, and the
# adapters' memory. bf16-mixed is how recipes/n1.yaml trains. A CPU smoke check of the script itself:
#   OUT=/tmp/gpu_check DEVICE=cpu EXTRA=--small bash benchmarks/gpu_check.sh
set -euo pipefail
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.txt" 2>&1 || true
fi
for precision in bf16-mixed 32-true; do
  # shellcheck disable=SC2086  # EXTRA is a list of flags
  "$python" benchmarks/action_head.py --device "$device" --precision "$precision" --train-repeats 10 \
    --inference-repeats 20 ${EXTRA:-} > "$out/action_head_$precision.json"
  "$python" - "$out/action_head_$precision.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t, i = r.get("train_step", {}), r.get("inference", {})
print(r["precision"], "train: %.2f of peak" % t["grouped"]["fraction_of_matmul_peak"] if t else "",
      "| K-V cache %.2fx (%.1f vs %.1f ms)" % (i["speedup"], 1e3 * i["kv_cache_seconds"], 1e3 * i["no_cache_seconds"]) if i else "")
PY
done
