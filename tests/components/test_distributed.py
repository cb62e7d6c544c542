"""zero_loss: a step with nothing to learn still reaches every parameter, with zero gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.distributed import zero_loss


def test_zero_loss_reaches_every_part_with_zero_gradients() -> None:
    module, other = nn.Linear(3, 2), nn.Linear(2, 2)
    features = torch.randn(4, 3, requires_grad=True)
    loss = zero_loss(module, features)
    assert float(loss) == 0.0
    loss.backward()
    for tensor in [*module.parameters(), features]:
        assert tensor.grad is not None and not tensor.grad.any()
    assert other.weight.grad is None  # only what it was given
    with pytest.raises(ValueError, match="nothing to keep in the graph"):
        zero_loss(nn.ReLU())
