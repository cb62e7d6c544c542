#!/usr/bin/env bash
# Post-training results on the embedded world (benchmarks/RESULTS.md): flow-matching policy vs regression baseline.
#   [PYTHON=.venv/bin/python] bash benchmarks/tabletop_posttrain.sh ARM SEED [STEPS] [DEMOS]
# ARM: flow | regression (post-trained from runs/pretrain/checkpoints/last.ckpt: run `lightning fit --config
# recipes/pretrain.yaml` first; the regression arm reuses only its backbone) or flow_scratch | regression_scratch
# (the same recipe from random weights, the LM trained too: from random weights a frozen LM is a random projection).
# The System 2 is the recipes' default conv tower; a `_vit` infix (flow_vit, flow_vit_scratch, ...) swaps in the
# SmolVLM-style ViT (recipes/ablations/vit_vision.yaml), whose `_scratch` arms keep the LM frozen as they always did.
# A `_conv` infix is accepted for the runs named that way before the conv tower became the default (same model).
# DEMOS (default 50, the pyramid's robot tier): post-train on the first DEMOS robot episodes of seed 0, generated
# into .cache/vla_zoo/tabletop_robotDEMOS (episode i is the same episode in every pyramid of that seed).
# Writes runs/results/ARM_sSEED[_dDEMOS]/{checkpoints/last.ckpt, eval/results.json}.
# The robot source is held in memory (`cache: true`): every epoch is a fresh permutation of all its samples, and
# no step waits on JPEG decoding (26,800 samples at 1,000 demos).
set -euo pipefail
arm=$1; seed=$2; steps=${3:-1000}; demos=${4:-50}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=runs/results/${arm}_s${seed}
robot=.cache/vla_zoo/tabletop/robot
if [ "$demos" != 50 ]; then
  out=${out}_d${demos}
  robot=.cache/vla_zoo/tabletop_robot${demos}/robot
  "$PYTHON" -c "from envs.tabletop import TabletopPyramid as P; P(root='.cache/vla_zoo/tabletop_robot${demos}', \
episodes={'robot': ${demos}, 'robot_b': 0, 'sim': 0, 'human': 0, 'neural': 0}, num_workers=1).prepare()"
fi
mkdir -p "$out"
source "$(dirname "$0")/run_overlay.sh"
write_run_overlay "$out" "$steps" "$(( steps / 2 ))"
cat >> "$out/overlay.yaml" <<YAML
    - class_path: vla_zoo.callbacks.ClosedLoopEvalCallback
      init_args:
        policy_factory: vla_zoo.policy.policy_from_module
        make_env: tabletop
        env_kwargs: {embodiment: point_gripper}
        episodes_per_task: 10
        execute_steps: 8
data:
  init_args:
    sources:
      - {name: robot, shards: $robot, embodiment: point_gripper, weight: 1.0, cache: true}
YAML
vision=()  # layered before posttrain.yaml, whose frozen LM then applies
case "$arm" in *_vit*) vision+=(--config recipes/ablations/vit_vision.yaml) ;; esac
extra=()
case "$arm" in regression*) extra+=(--config recipes/ablations/regression_head.yaml
  "--model.init_args.init_from={path: runs/pretrain/checkpoints/last.ckpt, parts: [backbone]}") ;; esac
case "$arm" in *_scratch) extra+=(--model.init_args.init_from=null) ;; esac
case "$arm" in *_vit*) ;; *_scratch) extra+=(--model.init_args.backbone.init_args.tune_llm=true) ;; esac
start=$(date +%s)
"$PYTHON" -m vla_zoo fit --config recipes/pretrain.yaml "${vision[@]}" --config recipes/posttrain.yaml "${extra[@]}" \
  --config "$out/overlay.yaml" --seed_everything="$seed"
train_s=$(( $(date +%s) - start ))
"$PYTHON" -m vla_zoo.evaluation --env tabletop --embodiment point_gripper --checkpoint "$out/checkpoints/last.ckpt" \
  --episodes 25 --execute-steps 8 --seed 1000 --videos 1 --out "$out/eval" > "$out/eval.log"
cpu=$("$PYTHON" -c "from vla_zoo.machine import cpu_model; print(cpu_model())")  # train_seconds depend on it
echo "{\"arm\": \"$arm\", \"seed\": $seed, \"steps\": $steps, \"demos\": $demos, \"train_seconds\": $train_s, \"cpu\": \"$cpu\"}" > "$out/run.json"
cat "$out/run.json"
