"""RandomShift: every image is translated by its own offset within +-pad, borders replicated, nothing interpolated;
the policy applies it to training batches only."""

from __future__ import annotations

import pytest
import torch

from components.augmentation import RandomShift


def _dot_images(n: int, h: int = 16, w: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, 2 views, 3, h, w], black with one white pixel per image at a random interior position."""
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(4, h - 4, (n, 2, 2), generator=g)
    x = torch.zeros(n, 2, 3, h, w, dtype=torch.uint8)
    for i in range(n):
        for v in range(2):
            x[i, v, :, pos[i, v, 0], pos[i, v, 1]] = 255
    return x, pos


def test_each_image_is_translated_within_pad_by_its_own_offset() -> None:
    pad = 3
    x, pos = _dot_images(400)
    y = RandomShift(pad)(x, generator=torch.Generator().manual_seed(1))
    assert y.dtype == torch.uint8 and y.shape == x.shape
    shifts = []
    for i in range(len(x)):
        for v in range(2):
            hits = (y[i, v, 0] == 255).nonzero()
            assert len(hits) == 1, "a shift must move the dot, not blur, duplicate or drop it"
            assert torch.equal(y[i, v, 1], y[i, v, 0]) and torch.equal(y[i, v, 2], y[i, v, 0])
            shifts.append(tuple((pos[i, v] - hits[0]).tolist()))
    assert all(abs(dy) <= pad and abs(dx) <= pad for dy, dx in shifts)
    # all 49 offsets occur and views of one sample move independently
    assert len(set(shifts)) == (2 * pad + 1) ** 2
    assert sum(a != b for a, b in zip(shifts[0::2], shifts[1::2])) > 0.9 * len(x)


def test_border_is_replicated_not_zero_filled() -> None:
    x = torch.full((64, 1, 3, 8, 8), 200, dtype=torch.uint8)
    y = RandomShift(2)(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, x)


def test_pad_zero_is_identity_and_negative_pad_is_rejected() -> None:
    x, _ = _dot_images(4)
    assert torch.equal(RandomShift(0)(x), x)
    with pytest.raises(ValueError, match="pad must be >= 0"):
        RandomShift(-1)
