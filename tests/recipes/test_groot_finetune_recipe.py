"""The README's GR00T workflow end to end at tiny sizes: a LeRobot dataset converted by ``datamodules.lerobot``, a
GR00T checkpoint imported with its recipe, a LoRA fine-tune through ``recipes/groot/finetune.yaml``, the fine-tuned
checkpoint served as a policy and exported back to the reference layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.datamodules.test_lerobot import make_episodes, write_v21
from tests.vla_zoo import groot_synthetic

RECIPES = REPO_ROOT / "recipes"


@pytest.mark.slow  # a 2-step Lightning fit through the CLI: ~15-30 s on a loaded 2-core machine
def test_import_finetune_with_lora_on_a_lerobot_dataset_serve_and_export(tmp_path, monkeypatch: pytest.MonkeyPatch):
    from datamodules.lerobot import convert_lerobot
    from vla_zoo.cli import VLAZooCLI
    from vla_zoo.groot.cli import main as groot
    from vla_zoo.policy import Policy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["vla-zoo"])
    dataset = write_v21(tmp_path / "ds", make_episodes())
    (dataset / "meta/modality.json").write_text(json.dumps({  # GR00T's layout of the dataset's vectors
        "state": {"single_arm": {"start": 0, "end": 3}, "gripper": {"start": 3, "end": 4}},
        "action": {"single_arm": {"start": 0, "end": 2}, "gripper": {"start": 2, "end": 3}},
        "video": {"front": {"original_key": "observation.images.top"},
                  "wrist": {"original_key": "observation.images.wrist"}}}))
    convert_lerobot(dataset, tmp_path / "data/shards/my_robot", embodiment="my_robot", horizon=4, image_size=16)
    groot_synthetic.write(tmp_path / "gr00t", "gr00t_n1_5")
    assert groot(["import", str(tmp_path / "gr00t"), "gr00t.ckpt", "--recipe", "gr00t.yaml",
                  "--eagle-config", str(tmp_path / "gr00t/eagle_config.json")]) == 0

    configs = [RECIPES / "pretrain.yaml", RECIPES / "groot/n1_5.yaml", tmp_path / "gr00t.yaml",
               RECIPES / "finetune_lora.yaml", RECIPES / "groot/finetune.yaml"]
    tiny = ["--data.init_args.horizon=4", "--data.init_args.max_state_dim=6", "--data.init_args.max_action_dim=6",
            "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", "--data.init_args.batches_per_epoch=2",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
            "--trainer.precision=32-true", "--trainer.max_steps=2", "--trainer.val_check_interval=null",
            "--trainer.limit_val_batches=0", "--model.init_args.action_head.init_args.gradient_checkpointing=false"]
    cli = VLAZooCLI(args=["fit", *[a for c in configs for a in ("--config", str(c))], *tiny])
    trainable = [n for n, p in cli.model.named_parameters() if p.requires_grad]
    assert any(".lora_" in n and "language_model" in n for n in trainable)
    assert not any(n.startswith("backbone.language_model") and ".lora_" not in n for n in trainable)

    ckpt = tmp_path / "runs/groot_finetune/checkpoints/last.ckpt"
    policy = Policy.from_checkpoint(ckpt)
    meta = policy.metadata()["embodiments"]["my_robot"]
    assert meta["state_dim"] == 4 and meta["action_dim"] == 3 and meta["image_keys"] == ["front", "wrist"]
    rng = np.random.default_rng(0)
    observation = {"embodiment": "my_robot", "instruction": "pick the red block", "state": np.zeros(4, np.float32),
                   "images": {v: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for v in ("front", "wrist")}}
    assert policy.get_action(observation)["actions"].shape == (4, 3)

    assert groot(["export", str(ckpt), "exported"]) == 0
    metadata = json.loads((tmp_path / "exported/experiment_cfg/metadata.json").read_text())
    assert list(metadata) == ["new_embodiment"]  # slot 31
    assert list(metadata["new_embodiment"]["statistics"]["state"]) == ["single_arm", "gripper"]
    assert torch.load(ckpt, weights_only=True)["vla_zoo_data_spec"]["embodiments"]["my_robot"]["id"] == 31
