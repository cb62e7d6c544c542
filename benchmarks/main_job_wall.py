"""Wall seconds per training step of the main job as ``lightning fit`` runs it, for ways of using the machine's cores.

Each arm is a real ``fit`` of ``recipes/pretrain.yaml`` (data workers, logging, checkpoints off) for ``--steps``
steps; a callback stamps every step end, and the figure is the median step interval after ``--skip`` steps (start-up,
oneDNN warm-up and the first batches' decoding excluded). The arms run one after another, so run it on an otherwise
idle machine; ``--arms`` picks some.

- ``threads``: the shipped recipe: one process, torch's default intra-op threads (one per core);
- ``ddp``: two CPU processes with one thread each (gloo DDP), each at half the batch, so the global batch and the
  samples seen per step stay the recipe's.

    python benchmarks/main_job_wall.py --steps 120 --out benchmarks/results/main_job_wall.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning.pytorch import Callback  # noqa: E402

RECIPE = "recipes/pretrain.yaml"


class StepClock(Callback):
    """Stamps each training step's end on global rank 0 and writes the stamps to ``out`` at the end of the fit."""

    def __init__(self, out: str) -> None:
        self.out, self.stamps = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            Path(self.out).write_text(json.dumps(self.stamps))


ARMS = {
    "threads": [],
    "ddp": ["--trainer.devices=2", "--trainer.strategy=ddp_find_unused_parameters_true",
            "--data.init_args.batch_size=16"],
}


def run_arm(name: str, steps: int, out: Path) -> None:
    """Runs in a fresh interpreter (``--arm``): DDP's launcher starts this same command for its other rank."""
    import torch

    from vla_zoo.cli import VLAZooCLI

    if name == "ddp":
        torch.set_num_threads(1)
    root = out.parent / f"run_{name}"
    cli = VLAZooCLI(args=["--config", RECIPE, *ARMS[name], f"--trainer.max_steps={steps}", "--trainer.logger=false",
                          "--trainer.enable_checkpointing=false", "--trainer.val_check_interval=100000",
                          "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={root}",
                          "--trainer.callbacks=[]"], run=False)
    cli.trainer.callbacks.append(StepClock(str(out)))
    cli.trainer.fit(cli.model, cli.datamodule)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--skip", type=int, default=20)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stamps", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.chdir(REPO)
    if args.arm:
        run_arm(args.arm, args.steps, args.stamps)
        return
    import subprocess
    import tempfile

    from vla_zoo.machine import describe

    tmp = Path(tempfile.mkdtemp())
    result = dict(machine=describe(), recipe=RECIPE, steps=args.steps, skip=args.skip,
                  load_average_start=os.getloadavg()[0], step_seconds_median={}, wall_seconds={})
    for name in args.arms:
        stamps = tmp / f"{name}.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--arm", name, "--steps", str(args.steps), "--stamps", str(stamps)],
                       check=True)
        result["wall_seconds"][name] = time.perf_counter() - start
        t = json.loads(stamps.read_text())[args.skip:]
        result["step_seconds_median"][name] = statistics.median(b - a for a, b in zip(t, t[1:]))
    base = result["step_seconds_median"].get("threads")
    if base:
        result["speedup_over_threads"] = {k: base / v for k, v in result["step_seconds_median"].items()}
    result["load_average_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
