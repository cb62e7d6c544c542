#!/usr/bin/env bash
# One command for a GPU: the action-head benchmark (ours against the released structure, fp32 and bf16), a
# STEPS-step bf16-mixed fit of recipes/pretrain.yaml with the DiT blocks under torch.compile (inductor), and the
# same fit under FSDP on one GPU; one JSON with every part's status, time and figures:
#   bash benchmarks/gpu_check.sh                  -> $OUT/gpu_check.json  (OUT defaults to runs/gpu_check)
# Where no CUDA GPU is present (or DRY_RUN=1) it is a dry run on the CPU, in a minute or two: the head benchmark at
# small sizes, a 2-step fit on a tiny pyramid with the compile path traced by torch.compile's `eager` backend, and
# the FSDP fit's configuration parsed (`--print_config`; Lightning's FSDP needs a GPU). A part that fails (a missing
# package on a bare GPU machine, an error) is recorded with its log's tail; the others still run.
# Environment: OUT, PYTHON (default python3), STEPS (default 100), DRY_RUN (1: force the CPU dry run), HEAD_ARGS
# (extra flags for benchmarks/action_head.py).
set -uo pipefail
out=${OUT:-runs/gpu_check}
python=${PYTHON:-python3}
steps=${STEPS:-100}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -z "${DRY_RUN:-}" ]; then
  if "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    DRY_RUN=0
  else
    DRY_RUN=1
  fi
fi

if [ "$DRY_RUN" = 1 ]; then
  device=cpu accelerator=cpu backend=eager steps=2 log_every=1 window=2
  head_args="--size small --train-repeats 1 --inference-repeats 1 --threads 1"
  # A tiny pyramid of its own, so the dry run neither needs nor touches the recipe's cached data.
  data="data:
  init_args:
    prepare:
      init_args: {root: $out/pyramid, episodes: {robot: 2, robot_b: 2, sim: 2, human: 2, neural: 2}, num_workers: 1}
    sources:
      - {name: robot, shards: $out/pyramid/robot, embodiment: point_gripper, weight: 0.3, targets: [action, latent]}
      - {name: robot_b, shards: $out/pyramid/robot_b, embodiment: two_link_arm, weight: 0.2}
      - {name: sim, shards: $out/pyramid/sim, embodiment: point_gripper, weight: 0.2}
      - {name: human, shards: $out/pyramid/human, embodiment: human, weight: 0.15, has_action: false, targets: [latent]}
      - {name: neural, shards: $out/pyramid/neural, embodiment: point_gripper, weight: 0.15, has_action: false,
         targets: [latent]}
    batch_size: 8
    num_workers: 0"
else
  device=cuda accelerator=gpu backend=inductor log_every=5 window=10
  head_args="--train-repeats 10 --inference-repeats 20"
  data=""
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.txt" 2>&1 || true
fi

# Runs "$@" as part $1, recording its exit status and seconds; its output goes to $out/<part>.log.
run_part() {
  local name=$1 start end rc=0
  shift
  start=$(date +%s.%N)
  "$@" > "$out/$name.log" 2>&1 || rc=$?
  end=$(date +%s.%N)
  printf '{"rc": %d, "start": %s, "end": %s}\n' "$rc" "$start" "$end" > "$out/$name.status.json"
  echo "gpu_check: $name exited $rc" >&2
}

# One overlay per fit: its own log dir, a throughput monitor, no checkpoints; the pretraining recipe otherwise.
write_overlay() {  # name, then extra trainer lines
  local name=$1 extra=$2
  cat > "$out/$name.yaml" <<EOF
trainer:
  accelerator: $accelerator
  devices: 1
  precision: bf16-mixed
  max_steps: $steps
  log_every_n_steps: $log_every
  enable_checkpointing: false
  default_root_dir: $out/$name
$extra
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {save_dir: $out/$name, name: logs}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ThroughputMonitor
      init_args: {batch_size_fn: datamodules.schema.batch_size, window_size: $window}
model:
  init_args:
    action_head:
      init_args:
        compile_backend: $backend
$data
EOF
}
write_overlay fit_compile ""
# Lightning refuses norm clipping under FSDP; the recipe's clipping is off in this fit.
write_overlay fit_fsdp "  strategy: fsdp
  gradient_clip_val: null"
