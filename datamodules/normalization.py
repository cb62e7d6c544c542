"""Per-embodiment normalisation of state and actions, and the raw-unit statistics it is built from.

Statistics are computed per source in raw units by the shard writer (``stats.json``) and combined per embodiment
by the mixture (never across embodiments). Three modes are in use in the VLA literature:

- ``min_max``: maps [min, max] to [-1, 1] (GR00T's default), clipped to [-1, 1];
- ``q01_q99``: maps [q01, q99] to [-1, 1] and clips outliers (Octo, OpenVLA);
- ``mean_std``: zero mean, unit variance, unclipped (pi0).

Dimensions whose range is (nearly) zero map to 0 and un-normalise to their constant value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MODES = ("min_max", "q01_q99", "mean_std")

#: Quantile levels stored per source so that sources can later be combined (see ``combine_stats``).
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 101)
_EPS = 1e-6


def non_finite_stats(stats: Any, prefix: str = "") -> list[str]:
    """Where a ``stats.json``-style tree holds NaN, inf or a non-number among its statistics: one
    ``"key.stat[i] = value"`` entry each (``[]`` when all are finite). JSON admits ``NaN`` and ``Infinity``, and one
    of them in a normaliser makes every normalised value, and so every loss, NaN."""
    if stats is None:
        return []
    if isinstance(stats, dict):
        return [bad for key, value in stats.items() for bad in non_finite_stats(value, f"{prefix}.{key}".lstrip("."))]
    if isinstance(stats, (list, tuple)):
        return [bad for i, value in enumerate(stats) for bad in non_finite_stats(value, f"{prefix}[{i}]")]
    if isinstance(stats, bool) or not isinstance(stats, (int, float)) or not np.isfinite(stats):
        return [f"{prefix} = {stats!r}"]
    return []


def compute_stats(values: np.ndarray) -> dict[str, Any]:
    """Raw-unit statistics per dimension of ``values`` [N, D] as JSON-ready lists."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"compute_stats needs a non-empty [N, D] array, got shape {values.shape}")
    quantiles = np.quantile(values, QUANTILE_LEVELS, axis=0)  # [101, D]
    return {
        "count": int(len(values)),
        "min": values.min(0).tolist(),
        "max": values.max(0).tolist(),
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
        "quantiles": quantiles.tolist(),
    }


