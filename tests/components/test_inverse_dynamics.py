"""The inverse dynamics model learns the actions between two frames of held-out robot episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.pseudo_labels import label_episode
from vla_zoo.idm_protocol import (A_MAX, EPISODES, H, R2_THRESHOLD, STEPS, heldout_r2, make_idm, robot_splits,
                                  train_idm)


@pytest.mark.slow
def test_idm_learns_actions_of_heldout_robot_episodes(one_thread) -> None:
    train_data, heldout_data, heldout, normalizer = robot_splits(EPISODES)
    torch.manual_seed(0)
    before = heldout_r2(make_idm(), heldout_data)
    model = train_idm(train_data, STEPS)
    after = heldout_r2(model, heldout_data)
    assert before < 0.0
    assert after >= R2_THRESHOLD, f"held-out action R^2 {after:.3f} (before training {before:.3f})"

    # The trained IDM as a labeller: per-step labels of a held-out episode in raw units track its true actions.
    ep = heldout[0]
    labels, spread, counts = label_episode(lambda x_t, x_tH, t: model.predict(x_t, x_tH), ep.frames, H,
                                           normalizer=normalizer, views=["scene", "wrist"])
    assert labels.shape == ep.actions.shape and (counts >= 1).all() and (spread >= 0).all()
    err = np.abs(labels - ep.actions).mean()
    assert err < np.abs(ep.actions - ep.actions.mean(0)).mean()


def test_frames_and_their_order_condition_the_prediction() -> None:
    torch.manual_seed(0)
    model = make_idm().eval()
    x_t = torch.randint(0, 256, (3, 2, 3, 64, 64), dtype=torch.uint8)
    x_tH = torch.randint(0, 256, (3, 2, 3, 64, 64), dtype=torch.uint8)
    sample = lambda a, b: model.predict(a, b, generator=torch.Generator().manual_seed(1))  # noqa: E731
    base = sample(x_t, x_tH)
    assert base.shape == (3, H, A_MAX)
    torch.testing.assert_close(sample(x_t, x_tH), base)  # same noise, same frames: same chunk
    assert not torch.allclose(sample(x_tH, x_t), base)  # swapping t and t+H changes the chunk
    # One chosen view: frames [B, 3, h, w] are accepted.
    single = make_idm(views=[1]).eval()
    assert single.predict(x_t[:, 1], x_tH[:, 1]).shape == (3, H, A_MAX)


def test_averaged_samples_estimate_the_posterior_mean() -> None:
    """``num_samples`` = n averages n independent flow draws: across noise seeds the label's spread shrinks by about
    sqrt(n) (4x at n = 16) around the same mean, and n = 0 is refused by name."""
    torch.manual_seed(0)
    model = make_idm().eval()
    x_t = torch.randint(0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8)
    x_tH = torch.randint(0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8)

    def draws(n: int) -> torch.Tensor:  # [seeds, B, H, A]
        return torch.stack([model.predict(x_t, x_tH, generator=torch.Generator().manual_seed(seed), num_samples=n)
                            for seed in range(12)])

    single, averaged = draws(1), draws(16)
    assert single.std(0).mean() > 0.3  # the untrained head's draws do depend on the noise
    assert averaged.std(0).mean() < 0.5 * single.std(0).mean()
    assert (averaged.mean(0) - single.mean(0)).abs().mean() < 0.6 * single.std(0).mean()
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        model.predict(x_t, x_tH, num_samples=0)


def test_mismatches_are_named() -> None:
    model = make_idm()
    frames = torch.zeros(2, 3, 3, 64, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="num_views"):
        model.predict(frames, frames)
