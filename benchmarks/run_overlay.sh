# Sourced by the post-training benchmark scripts: write_run_overlay OUT STEPS VAL_EVERY writes OUT/overlay.yaml, the
# run-directory part of a result run (steps, CSV logs and last.ckpt under OUT). Callers may append further
# `trainer.callbacks` items (the file ends inside that list) and other top-level sections.
write_run_overlay() {
  local out=$1 steps=$2 val_every=$3
  cat > "$out/overlay.yaml" <<YAML
trainer:
  max_steps: $steps
  val_check_interval: $val_every
  default_root_dir: $out
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {save_dir: $out, name: logs}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: $out/checkpoints, save_last: true, enable_version_counter: false}
YAML
}
