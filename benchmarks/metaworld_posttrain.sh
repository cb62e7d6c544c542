#!/usr/bin/env bash
# Meta-World MT10 results (benchmarks/RESULTS.md): flow-matching policy vs regression baseline.
#   [PYTHON=.venv/bin/python] [TAG=name] bash benchmarks/metaworld_posttrain.sh ARM SEED STEPS [DEMOS [FIT_ARGS...]]
# ARM: flow | regression (from random weights, recipes/metaworld/posttrain_scratch.yaml), flow_pretrained |
# regression_pretrained (from runs/pretrain/checkpoints/last.ckpt: run `lightning fit --config
# recipes/pretrain.yaml` first; the regression arm reuses only its backbone); a `_cotrain` suffix adds the human
# tier labelled by the co-trained latent-action model; a `_conv` suffix swaps the ViT for the conv vision tower
# (recipes/ablations/composed_backbone.yaml + conv_vision.yaml); an `_ema` suffix trains with an EMA of the weights
# (decay 0.999; vla_zoo.callbacks.ForeachEMAWeightAveraging; runs before 2026-11-25 used Lightning's own
# EMAWeightAveraging: the same average, a slower update), whose averaged weights the checkpoints hold and evaluate; a
# `_ws` suffix renders the `workspace` camera instead of `corner` (recipes/explore/metaworld/workspace_camera.yaml; the
# demo cache is rebuilt whenever the views change); a `_shift` suffix adds DrQ's random-shift image augmentation
# (recipes/ablations/random_shift.yaml); a `_dart` suffix (50 demos only) records the demonstrations with DART noise
# injection (recipes/explore/metaworld/dart.yaml: noisy execution, clean expert labels; its own cache); a `_kp` suffix (with
# `_conv`) adds a spatial-softmax keypoint token per view (recipes/ablations/keypoints.yaml); a `_coord` suffix (with
# `_conv`) gives the conv tower CoordConv's (x, y) input channels (recipes/ablations/coord_conv.yaml); a `_nostate`
# suffix gives the flow head no proprioceptive state (recipes/ablations/no_state.yaml); a `_priv` suffix (50 demos
# only) records the object and goal positions with the demos and trains an auxiliary readout of them from the VL
# tokens (recipes/explore/metaworld/privileged_aux.yaml; its own cache).
# DEMOS: 10 (default), 50 or 100 per MT10 task, or goal50: 50 per task of reach, push and pick-place only
# (recipes/explore/metaworld/goal_tasks50.yaml; evaluated on those three). EPISODES (default 10): evaluation episodes per
# task. OMP_NUM_THREADS (default 1) sets the threads of the training process.
# FIT_ARGS (after DEMOS) go to `lightning fit` as further overrides, e.g. `--model.init_args.optimizer.init_args.lr=1e-3`;
# give such a run a TAG, which is added to its directory name (runs/metaworld/ARM_TAG_dDEMOS_sSEED).
# Writes runs/metaworld/ARM_dDEMOS_sSEED/{checkpoints/last.ckpt, checkpoints/step=*.ckpt (every quarter of the run,
# for a learning curve: evaluate them with the command at the end), logs/, eval/results.json, run.json}.
set -euo pipefail
arm=$1; seed=$2; steps=$3; demos=${4:-10}
shift $(( $# < 4 ? $# : 4 )); fit_args=("$@")
out=runs/metaworld/${arm}${TAG:+_$TAG}_d${demos}_s${seed}
if [ -e "$out/overlay.yaml" ]; then  # Lightning would refuse to overwrite its config, after the demos were rendered
  echo "$out already holds a run: move it away, or set TAG=name to give this run its own directory" >&2; exit 2
fi
mkdir -p "$out"
# Validation loss once at the end; closed-loop success comes from the separate 10-episode evaluation below.
source "$(dirname "$0")/run_overlay.sh"
write_run_overlay "$out" "$steps" "$steps"
cat >> "$out/overlay.yaml" <<YAML
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: $out/checkpoints, filename: "{step}", every_n_train_steps: $(( steps >= 4 ? steps / 4 : 1 )), save_top_k: -1}
YAML
case "$arm" in *_ema*) cat >> "$out/overlay.yaml" <<YAML
    - class_path: vla_zoo.callbacks.ForeachEMAWeightAveraging
      init_args: {decay: 0.999}
