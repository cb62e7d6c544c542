"""Image augmentation applied to training batches inside the policy (never at inference).

``RandomShift`` is the random-shift augmentation of DrQ (Kostrikov et al. 2020) and DrQ-v2: pad each image by
``pad`` pixels (replicating the border) and crop back to the original size at a random offset, drawn independently
for every sample and view. Behaviour cloning from a few dozen demonstrations over-fits to exact pixel positions;
shifting by a few pixels keeps the geometry between gripper and objects (both move together) while breaking the
memorisation of absolute positions.

Why our own: torchvision's ``RandomCrop(padding=...)`` draws one offset per call (the whole batch moves together),
and a per-sample loop over it costs a Python call per image. Here the crops are one advanced-indexing gather on
uint8, so the batch stays uint8 (what the backbones take) and nothing is interpolated.
"""

from __future__ import annotations

import torch
from torch import nn


class RandomShift(nn.Module):
    def __init__(self, pad: int = 4) -> None:
        super().__init__()
        if pad < 0:
            raise ValueError(f"RandomShift(pad={pad}): pad must be >= 0 pixels")
        self.pad = pad

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``images [..., C, h, w]`` (any dtype) -> the same shape, each image shifted by up to ``pad`` pixels."""
        if self.pad == 0:
            return images
        *lead, c, h, w = images.shape
        x = images.reshape(-1, c, h, w)  # [N, C, h, w]
        n, p = x.shape[0], self.pad
        # F.pad's replicate mode needs a float tensor; index clamping replicates the border for any dtype
        offsets = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device="cpu").to(x.device)  # [2, N]
        rows = (offsets[0, :, None] - p + torch.arange(h, device=x.device)).clamp(0, h - 1)  # [N, h]
        cols = (offsets[1, :, None] - p + torch.arange(w, device=x.device)).clamp(0, w - 1)  # [N, w]
        batch = torch.arange(n, device=x.device)[:, None, None]
        out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [N, h, w, C]
        return out.permute(0, 3, 1, 2).reshape(*lead, c, h, w)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"
