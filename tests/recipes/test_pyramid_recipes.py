"""recipes/pyramid/*.yaml: the tier study's stages instantiate, read what their preparers write, and share one model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from vla_zoo.cli import VLAZooCLI

RECIPES = REPO_ROOT / "recipes" / "pyramid"
POLICY = ["scratch", "pretrain_sim", "pretrain_latent", "pretrain_idm", "posttrain"]


def _instantiate(stem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> VLAZooCLI:
    monkeypatch.chdir(tmp_path)  # the recipes' relative run dirs land here, not in the checkout
    monkeypatch.setattr("sys.argv", ["vla-zoo"])
    return VLAZooCLI(args=["--config", str(RECIPES / f"{stem}.yaml")], run=False)


def _unprepared(cli: VLAZooCLI) -> list[str]:
    written = {os.path.normpath(p) for p in
               [*cli.datamodule.prepare.sources.values(), *cli.datamodule.prepare.heldout_sources.values()]}
    return [s.name for s in cli.datamodule.sources + cli.datamodule.val_sources
            if os.path.normpath(s.shards) not in written]


@pytest.mark.parametrize("stem", [*POLICY, "idm"])
def test_stage_reads_what_its_preparer_writes(stem, tmp_path, monkeypatch):
    cli = _instantiate(stem, tmp_path, monkeypatch)
    # the IDM labels (written by label_neural.yaml) are the only source no preparer writes
    assert _unprepared(cli) == (["neural_idm"] if stem == "pretrain_idm" else [])
    assert cli.datamodule.val_sources, "every stage validates on a held-out split"
    if stem != "idm":
        assert cli.datamodule.prepare.episodes["sim"] == 3000 and cli.datamodule.prepare.root.name == "tabletop_large"


def test_policy_stages_share_one_architecture_and_slot_map(tmp_path, monkeypatch):
    """Any pretraining checkpoint post-trains with posttrain.yaml: same backbone and head, same embodiment slots."""
    configs = {stem: yaml.safe_load((RECIPES / f"{stem}.yaml").read_text()) for stem in POLICY}
    for key in ("action_head", "backbone"):
        shapes = {stem: {k: v for k, v in c["model"]["init_args"][key]["init_args"].items() if k != "tune_llm"}
                  for stem, c in configs.items()}
        assert all(s == shapes["posttrain"] for s in shapes.values()), key
    assert len({str(c["data"]["init_args"]["embodiments"]) for c in configs.values()}) == 1
    tune_llm = {stem: c["model"]["init_args"]["backbone"]["init_args"]["tune_llm"] for stem, c in configs.items()}
    assert tune_llm == {"scratch": True, "pretrain_sim": True, "pretrain_latent": True, "pretrain_idm": True,
                        "posttrain": False}
    cli = _instantiate("pretrain_latent", tmp_path, monkeypatch)
    assert [labeler.embodiment_id for labeler in cli.model.pseudo_labelers] == [cli.datamodule.embodiments["latent"]]
    assert {s.name for s in cli.datamodule.sources if not s.has_action} == {"human", "neural"}
    # the IDM stage, the labelling and the pretraining on its labels agree on paths
    label = yaml.safe_load((RECIPES / "label_neural.yaml").read_text())
    labeler = label["model"]["init_args"]["labelers"][0]["init_args"]
    assert labeler["checkpoint"] == "runs/pyramid/idm/checkpoints/last.ckpt"
    assert label["data"]["init_args"]["source"] == ".cache/vla_zoo/tabletop_large/neural"
    idm_source = next(s for s in configs["pretrain_idm"]["data"]["init_args"]["sources"] if s["name"] == "neural_idm")
    assert idm_source["shards"] == label["model"]["init_args"]["output_dir"] + "/neural_idm_point_gripper"