def _mixture_quantiles(grids: np.ndarray, weights: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Quantiles at ``levels`` of a mixture whose K components are known by their quantile grids [K, 101]
    (each taken as a piecewise-linear CDF), mixed with ``weights`` [K]."""
    xs = np.unique(grids)
    cdf = sum(w * np.interp(xs, g, QUANTILE_LEVELS) for g, w in zip(grids, weights))
    if cdf[-1] <= cdf[0]:
        return np.full(len(levels), xs[0])
    # Flat stretches of the CDF (gaps between components) would make the inverse ambiguous: take their start.
    keep = np.concatenate([[True], np.diff(cdf) > 0])
    return np.interp(levels, cdf[keep], xs[keep])


def combine_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of the union of several sources' samples (one embodiment, same dims).

    count, min, max, mean and std are exact (pooled moments). Quantiles are approximated: each source's CDF is
    reconstructed by linear interpolation of its 101 stored quantiles (every 1%), the count-weighted mixture CDF is
    inverted at each level. With one source the stored values are returned unchanged.
    """
    if len(stats) == 1:
        return stats[0]
    dims = {len(s["min"]) for s in stats}
    if len(dims) != 1:
        raise ValueError(f"cannot combine statistics with different dimensions {sorted(dims)}")
    counts = np.array([s["count"] for s in stats], dtype=np.float64)
    w = counts / counts.sum()
    mean_s = np.array([s["mean"] for s in stats])  # [K, D]
    std_s = np.array([s["std"] for s in stats])
    mean = (w[:, None] * mean_s).sum(0)
    var = (w[:, None] * (std_s**2 + (mean_s - mean) ** 2)).sum(0)
    grids = np.array([s["quantiles"] for s in stats])  # [K, 101, D]
    levels = np.concatenate([QUANTILE_LEVELS, [0.01, 0.99]])
    per_dim = np.stack([_mixture_quantiles(grids[:, :, d], w, levels) for d in range(grids.shape[2])], 1)
    quantiles = per_dim[: len(QUANTILE_LEVELS)]  # [101, D]
    # Use the source-exact extremes at the ends of the grid.
    quantiles[0], quantiles[-1] = np.min([s["min"] for s in stats], 0), np.max([s["max"] for s in stats], 0)
    return {
        "count": int(counts.sum()),
        "min": quantiles[0].tolist(),
        "max": quantiles[-1].tolist(),
        "mean": mean.tolist(),
        "std": np.sqrt(var).tolist(),
        "q01": per_dim[-2].tolist(),
        "q99": per_dim[-1].tolist(),
        "quantiles": quantiles.tolist(),
    }


class Normalizer:
    """Normalises and un-normalises one embodiment's state and actions.

    ``stats`` maps a key (``"state"``, ``"actions"``) to its raw-unit statistics (``compute_stats`` format; only
    the entries the mode needs are required); a key that is absent or None (actionless video) passes through.
    Works on numpy arrays and torch tensors whose last dimension is the key's dimension.
    """

    def __init__(self, stats: dict[str, dict[str, Any] | None], mode: str = "min_max") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown normalisation mode {mode!r}: choose one of {MODES}")
        self.mode = mode
        self.stats = {k: v for k, v in stats.items() if v is not None}
        # key -> (center, divisor, multiplier, clip); divisor is inf and multiplier 0 on constant dims.
        self._affine: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = {}
        for key, s in self.stats.items():
            if mode == "mean_std":
                center, scale, clip = np.asarray(s["mean"]), np.asarray(s["std"]), False
            else:
                lo, hi = (s["min"], s["max"]) if mode == "min_max" else (s["q01"], s["q99"])
                lo, hi = np.asarray(lo), np.asarray(hi)
                center, scale, clip = (hi + lo) / 2, (hi - lo) / 2, True
            # A constant dimension carries no information: map it to 0 rather than dividing by ~0.
            constant = scale < _EPS
            self._affine[key] = (
                center.astype(np.float32),
                np.where(constant, np.inf, scale).astype(np.float32),
                np.where(constant, 0.0, scale).astype(np.float32),
                clip,
            )

    def dim(self, key: str) -> int:
        return len(self._affine[key][0]) if key in self._affine else 0

    def _params(self, x, key: str):
        *arrays, clip = self._affine[key]
        if x.shape[-1] != len(arrays[0]):
            raise ValueError(f"{key} has {x.shape[-1]} dims but the normaliser's statistics have {len(arrays[0])}")
        if isinstance(x, torch.Tensor):
            arrays = [torch.as_tensor(a, device=x.device, dtype=x.dtype) for a in arrays]
        return (*arrays, clip)

    def normalize(self, x, key: str = "actions"):
        if key not in self._affine:
            return x
        center, divisor, _, clip = self._params(x, key)
        y = (x - center) / divisor
        return y.clip(-1.0, 1.0) if clip else y

    def clip_range(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The raw-unit ``(low, high)`` that ``normalize`` clips ``key`` to; None where it does not clip
        (``mean_std``, or a key without statistics)."""
        if key not in self._affine or not self._affine[key][3]:
            return None
        center, _, multiplier, _ = self._affine[key]
        return center - multiplier, center + multiplier

    def unnormalize(self, y, key: str = "actions"):
        if key not in self._affine:
            return y
        center, _, multiplier, clip = self._params(y, key)
        if clip:
            y = y.clip(-1.0, 1.0)
        return y * multiplier + center

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "stats": self.stats}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalizer":
        return cls(d["stats"], mode=d["mode"])

    def __repr__(self) -> str:
        return f"Normalizer(mode={self.mode!r}, dims={ {k: self.dim(k) for k in self._affine} })"
