"""recipes/metaworld/*.yaml layer on recipes/pretrain.yaml into runnable configs whose data, slots and heads agree."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# find_spec, not importorskip: importing metaworld imports mujoco, which must come after envs.metaworld sets MUJOCO_GL.
if importlib.util.find_spec("metaworld") is None:
    pytest.skip("Meta-World is in the `sim` extra: pip install -e '.[sim]'", allow_module_level=True)

from envs.metaworld.generate import MetaWorldDemos  # noqa: E402
from vla_zoo.cli import VLAZooCLI  # noqa: E402
from vla_zoo.callbacks import ClosedLoopEvalCallback  # noqa: E402

RECIPES = REPO_ROOT / "recipes"
BASE = ["pretrain.yaml", "metaworld/posttrain_scratch.yaml"]


def _instantiate(overlays: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str,
                 base: list[str] = BASE) -> VLAZooCLI:
    monkeypatch.chdir(tmp_path)  # the recipes' relative run dirs land here, not in the checkout
    args = []
    for name in base + overlays:
        args += ["--config", str(RECIPES / name)]
    args += list(flags)
    monkeypatch.setattr("sys.argv", ["vla-zoo"])  # LightningCLI warns when given both args and a command line
    return VLAZooCLI(args=args, run=False)


def _mismatched_sources(cli: VLAZooCLI) -> list[str]:
    """Sources whose shards the recipe's own preparer does not write (training would find no files)."""
    written = {os.path.normpath(p) for p in cli.datamodule.prepare.sources.values()}
    return [s.name for s in cli.datamodule.sources + cli.datamodule.val_sources
            if os.path.normpath(s.shards) not in written]


@pytest.mark.parametrize("overlays, head, init_from, tiers, episodes", [
    ([], "FlowMatchingActionHead", None, {"robot"}, 10),
    (["ablations/regression_head.yaml"], "RegressionActionHead", None, {"robot"}, 10),
    (["metaworld/posttrain_pretrained.yaml"], "FlowMatchingActionHead", "runs/pretrain/checkpoints/last.ckpt",
     {"robot"}, 10),
    (["metaworld/demos50.yaml"], "FlowMatchingActionHead", None, {"robot"}, 50),
    (["explore/metaworld/demos100.yaml"], "FlowMatchingActionHead", None, {"robot"}, 100),
    (["metaworld/cotrain_human.yaml"], "FlowMatchingActionHead", None, {"robot", "human"}, 10),
    (["metaworld/demos50.yaml", "metaworld/cotrain_human.yaml"], "FlowMatchingActionHead", None, {"robot", "human"},
     50),
])
def test_recipe_instantiates_consistently(overlays, head, init_from, tiers, episodes, tmp_path, monkeypatch) -> None:
    cli = _instantiate(overlays, tmp_path, monkeypatch)
    data, model = cli.datamodule, cli.model
    assert isinstance(data.prepare, MetaWorldDemos)
    assert set(data.prepare.episodes) == tiers and set(data.prepare.episodes.values()) == {episodes}
    assert not _mismatched_sources(cli)
    # Real actions only ever train the Sawyer's slot; the human tier only feeds the latent labeler's own slot.
    assert {s.embodiment for s in data.sources if s.has_action} == {"sawyer"}
    head_config = cli.config.model.init_args.action_head
    assert head_config.class_path.endswith(head)
    num_slots = head_config.init_args.num_embodiments
    assert all(0 <= slot < num_slots for slot in data.embodiments.values())
    for labeler in model.pseudo_labelers:
        assert labeler.embodiment_id not in {data.embodiments[s.embodiment] for s in data.sources if s.has_action}
    assert (model.init_from and model.init_from.path) == init_from
    assert model.init_from is None or list(model.init_from.parts) == ["backbone", "action_head"]
    evals = [c for c in cli.trainer.callbacks if isinstance(c, ClosedLoopEvalCallback)]
    assert len(evals) == 1 and len(evals[0].tasks) == 10


