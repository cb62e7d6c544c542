"""bf16-mixed against fp32 for a recipe's training, in one process, and what ``precision: auto`` picks; prints JSON.

Three copies of the recipe's model train side by side on the same batches, one step each in turn, so load on a
shared machine hits all three alike:

- ``fp32``: as ``trainer.precision: 32-true`` trains;
- ``bf16``: the same initial weights and noise stream, as ``bf16-mixed`` trains (Lightning's ``MixedPrecision``:
  ``training_step`` under bf16 autocast, backward, gradient clipping and the optimiser step outside it);
- ``fp32_seed1``: fp32 from another seed (initial weights and noise), the run-to-run spread the bf16 curve is
  compared against.

Each step does what the Trainer does: the recipe's optimiser and schedule, ``gradient_clip_val`` by norm. Reported:
the median step time of each arm and the median of the per-step fp32 / bf16 ratios, in wall-clock and in CPU
seconds (on a loaded machine, a one-thread run's CPU time leaves out its waits for a core); the training loss (total and
action loss) averaged over windows of ``--window`` steps; each arm's action loss at the end on ``--val-batches``
batches drawn before training and never trained on (the same for all arms, evaluated with the same noise); and
``vla_zoo.precision.choose_precision``'s decision for this model.

    python benchmarks/precision_auto.py --steps 40                # the step-time ratio only
    python benchmarks/precision_auto.py --steps 500 --out benchmarks/results/precision_auto.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from vla_zoo.cli import VLAZooCLI
from vla_zoo.machine import describe
from vla_zoo.precision import choose_precision, planned_matmul_shapes


class Arm:
    """One model training with its own optimiser, schedule and random stream; ``log`` calls are captured."""

    def __init__(self, model, precision: str, seed: int, total_steps: int, clip: float | None) -> None:
        from transformers import get_scheduler

        from lit_modules.optimization import LR_SCHEDULES

        self.model, self.precision, self.clip = model.train(), precision, clip
        self.logged: dict[str, float] = {}
        model.log = lambda name, value, **kwargs: self.logged.__setitem__(name, float(value))
        schedule = model.lr_schedule
        self.optimizer = model._optimizer_factory([p for p in model.parameters() if p.requires_grad])
        self.scheduler = get_scheduler(LR_SCHEDULES[schedule.kind], self.optimizer,
                                       num_warmup_steps=int(schedule.warmup_ratio * total_steps),
                                       num_training_steps=total_steps)
        self.rng = torch.Generator().manual_seed(seed).get_state()
        self.times: list[float] = []  # wall seconds per step
        self.cpu_times: list[float] = []  # this process's CPU seconds per step (no waiting for a core)
        self.losses: dict[str, list[float]] = {"loss": [], "action_loss": []}

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed")

    def step(self, batch: dict, index: int) -> None:
        torch.set_rng_state(self.rng)
        start, cpu_start = time.perf_counter(), time.process_time()
        with self._autocast():
            loss = self.model.training_step(batch, index)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.process_time() - cpu_start)
        self.rng = torch.get_rng_state()
        self.losses["loss"].append(float(loss))
        self.losses["action_loss"].append(self.logged.get("train/action_loss", float("nan")))

    @torch.no_grad()
    def validate(self, batches: list[dict]) -> float:
        self.model.eval()
        torch.manual_seed(0)  # the same flow times and noise for every arm
        values = []
        for i, batch in enumerate(batches):
            with self._autocast():
                self.model.validation_step(batch, i)
            values.append(self.logged["val/action_loss"])
        self.model.train()
        return statistics.mean(values)


def windows(values: list[float], size: int) -> list[float]:
    return [statistics.mean(values[i:i + size]) for i in range(0, len(values) - size + 1, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None, help="recipe(s), layered (default: pretrain)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = args.config or ["recipes/pretrain.yaml"]
    cli_args = [a for c in configs for a in ("--config", c)] + ["--trainer.logger=false", "--trainer.precision=32-true"]
    cli = VLAZooCLI(args=cli_args, run=False)
    model, datamodule = cli.model, cli.datamodule
    choice = choose_precision(model, cli.config["trainer"]["accelerator"])  # before building: what the CLI sees
    datamodule.prepare_data()
    datamodule.setup("fit")
    clip = cli.config["trainer"].get("gradient_clip_val")

    def build(seed: int):
        torch.manual_seed(seed)
        m = copy.deepcopy(model)
        m.configure_model()
        m.data_spec = datamodule.data_spec()
        return m

    fp32 = build(0)
    arms = {"fp32": Arm(fp32, "32-true", 0, args.steps, clip),
            "bf16": Arm(copy.deepcopy(fp32), "bf16-mixed", 0, args.steps, clip),
            "fp32_seed1": Arm(build(1), "32-true", 1, args.steps, clip)}
    stream = iter(datamodule.train_dataloader())
    # A fixed evaluation set: the first batches of the stream, never trained on (the recipe has no validation
    # sources; the tiers are small, so these are not held-out samples, only batches no arm took a step on).
    eval_batches = [next(stream) for _ in range(args.val_batches)]
    load_start = os.getloadavg()[0]
    started = time.perf_counter()

    def report(steps_done: int) -> dict:
        steady = slice(min(5, steps_done // 4), None)  # the first steps warm up oneDNN and the allocator
        ratios = [f / b for f, b in zip(arms["fp32"].times[steady], arms["bf16"].times[steady])]
        cpu_ratios = [f / b for f, b in zip(arms["fp32"].cpu_times[steady], arms["bf16"].cpu_times[steady])]
        last = {name: statistics.mean(a.losses["action_loss"][-min(100, steps_done):]) for name, a in arms.items()}
        return dict(
            machine=describe(), load_average_start=load_start, load_average_now=os.getloadavg()[0],
            recipe=configs, steps=steps_done, steps_requested=args.steps,
            batch_size=getattr(datamodule, "batch_size", None), gradient_clip_val=clip,
            wall_seconds=time.perf_counter() - started,
            auto_choice=dict(precision=choice.precision, reason=choice.reason, measurement=choice.measurement,
                             shapes={str(k): n for k, n in planned_matmul_shapes(model).items()}),
            step_seconds_median={name: statistics.median(a.times[steady]) for name, a in arms.items()},
            fp32_over_bf16_step_time=statistics.median(ratios),
            # CPU time counts the threads' work, not their waits: with --threads 1 the load-proof figure
            step_cpu_seconds_median={name: statistics.median(a.cpu_times[steady]) for name, a in arms.items()},
            fp32_over_bf16_step_cpu_time=statistics.median(cpu_ratios),
            threads=torch.get_num_threads(),
            window=args.window,
            train_loss_windows={name: windows(a.losses["loss"], args.window) for name, a in arms.items()},
            action_loss_windows={name: windows(a.losses["action_loss"], args.window) for name, a in arms.items()},
            action_loss_last_100_steps=last,
            bf16_vs_fp32_difference=abs(last["bf16"] - last["fp32"]),
            seed_spread_fp32=abs(last["fp32_seed1"] - last["fp32"]),
            bf16_within_seed_spread=abs(last["bf16"] - last["fp32"]) <= abs(last["fp32_seed1"] - last["fp32"]),
        )

    def write(data: dict) -> str:
        text = json.dumps(data, indent=2)
        if args.out:  # after every window too, so a run cut short still leaves its figures
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return text

    for i, batch in zip(range(args.steps), stream):
        for arm in arms.values():
            arm.step(batch, i)
        if (i + 1) % args.window == 0 and i + 1 < args.steps:
            write(report(i + 1))
    final = report(len(arms["fp32"].times))
    final.update(eval_batches=args.val_batches,
                 eval_action_loss_end={name: a.validate(eval_batches) for name, a in arms.items()})
    print(write(final))


if __name__ == "__main__":
    main()
