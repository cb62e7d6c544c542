"""Checkpoints load without running code: a crafted pickle is refused by every public way of loading one, with an
error naming the file, and its payload never runs; what our checkpoints legitimately hold still loads."""

from __future__ import annotations

import builtins
from pathlib import Path

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
