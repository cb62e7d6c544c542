"""Spatial-softmax keypoints: a conv feature map -> K learned (x, y) positions (Levine et al., 2016)."""

from __future__ import annotations

import torch
from torch import nn

from .mlp import MLP


class SpatialSoftmaxKeypoints(nn.Module):
    """Feature map ``[N, C, g, g]`` -> one token ``[N, 1, D]`` holding K learned keypoints (Levine et al., 2016).

    Each keypoint is the expected cell centre under a softmax over the map's cells (a 1x1 conv gives its logits, a
    learned temperature their sharpness): an (x, y) in [-1, 1] with sub-cell precision, which patch tokens of a 16 px
    cell only carry implicitly. Robomimic and Diffusion Policy use the same readout for behaviour cloning from pixels.
    """

    def __init__(self, channels: int, num_keypoints: int, out_dim: int) -> None:
        super().__init__()
        self.to_logits = nn.Conv2d(channels, num_keypoints, kernel_size=1)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.mlp = MLP(2 * num_keypoints, [out_dim], out_dim)

    def keypoints(self, feature_map: torch.Tensor) -> torch.Tensor:  # [N, C, g, g] -> [N, K, 2] as (x, y)
        g = feature_map.shape[-1]
        attention = (self.to_logits(feature_map).flatten(2) / self.log_temperature.exp()).softmax(-1)  # [N, K, g*g]
        axis = torch.linspace(-1, 1, g, device=feature_map.device, dtype=feature_map.dtype)
        cells = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(g * g, 2)  # row-major (x, y)
        return attention @ cells

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:  # [N, C, g, g] -> [N, 1, D]
        return self.mlp(self.keypoints(feature_map).flatten(1))[:, None]
