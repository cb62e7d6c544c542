"""Every training callback of our own, where Lightning has none or its own is measurably slower (each says why it
exists): preemption and non-finite-loss guards, weight averaging, the progress bar, the data mixture's monitor and
the closed- and open-loop evaluations (their rollout and scoring code stays in ``vla_zoo.evaluation`` and
``vla_zoo.open_loop``)."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, RichProgressBar, WeightAveraging
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim.swa_utils import get_ema_multi_avg_fn

from datamodules import schema
from datamodules.mixture import MixtureDataModule
from envs.registry import MakeEnv, resolve_make_env, resolve_tasks
from vla_zoo.evaluation import PolicyOrFactory, evaluate_closed_loop, write_report
from vla_zoo.open_loop import open_loop_eval

log = logging.getLogger(__name__)


class CheckpointOnSignal(Callback):
    """On SIGTERM or SIGINT, finish the current training step, save a resumable checkpoint at it through the run's
    ``ModelCheckpoint`` callbacks (the step's file and ``last.ckpt``, so ``--ckpt_path last`` continues from it), and
    exit with status 128 + the signal number (143 for SIGTERM, 130 for SIGINT).

    Why: Lightning already stops at the next step boundary on SIGTERM (``trainer.received_sigterm``, agreed across
    DDP ranks), but saves nothing there and exits 0, so a preempted job looks finished and loses every step since
    the last periodic checkpoint. SIGINT would raise ``KeyboardInterrupt`` wherever the step happens to be; here it
    takes the SIGTERM path instead, and a second Ctrl+C still stops at once. The vla-zoo CLI adds this callback to
    every run (config section ``checkpoint_on_signal``).

    Args:
        enabled: False leaves the signals to Lightning (SIGTERM: stop after the step, no checkpoint, status 0).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.received: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning installs its SIGTERM handler just before the loop starts (after on_fit_start) and restores the
        # previous handlers of every signal at teardown, ours included.
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        lightning_handler = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self.received is not None:
                raise KeyboardInterrupt  # a second Ctrl+C: the user does not want to wait for the step
            self.received = signum
            rank_zero_info(f"received {signal.Signals(signum).name}: saving a checkpoint after the current step")
            if callable(lightning_handler):
                lightning_handler(signum, frame)  # sets trainer.received_sigterm: the loop stops after this step
            else:
                trainer.should_stop = True

        self.received = None
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException on every rank once any rank got the signal, so all ranks save together
        # (saving has a barrier), including ranks whose own handler never ran.
        if not self.enabled or not isinstance(exception, SIGTERMException):
            return
        signum = self.received or int(signal.SIGTERM)
        checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        if not checkpoints:
            rank_zero_warn(f"{signal.Signals(signum).name}: the run has no ModelCheckpoint callback, so no "
                           "checkpoint was saved; add one with `dirpath` and `save_last: true` to the recipe")
        # Lightning orders ModelCheckpoint callbacks last, so their own on_exception runs after this one and saves.
        for callback in checkpoints:
            callback.save_on_exception = True
        # SIGTERMException is a SystemExit without a code (status 0): make the interruption visible to the caller.
        exception.code = 128 + signum


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or inf; the fit stopped before the backward pass."""


class StopOnNonFiniteLoss(Callback):
    """Stops a fit at the first training loss that is NaN or inf, before its backward pass moves any weight, with an
    error naming the step, the loss and the sources of the batch.

    Why: a NaN loss does not recover (AdamW's moments turn NaN with the first NaN gradient), so a run that went on
    would spend its budget writing checkpoints of NaN weights and exit 0. The vla-zoo CLI adds this callback to every
    run (config section ``non_finite_loss``); Lightning's own checks (``detect_anomaly``, ``EarlyStopping``'s
    ``check_finite``) either slow every step or look only at validation metrics. Under DDP the ranks agree on the
    decision, so they all stop together.

    Args:
        enabled: False lets the run go on (a recipe that studies instabilities, or ``16-mixed`` precision, whose
            gradient scaler skips non-finite steps itself).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._batch: Any = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        raise NonFiniteLossError(
            f"training loss is {loss.detach().float().cpu().tolist()} at step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}, rank {trainer.global_rank}); the batch holds {self._sources(trainer)}. Common "
            "causes: non-finite samples or statistics in a source (`python -m datamodules.validate DIR` finds them), "
            "or a learning rate too high. No weight was updated with it. To let the run go on, set "
            "`non_finite_loss: {enabled: false}` in the recipe (or `--non_finite_loss.enabled=false`)"
        )

    def _sources(self, trainer: Trainer) -> str:
        batch = self._batch
        if not isinstance(batch, dict) or schema.SOURCE_ID not in batch:
            return "samples without source ids"
        names = getattr(trainer.datamodule, "source_names", None) or []
        counts = Counter(batch[schema.SOURCE_ID].tolist())
        named = {names[i] if 0 <= i < len(names) else f"source {i}": n for i, n in sorted(counts.items())}
        return "samples of sources " + ", ".join(f"{name!r} ({n})" for name, n in named.items())


class ForeachEMAWeightAveraging(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` with the average updated by ``torch._foreach_lerp_`` over all tensors at
    once instead of a Python loop of three ops per tensor. Same average (``decay * ema + (1 - decay) * weights``,
    equal to float rounding), same checkpoints, same place in the callback order.

    Why: the per-tensor loop is a fixed cost of every step. For the Meta-World recipe's 163 parameter tensors it
    takes 4.4 ms against 1.6 ms on one thread of this CPU (``benchmarks/train_step_speed.py``), about 2.5% of the
    recipe's two-thread step, i.e. 1.5 of its 60 minutes. (The loop's ``0.999 * w + 0.001 * w`` also drifts by an
    ulp per step where ``lerp`` keeps ``w``: after 60 updates of unchanged weights the two averages differ by 3.5e-6.)
    """

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        use_buffers: bool = True,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, use_buffers=use_buffers, decay=decay,
                         update_every_n_steps=update_every_n_steps, update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch, **kwargs)
        # The parent hands these kwargs to torch's AveragedModel in setup(), which takes one of avg_fn (the loop)
        # and multi_avg_fn (lists of tensors at once). tests/vla_zoo/test_callbacks.py pins that this stays true.
        self._kwargs = {**self._kwargs, "avg_fn": None, "multi_avg_fn": get_ema_multi_avg_fn(decay)}


class StepsProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, titled with the last epoch that ``max_steps`` reaches.

    Our recipes stop on ``max_steps``, which leaves ``max_epochs`` at -1, and the stock bar then reads "Epoch 3/-2".
    Here the last epoch is ``ceil(max_steps x accumulation / batches per epoch) - 1`` (or ``max_epochs - 1`` when that
    comes first), so "Epoch 1/3" means the second of four epochs. ``VLAZooCLI`` adds it to every run that shows a bar.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        last = trainer.max_epochs - 1 if trainer.max_epochs not in (None, -1) else None
        batches = trainer.num_training_batches
        if trainer.max_steps > 0 and isinstance(batches, int) and batches > 0:
            by_steps = math.ceil(trainer.max_steps * trainer.accumulate_grad_batches / batches) - 1
            last = by_steps if last is None else min(last, by_steps)
        description = f"Epoch {current_epoch}" + (f"/{last}" if last is not None else "")
        # Padded like the stock bar, so that the training and validation bars do not flicker in width.
        return f"{description:{len(self.validation_description)}}"


class MixtureMonitor(Callback):
    """Logs, as scalars of every logger (TensorBoard's Scalars tab), per source the training samples drawn so far
    (``data/samples_<source>``) and their fraction (``data/frac_<source>``), and the skipped-sample counts
    (``data/errors_<source>_<kind>``)."""

    def __init__(self, log_every_n_steps: int = 50) -> None:
        self.log_every_n_steps = log_every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, MixtureDataModule) or (trainer.global_step % self.log_every_n_steps):
            return
        total = sum(dm.drawn_counts.values()) or 1
        metrics = {f"data/frac_{name}": dm.drawn_counts[i] / total for i, name in enumerate(dm.source_names)}
        metrics.update({f"data/samples_{name}": float(dm.drawn_counts[i]) for i, name in enumerate(dm.source_names)})
        metrics.update({f"data/errors_{key.replace('/', '_')}": float(n) for key, n in dm.error_counts.items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)


class ClosedLoopEvalCallback(Callback):
    """Every ``every_n_val_epochs`` validation epochs, roll the model being trained out in simulation.

    ``policy_factory(pl_module)`` wraps the LightningModule as a policy (or an ``env -> policy`` factory);
    ``make_env`` is a callable, a registered env name (``"metaworld"``, ``"tabletop"``) or ``"module:callable"``,
    built with ``env_kwargs``. Logs ``eval/success/<task>`` and ``eval/success/mean``; episodes are split over
    processes and the counts summed, so every rank logs the same numbers. Rank 0 writes the report and
    ``record_videos`` GIFs per task under ``<log_dir>/closed_loop/step_<global_step>``, and logs each GIF as an
    animated image ``eval/rollout/<task>/<episode>`` (TensorBoard's Images tab; a video in Weights & Biases).

    With weight averaging (Lightning's ``EMAWeightAveraging``), list this callback first: the averaging callback
    swaps the averaged weights in for validation and back at the end of the validation epoch, so callbacks after it
    would roll out the raw weights, not the ones the checkpoint deploys. ``setup`` refuses the other order.
    """

    def __init__(
        self,
        policy_factory: Callable[[LightningModule], PolicyOrFactory],
        tasks: list[str] | str | None = None,
        make_env: str | MakeEnv = "metaworld",
        env_kwargs: dict[str, Any] | None = None,
        episodes_per_task: int = 10,
        every_n_val_epochs: int = 1,
        seed: int = 0,
        execute_steps: int | None = None,
        max_steps: int | None = None,
        record_videos: int = 1,
    ) -> None:
        self.policy_factory = policy_factory
        self.tasks = resolve_tasks(make_env, tasks) if isinstance(make_env, str) else list(tasks or [])
        if not self.tasks:
            raise ValueError("ClosedLoopEvalCallback needs tasks")
        self.make_env = resolve_make_env(make_env, **(env_kwargs or {}))
        self.episodes_per_task = episodes_per_task
        self.every_n_val_epochs = every_n_val_epochs
        self.seed = seed
        self.execute_steps = execute_steps
        self.max_steps = max_steps
        self.record_videos = record_videos
        self._val_epochs = 0
        self.last_results: dict[str, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        callbacks = trainer.callbacks
        before = callbacks[: callbacks.index(self)] if self in callbacks else []
        averaging = [type(c).__name__ for c in before if isinstance(c, WeightAveraging)]
        if averaging:
            raise ValueError(
                f"trainer.callbacks: {averaging[0]} is listed before ClosedLoopEvalCallback, so the rollouts would "
                f"score the raw weights (it swaps the averaged ones out at the end of validation, before later "
                f"callbacks run); list ClosedLoopEvalCallback before {averaging[0]} in the recipe"
            )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_epochs += 1
        if self._val_epochs % self.every_n_val_epochs:
            return
        import torch

        out_dir = None
        if trainer.is_global_zero:
            root = trainer.log_dir or trainer.default_root_dir
            out_dir = Path(root) / "closed_loop" / f"step_{trainer.global_step}"
        start = time.perf_counter()
        log.info("closed-loop evaluation at step %d: %d episodes of each of %s", trainer.global_step,
                 self.episodes_per_task, ", ".join(self.tasks))
        results = evaluate_closed_loop(
            self.policy_factory(pl_module),
            self.make_env,
            self.tasks,
            self.episodes_per_task,
            seed=self.seed,
            execute_steps=self.execute_steps,
            max_steps=self.max_steps,
            record_videos=self.record_videos,
            out_dir=out_dir,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            progress=False,  # the trainer's bar holds the console; a line when done says what happened
        )
        counts = torch.tensor(
            [[results["tasks"].get(t, {}).get(k, 0) for k in ("successes", "episodes")] for t in self.tasks],
            dtype=torch.float64,
            device=pl_module.device,
        )
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        rates = (counts[:, 0] / counts[:, 1]).tolist()
        for task, rate in zip(self.tasks, rates):
            pl_module.log(f"eval/success/{task}", rate, sync_dist=False)
        pl_module.log("eval/success/mean", float(np.mean(rates)), sync_dist=False)
        self.last_results = {"success": dict(zip(self.tasks, rates)), "average": float(np.mean(rates))}
        if out_dir is not None:
            self._log_videos(trainer, out_dir / "videos")
        log.info("closed-loop success at step %d: %s (mean %.2f) in %.0f s", trainer.global_step,
                 ", ".join(f"{t} {r:.2f}" for t, r in zip(self.tasks, rates)), self.last_results["average"],
                 time.perf_counter() - start)
        if out_dir is not None and trainer.world_size > 1:
            totals = {t: {"successes": int(s), "episodes": int(n)} for t, (s, n) in zip(self.tasks, counts.tolist())}
            write_report({**self.last_results, "tasks": totals, "seed": self.seed}, out_dir)


    def _log_videos(self, trainer: Trainer, videos: Path) -> None:
        """Each recorded rollout as an animated image ``eval/rollout/<task>/<episode>`` (``vla_zoo.media``)."""
        from vla_zoo.media import log_gif

        for task in self.tasks:
            for path in sorted(videos.glob(f"{task}_episode*.gif")):
                episode = path.stem[len(task) + len("_episode"):].split("_")[0]  # "003" of task_episode003_success
                log_gif(trainer, f"eval/rollout/{task}/{episode}", path, trainer.global_step)


class OpenLoopEvalCallback(Callback):
    """Every ``every_n_val_epochs`` validation epochs, ``open_loop_eval`` of the model being trained on the first
    ``max_episodes`` episodes of the shard source ``shards``.

    Rank 0 runs it (the episodes are few; other ranks wait at the next collective), writes ``open_loop.json`` and the
    plots under ``<log_dir>/open_loop/step_<global_step>``, logs ``eval/open_loop/mse/<embodiment>`` and each
    episode's plot as a figure ``eval/open_loop/episode_XXXX`` (TensorBoard's Images tab). ``policy_factory`` wraps
    the LightningModule as a policy, as for ``ClosedLoopEvalCallback``.
    """

    def __init__(
        self,
        policy_factory: Callable[[LightningModule], Any],
        shards: str,
        max_episodes: int = 2,
        execute_every: int | None = None,
        every_n_val_epochs: int = 1,
    ) -> None:
        self.policy_factory, self.shards = policy_factory, shards
        self.max_episodes, self.execute_every, self.every_n_val_epochs = max_episodes, execute_every, every_n_val_epochs
        self._val_epochs = 0
        self.last_results: dict[str, Any] | None = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_epochs += 1
        if self._val_epochs % self.every_n_val_epochs or not trainer.is_global_zero:
            return
        from datamodules.episode import Modality
        from datamodules.shards import load_sidecars, read_episodes
        from vla_zoo.media import log_figure

        sidecars = load_sidecars(self.shards)
        names = {sidecars["source"]["embodiment"]: Modality.from_dict(sidecars["modality"]).action_names}
        step = trainer.global_step
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "open_loop" / f"step_{step}"

        def on_plot(name: str, figure: Any) -> None:
            log_figure(trainer, f"eval/open_loop/{name}", figure, step)

        results = open_loop_eval(self.policy_factory(pl_module), read_episodes(self.shards), out_dir,
                                 self.max_episodes, self.execute_every, names, on_plot=on_plot)
        for embodiment, summary in results["embodiments"].items():
            pl_module.log(f"eval/open_loop/mse/{embodiment}", summary["mse"], rank_zero_only=True)
        self.last_results = results