def test_goal_task_probe_trains_on_its_three_tasks_only(tmp_path, monkeypatch) -> None:
    cli = _instantiate(["explore/metaworld/goal_tasks50.yaml"], tmp_path, monkeypatch)
    assert cli.datamodule.prepare.tasks == ["reach-v3", "push-v3", "pick-place-v3"]
    assert cli.datamodule.prepare.episodes == {"robot": 50}
    assert not _mismatched_sources(cli)
    evals = [c for c in cli.trainer.callbacks if isinstance(c, ClosedLoopEvalCallback)]
    assert len(evals) == 1 and evals[0].tasks == ["reach-v3", "push-v3", "pick-place-v3"]


def test_camera_and_augmentation_overlays_reach_the_preparer_and_the_policy(tmp_path, monkeypatch) -> None:
    cli = _instantiate(["metaworld/demos50.yaml", "explore/metaworld/workspace_camera.yaml", "ablations/random_shift.yaml"],
                       tmp_path, monkeypatch)
    assert cli.datamodule.prepare.views["robot"] == ("workspace", "gripper_pov")
    assert not _mismatched_sources(cli)
    assert type(cli.model.image_augmentation).__name__ == "RandomShift" and cli.model.image_augmentation.pad == 4


def test_dart_overlay_reaches_the_preparer_and_trains_on_its_own_cache(tmp_path, monkeypatch) -> None:
    cli = _instantiate(["metaworld/demos50.yaml", "explore/metaworld/dart.yaml"], tmp_path, monkeypatch)
    prepare = cli.datamodule.prepare
    assert prepare.dart_noise == 0.5 and prepare.episodes == {"robot": 50}
    assert not _mismatched_sources(cli)
    clean = _instantiate(["metaworld/demos50.yaml"], tmp_path, monkeypatch).datamodule.prepare
    assert prepare.root != clean.root  # the clean 50-demo cache is not overwritten


def test_privileged_overlay_records_positions_in_its_own_cache_and_adds_the_readout(tmp_path, monkeypatch) -> None:
    cli = _instantiate(["metaworld/demos50.yaml", "explore/metaworld/privileged_aux.yaml"], tmp_path, monkeypatch)
    prepare = cli.datamodule.prepare
    assert prepare.privileged and prepare.episodes == {"robot": 50}
    assert not _mismatched_sources(cli)
    clean = _instantiate(["metaworld/demos50.yaml"], tmp_path, monkeypatch).datamodule.prepare
    assert prepare.root != clean.root  # the plain 50-demo cache is not overwritten
    model = cli.model
    model.configure_model()
    # The readout reads the backbone's tokens and predicts what the generator records (object xyz + goal xyz).
    assert model.privileged_head.attention.embed_dim == model.backbone.out_dim
    assert model.privileged_head.out_dim == 6


def test_sources_follow_the_preparers_root_in_any_order(tmp_path, monkeypatch) -> None:
    """The sources name their shards through ${data.init_args.prepare.init_args.root}: an overlay that moves the
    demos (demos50.yaml) moves every source, whichever overlay states the sources, and so does a flag."""
    for overlays in (["metaworld/demos50.yaml", "metaworld/cotrain_human.yaml"],
                     ["metaworld/cotrain_human.yaml", "metaworld/demos50.yaml"]):
        cli = _instantiate(overlays, tmp_path, monkeypatch)
        assert not _mismatched_sources(cli) and cli.datamodule.prepare.episodes == {"robot": 50, "human": 50}
    cli = _instantiate([], tmp_path, monkeypatch, "--data.init_args.prepare.init_args.root=/data/mw")
    assert {s.shards for s in cli.datamodule.sources + cli.datamodule.val_sources} == {"/data/mw/metaworld_robot"}


def test_mt10_is_one_overlay_equal_to_the_benchmarked_chain(tmp_path, monkeypatch) -> None:
    """recipes/metaworld/mt10.yaml on pretrain.yaml resolves to the config of the seven-file chain it replaces."""
    same_dir = ["--trainer.default_root_dir=runs/x"]
    one = _instantiate(["metaworld/mt10.yaml"], tmp_path, monkeypatch, *same_dir, base=["pretrain.yaml"])
    chain = _instantiate(["metaworld/demos50.yaml", "ablations/composed_backbone.yaml", "ablations/conv_vision.yaml",
                          "explore/metaworld/mt10_conv_ema.yaml", "explore/metaworld/mt10_conv32_64.yaml"],
                         tmp_path, monkeypatch, *same_dir)
    assert one.config.as_dict() == chain.config.as_dict()
    assert not _mismatched_sources(one) and one.datamodule.prepare.episodes == {"robot": 50}


