"""benchmarks/gpu_check.sh runs anywhere: without a GPU it is a CPU dry run of every part, writing the same JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_writes_one_json_with_every_part(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "DRY_RUN": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["ok"]
    head = report["action_head"]["report"]["results"]["32-true"]
    # The baseline is our head with the released structure swapped in: the same chunk from the same noise.
    assert head["inference"]["max_abs_difference_vs_released_fp32"]["ours"] < 1e-4
    assert head["train_step"]["speedup_vs_gather"] > 0
    fit = report["fit_bf16_compile"]
    assert fit["ok"] and fit["steps"] == 2 and math.isfinite(fit["train_loss_last"])
    assert report["fit_fsdp_one_gpu"]["ok"] and "dry run" in report["fit_fsdp_one_gpu"]["note"]
    assert "strategy: fsdp" in (tmp_path / "fit_fsdp.yaml").read_text()
