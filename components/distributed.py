"""What keeps DDP ranks in step when a rank has nothing to learn from on a step."""

from __future__ import annotations

import torch
from torch import nn


def zero_loss(*parts: nn.Module | torch.Tensor) -> torch.Tensor:
    """A loss of exactly 0 whose graph reaches every parameter of the modules (and every tensor) in ``parts``.

    Why: under DDP every rank runs backward on every step and the gradient all-reduce waits for the parameters of
    the graph; a rank whose batch holds nothing for a part must still return a loss that reaches it, or the other
    ranks wait forever. Multiplying by zero gives zero gradients, so the update is that of the ranks with data."""
    terms = [t.sum() for part in parts
             for t in (part.parameters() if isinstance(part, nn.Module) else [part])]
    if not terms:
        raise ValueError("zero_loss: nothing to keep in the graph (no parameter and no tensor given)")
    return sum(terms) * 0.0
