"""Training callbacks of our own, where Lightning has none or its own is measurably slower (each says why it
exists)."""

from __future__ import annotations

import math
import signal
import threading
from collections import Counter
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim.swa_utils import get_ema_multi_avg_fn

from datamodules import schema


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
