import numpy as np
import pytest
import torch

from datamodules.normalization import MODES, Normalizer, combine_stats, compute_stats


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_numpy_and_torch(mode):
    rng = np.random.default_rng(0)
    raw = rng.normal(loc=[0.0, 5.0, -2.0], scale=[1.0, 0.01, 3.0], size=(500, 3)).astype(np.float32)
    raw[:, 2] = 0.7  # a constant dimension must not blow up
    norm = Normalizer({"actions": compute_stats(raw), "state": None}, mode=mode)
    x = raw
    if mode == "q01_q99":  # clipping makes the map invertible only inside [q01, q99]
        s = norm.stats["actions"]
        x = np.clip(raw, s["q01"], s["q99"]).astype(np.float32)
    y = norm.normalize(x)
    assert np.isfinite(y).all()
    if mode != "mean_std":
        assert y.min() >= -1 and y.max() <= 1 and y[:, :2].max() > 0.99 and y[:, :2].min() < -0.99
    else:
        np.testing.assert_allclose(y[:, :2].mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(y[:, :2].std(0), 1, atol=1e-3)
    np.testing.assert_array_equal(y[:, 2], 0)
    np.testing.assert_allclose(norm.unnormalize(y), x, atol=1e-5 * np.abs(x).max())
    back = Normalizer.from_dict(norm.to_dict())
    yt = back.normalize(torch.from_numpy(x))
    np.testing.assert_allclose(yt.numpy(), y, atol=1e-6)
    np.testing.assert_allclose(back.unnormalize(yt).numpy(), x, atol=1e-5 * np.abs(x).max())
    assert norm.normalize(np.ones(4), "state").tolist() == [1, 1, 1, 1]  # no stats: passes through


def test_q01_q99_clips_outliers():
    raw = np.concatenate([np.linspace(-1, 1, 1000), [50.0]])[:, None]
    norm = Normalizer({"actions": compute_stats(raw)}, mode="q01_q99")
    assert norm.normalize(np.array([[50.0]]))[0, 0] == 1.0
    assert abs(norm.normalize(np.array([[0.0]]))[0, 0]) < 0.05


def test_combined_stats_equal_stats_of_the_union():
    rng = np.random.default_rng(1)
    parts = [rng.normal(loc=m, scale=s, size=(n, 2)) for m, s, n in ((0, 1, 3000), (4, 0.5, 1000), (-2, 2, 2000))]
    combined = combine_stats([compute_stats(p) for p in parts])
    union = compute_stats(np.concatenate(parts))
    for key in ("min", "max", "mean", "std"):  # exact
        np.testing.assert_allclose(combined[key], union[key], rtol=1e-9, atol=1e-9)
    assert combined["count"] == 6000
    for key in ("q01", "q99"):  # approximated from 1%-spaced quantile grids
        np.testing.assert_allclose(combined[key], union[key], atol=0.05 * (union["max"][0] - union["min"][0]))
