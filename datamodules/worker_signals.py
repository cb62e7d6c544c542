"""DataLoader workers leave stop signals to the training process.

Ctrl+C sends SIGINT to the terminal's whole process group, and schedulers (Slurm, ``kill -- -PGID``, container
stops) send SIGTERM to every process of a job. A DataLoader worker that dies of it makes the main process fail with
"DataLoader worker ... killed by signal" while ``CheckpointOnSignal`` is finishing the step to save a checkpoint.
So a worker ignores SIGINT, and takes SIGTERM only from the process that started it (the DataLoader's own shutdown
terminates a stuck worker with SIGTERM); once the trainer has saved, the DataLoader shuts the workers down as usual,
and a worker whose parent has died still exits through PyTorch's watchdog.
"""

from __future__ import annotations

import os
import signal
import threading


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """``worker_init_fn`` for every DataLoader of ours (runs in the worker, before its first batch)."""
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: SIGTERM keeps its default action
        return
    # Block SIGTERM and wait for it in a thread, which learns the sender's pid (a Python handler cannot).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_take_sigterm_from_parent_only, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent").start()


def _take_sigterm_from_parent_only(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(128 + signal.SIGTERM)  # what the default action would report, without Python's teardown
