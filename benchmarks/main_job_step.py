"""Where the main job's training step goes: ``recipes/pretrain.yaml`` against variants of it, in one process; JSON.

Each arm is the recipe's model with one change, built through the CLI from the recipe plus an overlay, trained one
step each in turn on the same batches (so load on a shared machine hits all alike), as the Trainer does (optimiser,
schedule, gradient clipping; ``benchmarks/precision_auto.py``'s ``Arm``):

- ``recipe``: ``recipes/pretrain.yaml`` as shipped;
- ``transformer_decoder``: the co-trained labeller's LAPA-style transformer decoder instead of the motion decoder;
- ``no_labeller``: no co-trained latent-action model (the ``latent`` targets then have no labeller: the arm only
  times the policy's share, the human and neural batches' samples train nothing);
- ``head_dropout_0``: the DiT head without dropout;
- ``tower_32``: the conv tower at 32 channels instead of 64;
- ``vit``: the SmolVLM-style ViT of ``recipes/ablations/vit_vision.yaml``.

Also the data side: seconds to draw one batch from the recipe's stream in this process (the recipe draws them in one
DataLoader worker, on the same two cores). Reported: median step seconds (wall and CPU) per arm and its ratio to
``recipe``, and each arm's training loss over the last ``--window`` steps (a speed-up must not change what is learnt).

``--wall``: instead, wall seconds per step of real ``fit`` runs of the recipe (data workers included; logging,
checkpoints and validation off), for two ways of using the cores: ``threads``, one process with torch's default
intra-op threads (the shipped recipe), and ``ddp``, two single-thread gloo DDP processes at half the batch each (the
same global batch). A callback stamps every step; the figure is the median interval after ``--skip`` steps. The
arms run one after another: run it on an otherwise idle machine.

    python benchmarks/main_job_step.py --steps 30 --threads 1 --out benchmarks/results/main_job_step.json
    python benchmarks/main_job_step.py --wall --steps 100 --out benchmarks/results/main_job_wall.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from lightning.pytorch import Callback  # noqa: E402
from precision_auto import Arm  # noqa: E402

from vla_zoo.cli import VLAZooCLI  # noqa: E402
from vla_zoo.machine import describe  # noqa: E402

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


WALL_ARMS = {
    "threads": [],
    "ddp": ["--trainer.devices=2", "--trainer.strategy=ddp_find_unused_parameters_true",
            "--data.init_args.batch_size=16"],
}


def run_wall_arm(name: str, steps: int, out: Path) -> None:
    """Runs in a fresh interpreter (``--wall-arm``): DDP's launcher starts this same command for its other rank."""
    if name == "ddp":
        torch.set_num_threads(1)
    root = out.parent / f"run_{name}"
    cli = VLAZooCLI(args=["--config", RECIPE, *WALL_ARMS[name], f"--trainer.max_steps={steps}",
                          "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                          "--trainer.val_check_interval=100000", "--trainer.limit_val_batches=0",
                          f"--trainer.default_root_dir={root}", "--trainer.callbacks=[]"], run=False)
    cli.trainer.callbacks.append(StepClock(str(out)))
    cli.trainer.fit(cli.model, cli.datamodule)


def overlays() -> dict[str, list[str]]:
    """Arm name -> extra CLI arguments on top of the recipe."""
    recipe = yaml.safe_load((REPO / RECIPE).read_text())
    labellers = recipe["model"]["init_args"]["pseudo_labelers"]
    transformer = json.loads(json.dumps(labellers))
    transformer[0]["init_args"]["model"]["init_args"]["decoder"] = "transformer"
    tmp = Path(tempfile.mkdtemp())

    def overlay(name: str, data: dict) -> list[str]:
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return ["--config", str(path)]

    return {
        "recipe": [],
        "transformer_decoder": overlay("transformer", {"model": {"init_args": {"pseudo_labelers": transformer}}}),
        "no_labeller": overlay("none", {"model": {"init_args": {"pseudo_labelers": []}}}),
        "head_dropout_0": ["--model.init_args.action_head.init_args.dropout=0.0"],
        "tower_32": ["--model.init_args.backbone.init_args.vision_hidden_size=32"],
        "vit": ["--config", "recipes/ablations/vit_vision.yaml"],
    }


