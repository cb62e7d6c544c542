"""Test support for fits: a callback that sends the process a signal at a given step, usable from YAML
(``class_path: tests.vla_zoo.fit_fixtures.SignalAtStep``) in CLI subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess

from lightning.pytorch import Callback


class SignalAtStep(Callback):
    """Sends this process ``signum`` (a real signal, as a scheduler or Ctrl+C would) once ``step`` optimizer steps
    have run, from inside that step's ``on_train_batch_end``; ``group``: to its whole process group instead, DataLoader
    workers included, from another process (``kill``), as Ctrl+C in a terminal or a scheduler's job kill does (run
    the fit in its own session)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), group: bool = False) -> None:
        self.step, self.signum, self.group = step, signum, group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            if self.group:
                subprocess.run(["kill", f"-{self.signum}", "--", f"-{os.getpgrp()}"], check=False)
            else:
                os.kill(os.getpid(), self.signum)
