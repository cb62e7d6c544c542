"""Every shipped recipe, layered as documented, resumes with `--ckpt_path last`: it keeps last.ckpt in a stable
directory of its own (``<default_root_dir>/checkpoints``), so resuming finds it and no run overwrites another's.

Only ``trainer.default_root_dir`` and ``trainer.callbacks`` are read, layered the way the CLI layers YAML (a later
file's value or list replaces the earlier one), so this checks all recipes in milliseconds."""

from __future__ import annotations

import posixpath

import pytest
import yaml

from tests.conftest import REPO_ROOT

RECIPES = REPO_ROOT / "recipes"
PRE, LAM, MW = "pretrain.yaml", "lam.yaml", ["pretrain.yaml", "metaworld/posttrain_scratch.yaml"]
CONV = ["ablations/composed_backbone.yaml", "ablations/conv_vision.yaml"]
LAM_MOTION = [LAM, "explore/lam/lam_motion_decoder.yaml"]
LAM_CW = [*LAM_MOTION, "explore/lam/lam_change_weighted.yaml"]
MT10 = [*MW, "metaworld/demos50.yaml", *CONV, "explore/metaworld/mt10_conv_ema.yaml"]

#: Each recipe, after the recipes its header says it layers on.
STACKS = {
    "minimal.yaml": [], PRE: [], LAM: [], "idm.yaml": [],
    "posttrain.yaml": [PRE], "pretrain_staged.yaml": [PRE], "n1.yaml": [PRE],
    "groot/n1.yaml": [PRE], "groot/n1_5.yaml": [PRE], "finetune_lora.yaml": [PRE, "posttrain.yaml"],
    "groot/finetune.yaml": [PRE, "groot/n1_5.yaml", "finetune_lora.yaml"],
    "ablations/conv_vision.yaml": [PRE, CONV[0]],
    "ablations/keypoints.yaml": [PRE, *CONV], "ablations/coord_conv.yaml": [PRE, *CONV],
    "explore/lam/lam_motion_decoder.yaml": [LAM],
    "explore/lam/lam_scene_128.yaml": LAM_MOTION, "explore/lam/lam_wide_wrist.yaml": LAM_MOTION,
    "explore/lam/lam_change_weighted.yaml": LAM_MOTION,
    "explore/lam/lam_small_codebook.yaml": LAM_CW, "explore/lam/lam_codebook_64.yaml": LAM_CW,
    "explore/lam/lam_action_supervised.yaml": LAM_CW,
    "explore/lam/lam_fine_patches.yaml": [*LAM_CW, "explore/lam/lam_action_supervised.yaml"],
    "metaworld/posttrain_scratch.yaml": [PRE], "metaworld/mt10.yaml": [PRE],
    "metaworld/cotrain_human.yaml": [*MW, "metaworld/demos50.yaml"],
    "explore/metaworld/dart.yaml": [*MW, "metaworld/demos50.yaml"],
    "explore/metaworld/privileged_aux.yaml": [*MW, "metaworld/demos50.yaml"],
    "explore/metaworld/mt10_conv_ema.yaml": MT10[:-1],
    "explore/metaworld/mt10_conv32.yaml": MT10, "explore/metaworld/mt10_conv32_64.yaml": MT10,
}
#: Not runs of their own: a modifier of whatever recipe it follows, and `lightning predict` (writes no checkpoints).
NOT_RUNS = {"ablations/cached_sources.yaml", "label.yaml", "pyramid/label_neural.yaml"}


def _all_recipes() -> list[str]:
    return sorted(str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml"))


def _stack(recipe: str) -> list[str]:
    default = ([PRE] if recipe.startswith("ablations/") else MW if recipe.startswith(("metaworld/", "explore/metaworld/"))
               else [LAM] if recipe.startswith("explore/lam/") else [])
    return [*STACKS.get(recipe, default), recipe]


def _checkpoint_dirs(stack: list[str]) -> list[tuple[str, dict]]:
    trainer: dict = {}
    for name in stack:
        trainer.update((yaml.safe_load((RECIPES / name).read_text()) or {}).get("trainer") or {})
    root = trainer["default_root_dir"]
    return [(c["init_args"].get("dirpath") or posixpath.join(root, "checkpoints"), c["init_args"])
            for c in trainer.get("callbacks") or [] if c["class_path"].endswith(".ModelCheckpoint")]


@pytest.mark.parametrize("recipe", sorted(set(_all_recipes()) - NOT_RUNS))
def test_recipe_keeps_last_checkpoint_in_a_directory_of_its_own(recipe: str) -> None:
    checkpoints = _checkpoint_dirs(_stack(recipe))
    assert checkpoints, f"{recipe}: no ModelCheckpoint, so `--ckpt_path last` has nothing to resume"
    assert any(args.get("save_last") for _, args in checkpoints), f"{recipe}: no ModelCheckpoint saves last.ckpt"
    base = _stack(recipe)[:-1]
    if base:
        shared = {d for d, _ in checkpoints} & {d for d, _ in _checkpoint_dirs(base)}
        assert not shared, f"{recipe} writes its checkpoints into {shared}, the directory of {base[-1]}"


def test_no_two_runs_share_a_checkpoint_directory() -> None:
    owners: dict[str, str] = {}
    for recipe in sorted(set(_all_recipes()) - NOT_RUNS):
        for directory, _ in _checkpoint_dirs(_stack(recipe)):
            assert directory not in owners, f"{recipe} and {owners[directory]} share {directory}"
            owners[directory] = recipe
