"""Test support for fits: a callback that sends the process a signal at a given step, usable from YAML
(``class_path: tests.vla_zoo.fit_fixtures.SignalAtStep``) in CLI subprocesses."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class SignalAtStep(Callback):
    """Sends this process ``signum`` (a real signal, as a scheduler or Ctrl+C would) once ``step`` optimizer steps
    have run, from inside that step's ``on_train_batch_end``."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
