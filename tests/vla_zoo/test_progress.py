"""What a user sees: a progress bar in every shipped recipe, titled with the run's real last epoch; INFO logs on
the terminal, once each; no library warnings that do not apply to our modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Trainer

from datamodules.synthetic import SyntheticChunkDataModule
from tests.conftest import REPO_ROOT
from vla_zoo.callbacks import StepsProgressBar
from vla_zoo.cli import VLAZooCLI

RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))


def _settings(node, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _settings(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _settings(v, key)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO_ROOT / "recipes")))
def test_no_shipped_recipe_turns_the_progress_bar_off(recipe: Path) -> None:
    assert False not in list(_settings(yaml.safe_load(recipe.read_text()), "enable_progress_bar"))


def test_the_cli_gives_every_run_our_bar_unless_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["vla-zoo"])
    args = ["--config", str(REPO_ROOT / "recipes" / "minimal.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false"]
    assert isinstance(VLAZooCLI(args=args, run=False).trainer.progress_bar_callback, StepsProgressBar)
    off = VLAZooCLI(args=[*args, "--trainer.enable_progress_bar=false"], run=False)
    assert off.trainer.progress_bar_callback is None


def test_bar_title_counts_epochs_to_max_steps(tmp_path: Path) -> None:
    """16 batches per epoch and max_steps=20: epochs 0 and 1, so "Epoch 0/1" (the stock bar says "Epoch 0/-2")."""
    bar = StepsProgressBar()
    data = SyntheticChunkDataModule(num_samples=512, batch_size=32, horizon=4, max_state_dim=4, max_action_dim=4,
                                    image_size=8)
    from lit_modules.chunk_regressor import StateChunkRegressor
    from components.mlp import MLP

    model = StateChunkRegressor(net=MLP(in_dim=4, hidden_dims=[8], out_dim=16), horizon=4, max_action_dim=4)
    trainer = Trainer(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[bar],
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert trainer.num_training_batches == 16
    assert bar._get_train_description(0).strip() == "Epoch 0/1"


@pytest.fixture
def restore_logging():
    """configure_logging changes process-wide state; put it back for the other tests."""
    import logging

    import rich

    names = ("", "lightning", "lightning.pytorch", "lightning.fabric")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate, logging.getLogger(n).level)
             for n in names}
    yield
    for n, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(n)
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)
    logging.captureWarnings(False)
    rich.reconfigure()


def test_package_info_logs_reach_the_terminal_once(restore_logging, capsys: pytest.CaptureFixture) -> None:
    """configure_logging shows our packages' INFO lines on stderr and routes Lightning's through the same handler."""
    import logging

    from lightning.pytorch import seed_everything

    from datamodules.progress import configure_logging

    configure_logging()
    configure_logging()  # idempotent: a second call adds no second handler
    logging.getLogger("envs.tabletop.pyramid").info("tier robot: 3 of 5 episodes")
    seed_everything(3)
    out = capsys.readouterr()
    assert "tier robot: 3 of 5 episodes" in out.err
    assert out.err.count("Seed set to 3") == 1, out.err
    assert out.out == ""  # stdout is for results (--print_config, JSON summaries)
    # Lightning's own stderr handlers (which pytest's capture cannot see) are gone: its lines print once, via ours.
    assert not any(logging.getLogger(n).handlers for n in ("lightning", "lightning.pytorch", "lightning.fabric"))
