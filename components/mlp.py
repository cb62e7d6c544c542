"""A plain multi-layer perceptron, the smallest reusable block of the zoo."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """``in_dim -> hidden_dims... -> out_dim`` with an activation between layers (none after the last)."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: str = "gelu") -> None:
        acts = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"MLP activation must be one of {sorted(acts)}, got {activation!r}")
        dims = [in_dim, *hidden_dims, out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(acts[activation]())
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_dim] -> [..., out_dim]
        return super().forward(x)
