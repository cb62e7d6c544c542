"""Offline pseudo-labelling: the writer's shards carry exactly the labeller's per-step labels as actions, say where
they came from, and read back through the mixture as an ordinary source with actions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from components.latent_action import LatentActionModel
from components.pseudo_labels import LatentActionLabeler
from datamodules import schema
from datamodules.episodes import EpisodeDataModule
from datamodules.labeling import episode_frames
from datamodules.mixture import MixtureDataModule
from datamodules.shards import read_episodes
from envs.tabletop import TabletopPyramid
from lit_modules.labeling import PseudoLabelWriter

H = 8


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