YAML
;; esac
configs=(--config recipes/pretrain.yaml --config recipes/metaworld/posttrain_scratch.yaml)
eval_tasks=MT10
case "$demos" in
  10) ;;
  50) configs+=(--config recipes/metaworld/demos50.yaml) ;;
  100) configs+=(--config recipes/explore/metaworld/demos100.yaml) ;;
  goal50) configs+=(--config recipes/explore/metaworld/goal_tasks50.yaml); eval_tasks=reach-v3,push-v3,pick-place-v3 ;;
  *) echo "DEMOS must be 10, 50, 100 or goal50, got $demos" >&2; exit 2 ;;
esac
case "$arm" in *_pretrained*) configs+=(--config recipes/metaworld/posttrain_pretrained.yaml) ;; esac
case "$arm" in regression*) configs+=(--config recipes/ablations/regression_head.yaml) ;; esac
case "$arm" in regression*_pretrained*) configs+=("--model.init_args.init_from.parts=[backbone]") ;; esac
case "$arm" in *_conv*) configs+=(--config recipes/ablations/composed_backbone.yaml
  --config recipes/ablations/conv_vision.yaml) ;; esac
case "$arm" in *_kp*) configs+=(--config recipes/ablations/keypoints.yaml) ;; esac
case "$arm" in *_coord*) configs+=(--config recipes/ablations/coord_conv.yaml) ;; esac
case "$arm" in *_nostate*) configs+=(--config recipes/ablations/no_state.yaml) ;; esac
case "$arm" in *_ws*) configs+=(--config recipes/explore/metaworld/workspace_camera.yaml) ;; esac
case "$arm" in *_shift*) configs+=(--config recipes/ablations/random_shift.yaml) ;; esac
case "$arm" in *_dart*) [ "$demos" = 50 ] || { echo "the _dart arms need DEMOS=50" >&2; exit 2; }
  configs+=(--config recipes/explore/metaworld/dart.yaml) ;; esac
case "$arm" in *_priv*) [ "$demos" = 50 ] || { echo "the _priv arms need DEMOS=50" >&2; exit 2; }
  configs+=(--config recipes/explore/metaworld/privileged_aux.yaml) ;; esac
case "$arm" in *_cotrain*) configs+=(--config recipes/metaworld/cotrain_human.yaml)
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Render the demonstrations before the clock starts: generation is data preparation, not training time. This pass
# writes its config (without FIT_ARGS) under $out/prepare; the run's own is $out/logs/version_0/config.yaml.
"$PYTHON" -m vla_zoo fit "${configs[@]}" --config "$out/overlay.yaml" --trainer.max_steps=0 \
  --trainer.default_root_dir="$out/prepare" --trainer.logger=false > "$out/prepare.log" 2>&1
start=$(date +%s)
"$PYTHON" -m vla_zoo fit "${configs[@]}" --config "$out/overlay.yaml" --seed_everything="$seed" \
  ${fit_args[@]+"${fit_args[@]}"} > "$out/train.log" 2>&1
train_s=$(( $(date +%s) - start ))
"$PYTHON" -m vla_zoo.evaluation --env metaworld --checkpoint "$out/checkpoints/last.ckpt" --tasks "$eval_tasks" \
  --episodes "${EPISODES:-10}" --execute-steps 8 --seed 1000 --videos 1 --out "$out/eval" > "$out/eval.log"
cpu=$("$PYTHON" -c "from vla_zoo.machine import cpu_model; print(cpu_model())")  # train_seconds depend on it
echo "{\"arm\": \"$arm\", \"tag\": \"${TAG:-}\", \"fit_args\": \"${fit_args[*]+${fit_args[*]}}\", \"demos\": \"$demos\", \"seed\": $seed, \"steps\": $steps, \"train_seconds\": $train_s, \"cpu\": \"$cpu\"}" \
  > "$out/run.json"
cat "$out/run.json"