def wall(args: argparse.Namespace) -> dict:
    """Median wall seconds per step of each ``WALL_ARMS`` fit, each in its own interpreter."""
    tmp = Path(tempfile.mkdtemp())
    result = dict(machine=describe(), recipe=RECIPE, steps=args.steps, skip=args.skip,
                  load_average_start=os.getloadavg()[0], step_seconds_median={}, wall_seconds={})
    for name in args.arms or list(WALL_ARMS):
        stamps = tmp / f"{name}.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--wall-arm", name, "--steps", str(args.steps), "--stamps",
                        str(stamps)], check=True)
        result["wall_seconds"][name] = time.perf_counter() - start
        t = json.loads(stamps.read_text())[args.skip:]
        result["step_seconds_median"][name] = statistics.median(b - a for a, b in zip(t, t[1:]))
    base = result["step_seconds_median"].get("threads")
    if base:
        result["speedup_over_threads"] = {k: base / v for k, v in result["step_seconds_median"].items()}
    result["load_average_end"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--arms", nargs="+", default=None, help="subset of the arms (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--wall", action="store_true", help="wall per step of real fits: threads against DDP")
    parser.add_argument("--skip", type=int, default=20, help="--wall: steps left out at the start")
    parser.add_argument("--wall-arm", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stamps", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(REPO)
    if args.wall_arm:
        run_wall_arm(args.wall_arm, args.steps, args.stamps)
        return
    text = json.dumps(wall(args) if args.wall else per_change_cost(args), indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


def per_change_cost(args: argparse.Namespace) -> dict:
    """Each ``overlays`` arm trained one step in turn on the same batches, in this process."""
    common = ["--config", RECIPE, "--trainer.logger=false", "--trainer.precision=32-true"]
    arms, datamodule, clip = {}, None, None
    for name, extra in overlays().items():
        if args.arms and name not in args.arms and name != "recipe":
            continue
        cli = VLAZooCLI(args=[*common, *extra], run=False)
        if datamodule is None:
            datamodule, clip = cli.datamodule, cli.config["trainer"].get("gradient_clip_val")
            datamodule.prepare_data()
            datamodule.setup("fit")
        torch.manual_seed(0)
        model = cli.model
        model.configure_model()
        model.data_spec = datamodule.data_spec()
        arms[name] = Arm(model, "32-true", 0, args.steps, clip)
    stream = iter(datamodule.train_dataloader())
    draw = []
    load_start = os.getloadavg()[0]
    for i in range(args.steps):
        start = time.perf_counter()
        batch = next(stream)
        draw.append(time.perf_counter() - start)
        for arm in arms.values():
            arm.step(batch, i)
    steady = slice(min(5, args.steps // 4), None)  # the first steps warm up oneDNN and the allocator
    med = {name: statistics.median(a.times[steady]) for name, a in arms.items()}
    cpu = {name: statistics.median(a.cpu_times[steady]) for name, a in arms.items()}
    return dict(
        machine=describe(), threads=torch.get_num_threads(), steps=args.steps, recipe=RECIPE,
        load_average_start=load_start, load_average_end=os.getloadavg()[0],
        step_seconds_median=med, step_cpu_seconds_median=cpu,
        cpu_time_relative_to_recipe={name: cpu[name] / cpu["recipe"] for name in cpu},
        batch_draw_seconds_median=statistics.median(draw[steady]),
        parameters={name: sum(p.numel() for p in a.model.parameters()) for name, a in arms.items()},
        train_loss_last_window={name: statistics.mean(a.losses["loss"][-args.window:]) for name, a in arms.items()},
        action_loss_last_window={name: statistics.mean(a.losses["action_loss"][-args.window:])
                                 for name, a in arms.items()},
    )


if __name__ == "__main__":
    main()
