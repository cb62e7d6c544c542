"""Recipes state each number once: consumers refer to it (${...}, resolved after every file and flag is merged), so
one edit, in a recipe, an overlay or on the command line, reaches every consumer. Headers stay at three lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from vla_zoo.cli import main

RECIPES = REPO_ROOT / "recipes"


def _config(capsys: pytest.CaptureFixture, *args: str) -> dict:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    out = capsys.readouterr()
    assert exit_info.value.code in (0, None), out.err[-3000:]
    return yaml.safe_load(out.out)


def test_one_flag_changes_every_consumer_of_pretrain(capsys, tmp_path) -> None:
    config = _config(
        capsys, "--config", str(RECIPES / "pretrain.yaml"), "--data.init_args.horizon=8",
        "--data.init_args.max_state_dim=6", "--data.init_args.max_action_dim=7",
        "--model.init_args.backbone.init_args.project_to=96", "--model.init_args.backbone.init_args.image_size=32",
        f"--trainer.default_root_dir={tmp_path}/run", "--data.init_args.prepare.init_args.root=/data/pyramid",
    )
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    head = model["action_head"]["init_args"]
    assert (head["horizon"], head["max_state_dim"], head["max_action_dim"], head["cross_attention_dim"]) == (8, 6, 7, 96)
    (labeler,) = model["pseudo_labelers"]
    lam = labeler["init_args"]["model"]["init_args"]
    assert lam["num_latent_tokens"] == 8 and lam["image_size"] == 32
    assert labeler["init_args"]["embodiment_id"] == data["embodiments"]["latent"]
    assert {s["shards"] for s in data["sources"]} == {f"/data/pyramid/{t}" for t in
                                                      ("robot", "robot_b", "sim", "human", "neural")}
    assert trainer["logger"]["init_args"]["save_dir"] == f"{tmp_path}/run"  # checkpoints: <default_root_dir>/checkpoints


def test_an_overlay_that_changes_a_number_moves_its_consumers(capsys, tmp_path) -> None:
    """Resolution happens after layering: an overlay stating only data.init_args.horizon reaches the base's head, and
    posttrain.yaml's own run directory reaches the logger pretrain.yaml states."""
    overlay = tmp_path / "short.yaml"
    overlay.write_text("data:\n  init_args:\n    horizon: 4\n")
    config = _config(capsys, "--config", str(RECIPES / "pretrain.yaml"), "--config", str(RECIPES / "posttrain.yaml"),
                     "--config", str(overlay))
    assert config["model"]["init_args"]["action_head"]["init_args"]["horizon"] == 4
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == "runs/posttrain"
    assert config["data"]["init_args"]["sources"][0]["shards"] == ".cache/vla_zoo/tabletop/robot"


def test_idm_horizon_is_one_number_for_pyramid_data_and_head(capsys) -> None:
    config = _config(capsys, "--config", str(RECIPES / "idm.yaml"), "--data.init_args.horizon=16",
                     "--data.init_args.prepare.init_args.root=.cache/vla_zoo/tabletop_idm_h16")
    data = config["data"]["init_args"]
    head = config["model"]["init_args"]["model"]["init_args"]["action_head"]["init_args"]
    assert data["prepare"]["init_args"]["horizon"] == head["horizon"] == 16
    assert [s["shards"] for s in data["val_sources"]] == [".cache/vla_zoo/tabletop_idm_h16/heldout/robot"]


@pytest.mark.parametrize("recipe", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_headers_are_at_most_three_lines(recipe: Path) -> None:
    lines = recipe.read_text().splitlines()
    header = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    assert 1 <= header <= 3, f"{recipe}: a {header}-line header; say what it runs and how, in three lines"
