"""Checkpoints load without running code: a crafted pickle is refused by every public way of loading one, with an
error naming the file, and its payload never runs; what our checkpoints legitimately hold still loads."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lit_modules.checkpoint import (CONFIG_KEY, MIXTURE_STATE_KEY, UnsafeCheckpointError, load_module,
                                    load_run_config, read_checkpoint)
from tests.conftest import REPO_ROOT

MINIMAL = str(REPO_ROOT / "recipes" / "minimal.yaml")


class Payload:
    """Unpickling this writes ``marker``: what an attacker's checkpoint would do with any other code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture
def malicious(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint that looks like a minimal.yaml run (embedded recipe, state dict) with a payload inside."""
    marker, path = tmp_path / "payload_ran", tmp_path / "evil.ckpt"
    config = {"model": {"class_path": "lit_modules.chunk_regressor.StateChunkRegressor", "init_args": {}}}
    torch.save({"state_dict": {"net.0.weight": torch.zeros(2, 2)}, CONFIG_KEY: yaml.safe_dump(config),
                "hyper_parameters": {"lr": Payload(marker)}}, path)
    return path, marker


def test_the_payload_runs_under_a_plain_pickle_load(malicious) -> None:
    """The fixture is a real attack: a load with weights_only=False runs it."""
    path, marker = malicious
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def _refused(call, path: Path, marker: Path, error=UnsafeCheckpointError) -> None:
    with pytest.raises(error) as info:
        call()
    assert str(path) in str(info.value) and "`exec`" in str(info.value), info.value
    assert not marker.exists(), "the checkpoint's code ran"


def test_every_loader_refuses_a_malicious_checkpoint_without_running_it(malicious, tmp_path) -> None:
    import argparse

    from lit_modules.chunk_regressor import StateChunkRegressor
    from lit_modules.labeling import CheckpointIDMLabeler, CheckpointLatentActionLabeler
    from lit_modules.vla_policy import VLAPolicy
    from vla_zoo.deploy import server
    from vla_zoo.deploy.loading import policy_from_args
    from vla_zoo.policy import Policy

    path, marker = malicious
    _refused(lambda: read_checkpoint(path), path, marker)
    _refused(lambda: load_run_config(path), path, marker)
    _refused(lambda: load_module(StateChunkRegressor, path), path, marker)
    _refused(lambda: Policy.from_checkpoint(path), path, marker)
    args = argparse.Namespace(checkpoint=str(path), replay=None, policy=None, policy_kwargs="{}")
    _refused(lambda: policy_from_args(args), path, marker)
    _refused(lambda: server.main(["--checkpoint", str(path), "--port", "0"]), path, marker)
    policy = VLAPolicy(backbone=torch.nn.Identity(), action_head=torch.nn.Identity())
    _refused(lambda: policy._load_initial_weights(str(path)), path, marker)
    _refused(lambda: CheckpointLatentActionLabeler(checkpoint=str(path)), path, marker)
    _refused(lambda: CheckpointIDMLabeler(checkpoint=str(path), embodiment="point_gripper"), path, marker)
    from vla_zoo.groot.cli import main as groot_main

    assert groot_main(["export", str(path), str(tmp_path / "out")]) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_resuming_from_a_malicious_checkpoint_is_refused(malicious, tmp_path) -> None:
    from vla_zoo.cli import main

    path, marker = malicious
    args = ["fit", "--config", MINIMAL, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false", "--trainer.callbacks=[]", f"--ckpt_path={path}"]
    _refused(lambda: main(args), path, marker)


def test_the_allow_list_admits_paths_and_nothing_else_is_needed_by_cli_checkpoints(tmp_path) -> None:
    path = tmp_path / "paths.ckpt"
    torch.save({"hyper_parameters": {"init_from": Path("runs/pretrain/last.ckpt")}, "state_dict": {}}, path)
    with pytest.raises(Exception):  # torch's own default list has no paths
        torch.load(path, weights_only=True)
    assert read_checkpoint(path)["hyper_parameters"]["init_from"] == Path("runs/pretrain/last.ckpt")
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ValueError, match="notes.ckpt"):
        read_checkpoint(not_a_checkpoint)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_the_mixture_state_key_is_the_datamodule_name() -> None:
    from datamodules.mixture import MixtureDataModule

    assert MixtureDataModule.__qualname__ == MIXTURE_STATE_KEY  # Lightning stores datamodule state under it


# A VLAPolicy as a recipe writes it today, and the same model in the layout checkpoints had before its arguments
# were grouped (head, schedule, frame and augmentation at the top level) and the callbacks moved.
TINY_POLICY = {
    "backbone": {"class_path": "components.backbones.SmolVLMBackbone", "init_args": {
        "select_layer": 1, "project_to": 32, "image_size": 32, "patch_size": 8, "vision_hidden_size": 32,
        "vision_layers": 1, "vision_heads": 2, "lm_hidden_size": 32, "lm_layers": 1, "lm_heads": 2}},
    "action_head": {"class_path": "components.action_head.FlowMatchingActionHead", "init_args": {
        "num_embodiments": 1, "max_state_dim": 4, "max_action_dim": 4, "horizon": 4, "hidden_dim": 32,
        "num_layers": 1, "num_heads": 2, "cross_attention_dim": 32, "embodiment_hidden_dim": 32}},
}
OLD_LAYOUT = {"warmup_ratio": 0.1, "lr_schedule": "linear", "frame_index": 0, "use_vl_mask": False,
              "init_from": "pre.ckpt", "init_from_parts": ["backbone"], "image_augmentation": None,
              "privileged_head": None, "privileged_loss_weight": 1.0, "compile_backend": None}
OLD_CALLBACKS = [{"class_path": "datamodules.mixture.MixtureMonitor", "init_args": {"log_every_n_steps": 5}},
                 {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}]


def test_a_checkpoint_in_the_old_layout_loads_and_predicts_the_same_actions(tmp_path) -> None:
    from lightning.pytorch.cli import instantiate_module

    from datamodules.normalization import Normalizer
    from datamodules.spec import DataSpec
    from lit_modules.checkpoint import DATA_SPEC_KEY, upgrade_run_config
    from lit_modules.optimization import LRSchedule
    from lit_modules.vla_policy import InitFrom, VLAPolicy
    from tests.vla_zoo.policy_fixtures import make_observation
    from vla_zoo.cli import VLAZooCLI
    from vla_zoo.policy import Policy

    policy_path = "lit_modules.vla_policy.VLAPolicy"
    old_args = {**TINY_POLICY, **OLD_LAYOUT}
    new = upgrade_run_config({"model": {"class_path": policy_path, "init_args": old_args},
                              "trainer": {"callbacks": OLD_CALLBACKS}})
    assert new["trainer"]["callbacks"][0]["class_path"] == "vla_zoo.callbacks.MixtureMonitor"
    assert new["trainer"]["callbacks"][1] == OLD_CALLBACKS[1]
    new_args = new["model"]["init_args"]
    assert new_args == {**TINY_POLICY, "privileged_head": None,
                        "action_head": {**TINY_POLICY["action_head"], "init_args": {
                            **TINY_POLICY["action_head"]["init_args"], "use_vl_mask": False}},
                        "lr_schedule": {"kind": "linear", "warmup_ratio": 0.1},
                        "observation": {"frame_index": 0, "augmentation": None},
                        "init_from": {"path": "pre.ckpt", "parts": ["backbone"]}}
    assert upgrade_run_config(new) == new  # today's layout passes unchanged

    # The model today's code builds from the upgraded config, saved as the CLI saved it in the old layout.
    torch.manual_seed(0)
    model = instantiate_module(VLAPolicy, {**new_args, "init_from": None})
    model.configure_model()
    normalizer = Normalizer({"state": {"min": [-1.0] * 3, "max": [1.0] * 3},
                             "actions": {"min": [-1.0] * 3, "max": [1.0] * 3}})
    model.data_spec = DataSpec.from_dict({
        "embodiments": {"point_gripper": {"id": 0, "state_dim": 3, "action_dim": 3, "has_action": True,
                                          "normalizer": normalizer.to_dict(), "modality": None}},
        "views": ["scene", "wrist"], "image_size": [32, 32], "horizon": 4, "max_state_dim": 4, "max_action_dim": 4,
    })
    old_args["init_from"] = None
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": model.state_dict(), DATA_SPEC_KEY: model.data_spec.to_dict(),
                "pytorch-lightning_version": "2.5.0",
                CONFIG_KEY: yaml.safe_dump({"model": {"class_path": policy_path, "init_args": old_args},
                                            "trainer": {"callbacks": OLD_CALLBACKS}}),
                "hyper_parameters": {"_class_path": policy_path, **old_args,
                                     "_instantiator": "lightning.pytorch.cli.instantiate_module"}}, path)
    assert load_run_config(path)["trainer"]["callbacks"][0]["class_path"] == "vla_zoo.callbacks.MixtureMonitor"

    loaded = Policy.from_checkpoint(path).module
    assert loaded.action_head.use_vl_mask is False and loaded.lr_schedule == LRSchedule("linear", 0.1)
    observation = make_observation(np.random.default_rng(0), image_size=32)
    observation["state"] = observation["state"][:3]
    expected = Policy(model, seed=3).get_action(observation)["actions"]
    np.testing.assert_array_equal(Policy(loaded, seed=3).get_action(observation)["actions"], expected)

    # `--ckpt_path` (validate, resume) puts the checkpoint's arguments into the run's config the same way.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"class_path": policy_path, "init_args": TINY_POLICY},
                                      "data": {"class_path": "datamodules.synthetic.SyntheticChunkDataModule"},
                                      "trainer": {"logger": False, "enable_checkpointing": False,
                                                  "limit_val_batches": 0, "enable_progress_bar": False}}))
    cli = VLAZooCLI(args=["validate", "--config", str(recipe), "--ckpt_path", str(path)])
    assert cli.model.lr_schedule == LRSchedule("linear", 0.1) and cli.model.init_from is None
    assert cli.config.validate.model.init_args.action_head.init_args.use_vl_mask is False
    assert InitFrom("x").parts == ("backbone", "action_head")
