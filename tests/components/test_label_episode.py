"""label_episode (components/pseudo_labels.py) puts every chunk prediction on its own step, whatever the batching or
anchor order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.pseudo_labels import label_episode
from datamodules.normalization import Normalizer, compute_stats

T, H, V, A = 23, 5, 2, 3


def frames(T: int = T) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {view: rng.integers(0, 256, (T, 8, 8, 3), dtype=np.uint8) for view in ("scene", "wrist")}


def step_index_idm(x_t: torch.Tensor, x_tH: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """A fake IDM that knows the truth: the label of step t + k is t + k."""
    assert x_t.shape[1:] == (V, 3, 8, 8) and x_tH.shape == x_t.shape
    return (anchors[:, None, None] + torch.arange(H)[None, :, None]).float().expand(-1, H, A)


@pytest.mark.parametrize("batch_size", [1, 4, 64])
@pytest.mark.parametrize("shuffle", [False, True])
def test_labels_are_the_step_indices(batch_size: int, shuffle: bool) -> None:
    anchors = np.random.default_rng(1).permutation(T) if shuffle else None
    labels, spread, counts = label_episode(step_index_idm, frames(), H, anchors=anchors, batch_size=batch_size)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(T, dtype=np.float32)[:, None], A, 1))
    np.testing.assert_array_equal(spread, 0.0)
    # Step s is covered by the chunks anchored at max(0, s - H + 1) .. s.
    np.testing.assert_array_equal(counts, np.minimum(np.arange(T), H - 1) + 1)


def test_results_in_completion_order_would_misplace_labels() -> None:
    """Guard on the test itself: an IDM that ignores its anchors but answers in call order fails when the anchors
    come shuffled, so the test above would catch a labeller that placed chunks by arrival order."""
    anchors = np.random.default_rng(1).permutation(T)
    calls = iter(range(T))

    def by_arrival(x_t, x_tH, t):
        return torch.stack([step_index_idm(x_t[i:i + 1], x_tH[i:i + 1], torch.tensor([next(calls)]))[0]
                            for i in range(len(t))])

    labels, _, _ = label_episode(by_arrival, frames(), H, anchors=anchors, batch_size=4)
    assert not np.array_equal(labels[:, 0], np.arange(T))


def test_frame_pairs_are_t_and_t_plus_h_clipped() -> None:
    fr = frames()
    stacked = np.stack([fr["scene"], fr["wrist"]], 1).transpose(0, 1, 4, 2, 3)  # [T, V, 3, h, w]
    seen = {}

    def recorder(x_t, x_tH, t):
        for i, ti in enumerate(t.tolist()):
            seen[ti] = (x_t[i].numpy(), x_tH[i].numpy())
        return torch.zeros(len(t), H, A)

    label_episode(recorder, fr, H, batch_size=7, views=["scene", "wrist"])
    assert sorted(seen) == list(range(T))
    for t, (x_t, x_tH) in seen.items():
        np.testing.assert_array_equal(x_t, stacked[t])
        np.testing.assert_array_equal(x_tH, stacked[min(t + H, T - 1)])


def test_spread_measures_disagreement_between_overlapping_chunks() -> None:
    # Each chunk adds its anchor's parity to the truth: overlapping chunks disagree by exactly 1.
    def disagreeing(x_t, x_tH, t):
        return step_index_idm(x_t, x_tH, t) + (t % 2).float()[:, None, None]

    labels, spread, counts = label_episode(disagreeing, frames(), H, batch_size=3)
    assert spread[0].max() == 0.0  # step 0 has one prediction only
    multi = counts > 1
    assert (spread[multi] > 0.4).all() and (spread[multi] <= 0.5 + 1e-6).all()  # std of a 0/1 mixture
    # The mean lies between truth and truth + 1.
    truth = np.arange(T)[:, None]
    assert ((labels >= truth) & (labels <= truth + 1)).all()


def test_stride_and_unnormalisation() -> None:
    raw = np.random.default_rng(2).uniform([-2, 0, 5], [2, 1, 7], (100, A)).astype(np.float32)
    norm = Normalizer({"actions": compute_stats(raw)})

    def constant(x_t, x_tH, t):  # a normalised chunk of +1 in every dim, padded to A_max = 5
        return torch.cat([torch.ones(len(t), H, A), torch.full((len(t), H, 2), 9.0)], dim=-1)

    labels, spread, counts = label_episode(constant, frames(), H, stride=H, normalizer=norm)
    np.testing.assert_allclose(labels, np.broadcast_to(raw.max(0), (T, A)), rtol=1e-5)
    np.testing.assert_array_equal(counts, 1)
    np.testing.assert_array_equal(spread, 0.0)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="stride"):
        label_episode(step_index_idm, frames(), H, stride=H + 1)
    with pytest.raises(ValueError, match="duplicates"):
        label_episode(step_index_idm, frames(), H, anchors=[0, 1, 1])
    with pytest.raises(KeyError, match="wrist2"):
        label_episode(step_index_idm, frames(), H, views=["scene", "wrist2"])
    with pytest.raises(ValueError, match="predict_chunk must return"):
        label_episode(lambda x_t, x_tH, t: torch.zeros(len(t), H - 1, A), frames(), H)