sed -i "s/compile_backend: $backend/compile_backend: null/" "$out/fit_fsdp.yaml"

# shellcheck disable=SC2086  # head_args and HEAD_ARGS are lists of flags
run_part action_head sh -c "'$python' benchmarks/action_head.py --device $device $head_args ${HEAD_ARGS:-} \
  > '$out/action_head.json'"
run_part fit_compile "$python" -m vla_zoo fit --config recipes/pretrain.yaml --config "$out/fit_compile.yaml"
if [ "$DRY_RUN" = 1 ]; then
  run_part fit_fsdp "$python" -m vla_zoo fit --config recipes/pretrain.yaml --config "$out/fit_fsdp.yaml" --print_config
else
  run_part fit_fsdp "$python" -m vla_zoo fit --config recipes/pretrain.yaml --config "$out/fit_fsdp.yaml"
fi

"$python" - "$out" "$DRY_RUN" "$steps" <<'PY'
import csv, json, os, sys
from pathlib import Path

out, dry_run, steps = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])


def part(name: str) -> dict:
    status = json.loads((out / f"{name}.status.json").read_text())
    log = (out / f"{name}.log").read_text(errors="replace") if (out / f"{name}.log").exists() else ""
    result = {"ok": status["rc"] == 0, "rc": status["rc"], "seconds": round(status["end"] - status["start"], 2)}
    if status["rc"] != 0:
        result["log_tail"] = log[-3000:]
    return result


def fit_figures(name: str) -> dict:
    metrics = sorted((out / name / "logs").glob("version_*/metrics.csv"))
    if not metrics:
        return {}
    rows = list(csv.DictReader(metrics[-1].open()))
    last = lambda key: next((float(r[key]) for r in reversed(rows) if r.get(key)), None)
    rates = sorted((k for k in (rows[0] if rows else {}) if k.endswith("batches_per_sec")), key=len)
    rate = rates[0] if rates else None  # the all-device rate where there is one, else this device's
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    return {"steps": int(max((float(r["step"]) for r in rows if r.get("step")), default=-1)) + 1,
            "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
            "batches_per_sec": last(rate) if rate else None, "samples_per_sec": last(rate.replace("batches", "samples"))
            if rate else None}


report = {"dry_run": dry_run, "fit_steps": steps}
try:
    from vla_zoo.machine import describe
    report["machine"] = describe()
except Exception as e:  # the package's dependencies missing on a bare GPU machine: the parts' logs say more
    report["machine"] = {"error": f"{type(e).__name__}: {e}"}
if (out / "gpu.txt").exists():
    report["nvidia_smi"] = (out / "gpu.txt").read_text().strip()
head = part("action_head")
if head["ok"]:
    head["report"] = json.loads((out / "action_head.json").read_text())
report["action_head"] = head
report["fit_bf16_compile"] = {**part("fit_compile"), **fit_figures("fit_compile")}
fsdp = part("fit_fsdp")
if dry_run:
    fsdp["note"] = "dry run: configuration parsed only (Lightning's FSDP needs a GPU)"
report["fit_fsdp_one_gpu"] = {**fsdp, **fit_figures("fit_fsdp")}
report["ok"] = all(report[k]["ok"] for k in ("action_head", "fit_bf16_compile", "fit_fsdp_one_gpu"))
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
summary = {k: {f: v.get(f) for f in ("ok", "seconds", "steps", "batches_per_sec", "train_loss_last") if f in v}
           for k, v in report.items() if isinstance(v, dict) and "ok" in v}
print(json.dumps({"gpu_check": str(out / "gpu_check.json"), "ok": report["ok"], **summary}))
sys.exit(0 if report["ok"] else 1)
PY
