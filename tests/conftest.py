"""Shared test helpers. Tests run against this checkout (pyproject sets pythonpath = ["."])."""

from __future__ import annotations

import os

# One intra-op thread per test process (and the CLI subprocesses it starts). The test models are tiny, and with
# data-loader workers or a busy machine, two OpenMP threads on two cores spin-wait on each other: a training test
# measured 11 s with one thread and 197 s with two under load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never reach the Hugging Face Hub: model ids resolve from the local cache only, and tests use local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], entry: str = "module", cwd: Path | None = None, timeout: float = 300,
            new_session: bool = False) -> subprocess.CompletedProcess:
    """Run the vla-zoo CLI in a subprocess, through a console script or ``python -m vla_zoo``.

    PYTHONPATH points at this checkout so the subprocess tests the code under test even where the installed
    console script belongs to another checkout. ``new_session``: its own process group, so a signal it sends to its
    group does not reach pytest.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    if entry == "module":
        cmd = [sys.executable, "-m", "vla_zoo", *args]
    else:
        script = Path(sys.executable).parent / entry
        if not script.exists():
            pytest.fail(f"console script {entry!r} is not installed next to {sys.executable}: run `pip install -e .`")
        cmd = [str(script), *args]
    return subprocess.run(cmd, cwd=cwd or REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=new_session)


@pytest.fixture
def one_thread():
    """Tiny models are dominated by per-op overhead; two OpenMP threads on a shared 2-core machine are ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def in_process_ddp():
    """For a test that fits with ``strategy: ddp`` in the pytest process itself (one device, to reach a check that
    only runs under DDP): afterwards destroy its process group and restore the environment it set. Otherwise the
    group's TCP store keeps MASTER_PORT bound, and the next ``ddp_spawn`` test, reusing that port, fails with
    EADDRINUSE."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
