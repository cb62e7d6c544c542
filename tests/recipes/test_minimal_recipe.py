"""recipes/minimal.yaml trains to the same losses it always did: a refactor that changes them changed behaviour."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from vla_zoo.cli import VLAZooCLI

#: train/loss of the first 20 steps of `lightning fit --config recipes/minimal.yaml` (seed 0, one thread, CPU).
LOSSES = [0.2828415334224701, 0.2890324294567108, 0.2558283805847168, 0.24634279310703278, 0.19219647347927094,
          0.2621244490146637, 0.27465948462486267, 0.20281779766082764, 0.19897210597991943, 0.2123897522687912,
          0.17824672162532806, 0.15657006204128265, 0.20973019301891327, 0.1451772302389145, 0.16307595372200012,
          0.11050572991371155, 0.11053899675607681, 0.09862484782934189, 0.0973319411277771, 0.07797929644584656]


def test_minimal_recipe_reproduces_its_losses(tmp_path: Path) -> None:
    VLAZooCLI(args=[
        "fit", "--config", str(REPO_ROOT / "recipes" / "minimal.yaml"), "--trainer.max_steps=20",
        "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
    ])
    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses == pytest.approx(LOSSES, rel=1e-5)