def test_best_mt10_recipe_is_the_benchmarked_one(tmp_path, monkeypatch) -> None:
    """mt10_conv_ema.yaml must train what benchmarks/metaworld_posttrain.sh's `flow_conv_ema 0 30000 50` trained."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    cli = _instantiate(["metaworld/demos50.yaml", "ablations/composed_backbone.yaml", "ablations/conv_vision.yaml",
                        "explore/metaworld/mt10_conv_ema.yaml"], tmp_path, monkeypatch)
    assert cli.datamodule.prepare.episodes == {"robot": 50} and not _mismatched_sources(cli)
    assert cli.config.model.init_args.backbone.init_args.vision_model_type == "resnet"
    assert cli.trainer.max_steps == 30000
    first = lambda kind: next(i for i, c in enumerate(cli.trainer.callbacks) if isinstance(c, kind))  # noqa: E731
    # The rollouts score the averaged weights only if the evaluation callback comes before the averaging one.
    assert first(ClosedLoopEvalCallback) < first(EMAWeightAveraging)
    (ema_config,) = [c for c in cli.config.trainer.callbacks if c.class_path.endswith("EMAWeightAveraging")]
    assert ema_config.init_args.decay == 0.999
    (evaluation,) = [c for c in cli.trainer.callbacks if isinstance(c, ClosedLoopEvalCallback)]
    assert len(evaluation.tasks) == 10 and evaluation.episodes_per_task == 10 and evaluation.seed == 1000
    # One rollout, after the last of the four validations (every 7,500 of 30,000 steps).
    assert cli.trainer.max_steps // cli.trainer.val_check_interval == evaluation.every_n_val_epochs
    assert any(isinstance(c, ModelCheckpoint) and c.save_last for c in cli.trainer.callbacks)


@pytest.mark.parametrize(
    ("recipe", "width", "steps"),
    [("mt10_conv32", 32, 27500),  # TAG=w32_nodrop ... 27500 50 ... vision_hidden_size=32
     ("mt10_conv32_64", [32, 64], 26500)],  # TAG=w3264_nodrop ... 26500 50 ... vision_hidden_size=[32,64]
)
def test_hour_recipe_for_slow_cpus_is_the_benchmarked_one(recipe, width, steps, tmp_path, monkeypatch) -> None:
    """Each slow-CPU hour recipe must train what its benchmarked `flow_conv_ema 0 STEPS 50` run's overrides trained."""
    cli = _instantiate(["metaworld/demos50.yaml", "ablations/composed_backbone.yaml", "ablations/conv_vision.yaml",
                        "explore/metaworld/mt10_conv_ema.yaml", f"explore/metaworld/{recipe}.yaml"], tmp_path, monkeypatch)
    assert not _mismatched_sources(cli)
    assert cli.config.model.init_args.backbone.init_args.vision_hidden_size == width
    assert cli.config.model.init_args.action_head.init_args.dropout == 0.0
    assert cli.trainer.max_steps == steps
    (evaluation,) = [c for c in cli.trainer.callbacks if isinstance(c, ClosedLoopEvalCallback)]
    # The rollouts fire at the last validation, not never (7,500-step validations would stop at three).
    assert cli.trainer.max_steps // cli.trainer.val_check_interval == evaluation.every_n_val_epochs
    assert cli.trainer.max_steps % cli.trainer.val_check_interval == 0
    # Its checkpoints and logs do not overwrite those of mt10_conv_ema.yaml or of the other hour recipe.
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vla_zoo.cli import default_checkpoint_dirs
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    (directory,) = default_checkpoint_dirs(cli.trainer)  # <default_root_dir>/checkpoints, as the CLI sets it
    assert Path(directory).parent.name == recipe and checkpoint.save_last
    assert Path(cli.trainer.logger.save_dir).name == recipe
