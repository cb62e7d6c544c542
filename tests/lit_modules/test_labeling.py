"""The Lightning side of labelling: labellers rebuilt from checkpoints label as the trained models do, and offline
labelling writes shards that carry exactly the labeller's per-step labels as actions, say where they came from, and
read back through the mixture as an ordinary source with actions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
import yaml
from torch import nn
from vector_quantize_pytorch import FSQ

from components.action_head import FlowMatchingActionHead
from components.inverse_dynamics import FramePairEncoder, InverseDynamicsModel
from components.latent_action import LatentActionModel
from components.pseudo_labels import LatentActionLabeler
from datamodules import schema
from datamodules.episodes import EpisodeDataModule
from datamodules.episode import episode_frames
from datamodules.mixture import MixtureDataModule
from datamodules.shards import read_episodes
from envs.tabletop import TabletopPyramid
from lit_modules.labeling import CheckpointIDMLabeler, CheckpointLatentActionLabeler, PseudoLabelWriter

H, A = 8, 4
LATENT_SLOT = 3


class FakeLabeler(nn.Module):
    """Deterministic: the label of step s is the mean colour of frames s and min(s + H, T - 1) of the first view."""

    kind, label_embodiment, checkpoint, horizon, frozen = "fake", "fake_labels", "fake.ckpt", H, True

    def label_steps(self, frames: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
        T = frames.shape[0]
        future = (torch.arange(T) + H).clamp(max=T - 1)
        colour = frames[:, 0].float().mean((-1, -2)) / 255  # [T, 3]
        return torch.cat([colour, colour[future]], 1).numpy(), [f"c{i}" for i in range(6)]


@pytest.fixture(scope="module")
def neural(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pyramid")
    TabletopPyramid(root=str(root), image_size=32, horizon=H, num_workers=1,
                    episodes={"robot": 0, "robot_b": 0, "sim": 0, "human": 0, "neural": 4}).prepare()
    return root / "neural"


def label(source: Path, out: Path, labelers) -> PseudoLabelWriter:
    writer = PseudoLabelWriter(labelers, output_dir=str(out), batch_size=16)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=out).predict(writer, EpisodeDataModule(str(source)), return_predictions=False)
    return writer


def test_written_actions_are_the_labellers_predictions(neural, tmp_path) -> None:
    fake = FakeLabeler()
    writer = label(neural, tmp_path, [fake])
    out = tmp_path / "neural_fake_labels"
    meta = json.loads((out / "source.json").read_text())
    assert meta["embodiment"] == "fake_labels" and meta["has_action"] and meta["horizon"] == H
    assert meta["pseudo_labels"]["checkpoint"] == "fake.ckpt" and meta["pseudo_labels"]["from_source"] == "neural"
    assert writer.written["fake_labels"]["samples"] == meta["samples"]
    originals, labelled = list(read_episodes(neural)), list(read_episodes(out))
    assert len(labelled) == len(originals) == 4
    for orig, new in zip(originals, labelled):
        expected, _ = fake.label_steps(episode_frames(orig.frames))
        np.testing.assert_allclose(new.actions, expected, rtol=0, atol=1e-6)
        assert new.instruction == orig.instruction and new.state is None

    # A later recipe reads the labels as a normal source with actions: each sample's chunk is a_t .. a_{t+H-1}.
    data = MixtureDataModule(sources=[{"name": "neural_fake", "shards": str(out), "embodiment": "fake_labels",
                                       "targets": ["action"]}],
                             embodiments={"fake_labels": 0}, horizon=H, max_state_dim=2, max_action_dim=6,
                             batch_size=8, batches_per_epoch=2, seed=0)
    batch = next(iter(data.train_dataloader()))
    actions = data.normalizers["fake_labels"].unnormalize(batch[schema.ACTIONS], "actions")
    for i in range(8):
        ep, t = int(batch[schema.EPISODE][i]), int(batch[schema.STEP][i])
        real = batch[schema.ACTION_MASK][i, :, 0]  # steps before the episode end
        np.testing.assert_allclose(actions[i][real].numpy(), labelled[ep].actions[t:t + H][: int(real.sum())],
                                   atol=1e-5)
    assert batch[schema.HAS_ACTION].all()


def test_latent_labels_are_the_lams_latents(neural, tmp_path) -> None:
    torch.manual_seed(0)
    lam = LatentActionModel(image_size=32, patch_size=8, num_views=1, width=32, depth=1, heads=2,
                            num_latent_tokens=2, latent_dim=3)
    lam.fit_target_stats(torch.randn(8, 2, 3))
    labeler = LatentActionLabeler(model=lam, horizon=H, view_indices=[1])
    label(neural, tmp_path, [labeler])
    episode = next(read_episodes(tmp_path / "neural_latent"))
    source = next(read_episodes(neural))
    frames = episode_frames(source.frames)[:, 1].float() / 255  # the wrist view
    T = len(frames)
    with torch.no_grad():
        expected = lam.encode(frames, frames[(torch.arange(T) + H).clamp(max=T - 1)]).flatten(1)
    np.testing.assert_allclose(episode.actions, expected.numpy(), atol=1e-5)
    assert episode.embodiment == "latent"


def test_writer_refuses_co_trained_and_duplicate_labelers() -> None:
    lam = LatentActionModel(image_size=32, patch_size=8, num_views=1, width=32, depth=1, heads=2,
                            num_latent_tokens=2, latent_dim=3)
    with pytest.raises(ValueError, match="checkpoint"):
        PseudoLabelWriter([LatentActionLabeler(model=lam, co_train=True)])
    with pytest.raises(ValueError, match="label_embodiment"):
        PseudoLabelWriter([FakeLabeler(), FakeLabeler()])


# ---------------------------------------------------------------------------------------------- checkpoints
def _cli_like_checkpoint(path: Path, module_class: str, model_config: dict, model: torch.nn.Module, extra: dict) -> None:
    """What the vla-zoo CLI writes: the state dict and the resolved recipe embedded as YAML."""
    config = {"model": {"class_path": module_class, "init_args": {"model": model_config, **extra.pop("init_args", {})}}}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {}, "vla_zoo_config": yaml.safe_dump(config), **extra}, path)


def test_frozen_lam_loads_from_a_lam_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    init = dict(image_size=32, patch_size=8, num_views=1, width=32, depth=1, heads=2, num_latent_tokens=8, latent_dim=4)
    lam = LatentActionModel(**init, quantizer=FSQ(levels=[5, 5, 5, 5]))
    lam.fit_target_stats(torch.randn(16, 8, 4))
    _cli_like_checkpoint(tmp_path / "lam.ckpt", "lit_modules.latent_action.LatentActionModule",
                         {"class_path": "components.latent_action.LatentActionModel", "init_args": init}, lam,
                         {"init_args": {"quantizer": {"class_path": "vector_quantize_pytorch.FSQ",
                                                      "init_args": {"levels": [5, 5, 5, 5]}},
                                        "view_indices": [1], "horizon": H}})
    labeler = CheckpointLatentActionLabeler(str(tmp_path / "lam.ckpt"), embodiment_id=LATENT_SLOT)
    assert labeler.view_indices == [1] and labeler.horizon == H and labeler.model.quantizer is not None
    images = torch.randint(0, 256, (3, 2, 2, 3, 32, 32), dtype=torch.uint8)
    batch = {schema.IMAGES: images, schema.ACTIONS: torch.zeros(3, H, A)}
    out = labeler.targets(batch, torch.tensor([True, False, True]))
    frames = images[[0, 2]][:, :, 1].float() / 255
    with torch.no_grad():
        expected = lam.eval().latent_action_target(frames[:, 0], frames[:, 1])
    assert torch.allclose(out.actions, expected, atol=1e-5)


def test_idm_labeler_loads_from_an_idm_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    enc = dict(image_size=32, patch_size=8, num_views=2, width=32, num_layers=1, num_heads=2)
    head = dict(num_embodiments=1, max_state_dim=4, max_action_dim=A, horizon=H, hidden_dim=32, num_layers=1,
                num_heads=2, cross_attention_dim=32, embodiment_hidden_dim=32)
    idm = InverseDynamicsModel(FramePairEncoder(**enc), FlowMatchingActionHead(**head)).eval()
    config = {"class_path": "components.inverse_dynamics.InverseDynamicsModel", "init_args": {
        "encoder": {"class_path": "components.inverse_dynamics.FramePairEncoder", "init_args": enc},
        "action_head": {"class_path": "components.action_head.FlowMatchingActionHead", "init_args": head}}}
    stats = {"min": [-1, -1, 0], "max": [1, 1, 1], "mean": [0, 0, .5], "std": [1, 1, .5], "q01": [-1, -1, 0],
             "q99": [1, 1, 1]}
    from datamodules.normalization import Normalizer

    normalizer = Normalizer({"state": None, "actions": stats}).to_dict()
    _cli_like_checkpoint(tmp_path / "idm.ckpt", "lit_modules.inverse_dynamics.InverseDynamicsModule", config, idm,
                         {"MixtureDataModule": {"embodiments": {"point_gripper": 0},
                                                "normalizers": {"point_gripper": normalizer},
                                                "modalities": {"point_gripper": {"action_names": ["dx", "dy", "grip"]}}}})
    labeler = CheckpointIDMLabeler(checkpoint=str(tmp_path / "idm.ckpt"), embodiment="point_gripper", embodiment_id=3, num_steps=2)
    assert labeler.action_dim == 3 and labeler.action_names == ["dx", "dy", "grip"]
    images = torch.randint(0, 256, (2, 2, 2, 3, 32, 32), dtype=torch.uint8)
    out = labeler.targets({schema.IMAGES: images, schema.ACTIONS: torch.zeros(2, H, A)}, torch.tensor([True, True]))
    expected = idm.predict(images[:, 0], images[:, 1], num_steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.actions[..., :3], expected[..., :3]) and (out.actions[..., 3] == 0).all()
    assert out.action_mask[..., :3].all() and not out.action_mask[..., 3].any()
    again = labeler.targets({schema.IMAGES: images, schema.ACTIONS: torch.zeros(2, H, A)}, torch.tensor([True, True]))
    assert torch.equal(out.actions, again.actions), "labels must not depend on the call (fixed noise seed)"
    averaged = CheckpointIDMLabeler(checkpoint=str(tmp_path / "idm.ckpt"), embodiment="point_gripper", embodiment_id=3,
                          num_steps=2, num_samples=4)
    mean = averaged.targets({schema.IMAGES: images, schema.ACTIONS: torch.zeros(2, H, A)}, torch.tensor([True, True]))
    expected = idm.predict(images[:, 0], images[:, 1], num_steps=2, generator=torch.Generator().manual_seed(0),
                           num_samples=4)  # the labels are the mean of 4 flow draws
    assert torch.allclose(mean.actions[..., :3], expected[..., :3]) and not torch.allclose(mean.actions, out.actions)
    with pytest.raises(ValueError, match="IDMLabeler: num_samples must be >= 1"):
        CheckpointIDMLabeler(checkpoint=str(tmp_path / "idm.ckpt"), embodiment="point_gripper", num_samples=0)
    with pytest.raises(FileNotFoundError, match="recipes/lam.yaml"):
        CheckpointLatentActionLabeler("missing.ckpt")
