"""Measurements of a latent-action model: codebook use, latent moments and a closed-form linear probe.

All are torchmetrics ``Metric``s with sum-reduced states, so they accumulate over many batches and give the same
answer on every DDP rank (torchmetrics all-reduces the states in ``compute``). torchmetrics has no codebook metric,
and its ``R2Score`` scores given predictions; the probe has to *fit* a regressor, which sufficient statistics
(``X^T X``, ``X^T Y``) do in closed form without keeping the samples.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class CodebookUsage(Metric):
    """Perplexity, fraction of codes used and number of dead codes, from code indices of any shape.

    Perplexity ``exp(entropy of the code histogram)`` is the effective number of codes in use: 1 on collapse,
    ``codebook_size`` when every code is used equally. Indices < 0 (masked positions) are ignored.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, codebook_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.codebook_size = codebook_size
        self.add_state("counts", torch.zeros(codebook_size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor) -> None:
        idx = indices.reshape(-1).long()
        idx = idx[idx >= 0]
        if idx.numel() and int(idx.max()) >= self.codebook_size:
            raise ValueError(f"CodebookUsage: index {int(idx.max())} >= codebook_size {self.codebook_size}")
        self.counts += torch.bincount(idx, minlength=self.codebook_size).to(self.counts)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.counts.sum().clamp_min(1)
        p = self.counts / total
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        used = (self.counts > 0).sum()
        return {
            "perplexity": entropy.exp().float(),
            "usage": (used / self.codebook_size).float(),
            "dead_codes": (self.codebook_size - used).float(),
        }


class LatentMoments(Metric):
    """Per-element mean and standard deviation of ``[..., *shape]`` samples accumulated over batches (float64)."""

    full_state_update = False

    def __init__(self, shape: tuple[int, ...] | list[int], **kwargs) -> None:
        super().__init__(**kwargs)
        shape = tuple(shape)
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor) -> None:  # [B, *shape]
        x = x.detach().double()
        self.total += x.sum(0)
        self.total_sq += (x * x).sum(0)
        self.count += x.shape[0]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.count.clamp_min(2)
        mean = self.total / n
        var = (self.total_sq - n * mean * mean) / (n - 1)  # unbiased, like torch.std
        return mean.float(), var.clamp_min(0).sqrt().float()


def _ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, l2: float) -> torch.Tensor:
    """Solve ``(X^T X + l2 I) W = X^T Y`` for centred, standardised X (the intercept is the mean of y)."""
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    return torch.linalg.solve(xtx + l2 * eye, xty)


def ridge_probe_r2(
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_eval: torch.Tensor | None = None,
    y_eval: torch.Tensor | None = None,
    l2: float = 1e-3,
) -> float:
    """R^2 of a ridge regression ``y ~ x`` fitted in closed form on ``(x_fit, y_fit)``, scored on the eval set.

    ``x: [M, F]``, ``y: [M, T]`` (extra dims are flattened). Features are standardised with the fit set's
    statistics, so ``l2`` is relative (a fraction of each feature's variance, times M). R^2 is variance-weighted
    over target columns (1 - total SSE / total SS), so constant columns do not make it undefined. Without an eval
    set the score is in-sample.
    """
    x_fit, y_fit = x_fit.flatten(1).double(), y_fit.flatten(1).double()
    x_eval = x_fit if x_eval is None else x_eval.flatten(1).double()
    y_eval = y_fit if y_eval is None else y_eval.flatten(1).double()
    mx, sx = x_fit.mean(0), x_fit.std(0).clamp_min(1e-8)
    my = y_fit.mean(0)
    xs = (x_fit - mx) / sx
    w = _ridge_solve(xs.T @ xs, xs.T @ (y_fit - my), l2 * x_fit.shape[0])
    pred = ((x_eval - mx) / sx) @ w + my
    sse = ((y_eval - pred) ** 2).sum()
    sst = ((y_eval - y_eval.mean(0)) ** 2).sum().clamp_min(1e-12)
    return float(1 - sse / sst)


class RidgeProbeR2(Metric):
    """In-sample R^2 of a closed-form ridge probe ``targets ~ features``, from accumulated sufficient statistics.

    Keeps ``sum x``, ``sum y``, ``X^T X``, ``X^T Y``, ``sum y^2`` (float64), so memory does not grow with the number
    of samples and DDP ranks merge by summing. Feature standardisation and ``l2`` follow :func:`ridge_probe_r2`.
    In-sample R^2 is optimistic by about ``F / M`` (features over samples): keep ``M`` well above ``F``.
    Rows with ``weight == 0`` (e.g. samples without actions) are ignored.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_features: int, num_targets: int, l2: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.l2 = l2
        f, t = num_features, num_targets
        for name, shape in {"n": (), "sx": (f,), "sy": (t,), "xx": (f, f), "xy": (f, t), "yy": (t,)}.items():
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        x, y = features.detach().flatten(1).double(), targets.detach().flatten(1).double()
        if weight is not None:
            keep = weight.reshape(-1).bool()
            x, y = x[keep], y[keep]
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.yy += (y * y).sum(0)

    def compute(self) -> torch.Tensor:
        n = self.n
        if n < 2:
            return torch.tensor(float("nan"))
        mx, my = self.sx / n, self.sy / n
        cxx = self.xx - n * torch.outer(mx, mx)  # centred X^T X
        cxy = self.xy - n * torch.outer(mx, my)
        syy = self.yy - n * my * my  # per-target total sum of squares
        sx = (cxx.diagonal() / (n - 1)).clamp_min(1e-16).sqrt()
        cxx, cxy = cxx / torch.outer(sx, sx), cxy / sx[:, None]  # standardised features
        w = _ridge_solve(cxx, cxy, self.l2 * float(n))
        # SSE = syy - 2 w.cxy + w.cxx w, summed over targets
        sse = syy.sum() - 2 * (w * cxy).sum() + (w * (cxx @ w)).sum()
        return (1 - sse / syy.sum().clamp_min(1e-12)).float()
