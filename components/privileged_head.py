"""An auxiliary readout of privileged (simulator-only) state from the vision-language tokens.

In simulation the demonstrations know where every object and goal is; the policy, like a real robot, only sees
pixels. Regressing those positions from the VL tokens the action head attends to gives the vision tower a dense,
direct localisation signal besides the action loss: the "auxiliary pose prediction" of visuomotor learning (Levine
et al., 2016, "End-to-End Training of Deep Visuomotor Policies", pretrain their vision layers on object poses). It
is a training target only: the policy's inputs and its inference path do not change, and a deployed checkpoint
never needs the privileged state.
"""

from __future__ import annotations

import torch
from torch import nn

from .mlp import MLP


class PrivilegedStateHead(nn.Module):
    """VL tokens ``[B, S, D]`` (+ mask ``[B, S]``) -> privileged state ``[B, P]``.

    ``num_queries`` learned queries attend over the tokens (honouring the mask), so the readout can pick out the
    patches where an object is; an MLP maps the attended features to the P targets. Mean pooling would average away
    exactly the spatial information this head exists to train. ``loss_weight`` scales its loss where the policy adds
    it to the action loss.
    """

    def __init__(self, vl_dim: int, out_dim: int, num_queries: int = 4, num_heads: int = 4,
                 hidden_dim: int = 256, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.out_dim, self.loss_weight = out_dim, loss_weight
        self.queries = nn.Parameter(torch.randn(num_queries, vl_dim) * vl_dim ** -0.5)
        self.attention = nn.MultiheadAttention(vl_dim, num_heads, batch_first=True)
        # No LayerNorm on the attended features: on the conv tower's tokens they differ across scenes mostly by a
        # per-sample shift and scale, which a LayerNorm removes (measured: across-batch spread 0.18 before it,
        # 0.001 after), and the readout then collapsed to the mean (loss ~1.0 for 7,500 steps of an MT10 run).
        self.mlp = MLP(num_queries * vl_dim, [hidden_dim], out_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> [B, P]
        queries = self.queries.expand(tokens.shape[0], -1, -1)  # [B, Q, D]
        attended, _ = self.attention(queries, tokens, tokens, key_padding_mask=~mask.bool(), need_weights=False)
        return self.mlp(attended.flatten(1))

    def loss(self, tokens: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
             target_mask: torch.Tensor) -> torch.Tensor:
        """Masked MSE against standardised targets ``[B, P_max]`` (``target_mask`` True on real dims); with
        standardised targets, 1 - loss estimates the readout's R^2."""
        pred = self(tokens, mask)
        width = min(pred.shape[1], target.shape[1])
        if target_mask[:, width:].any():
            raise ValueError(f"the batch has {target.shape[1]} privileged dims but PrivilegedStateHead(out_dim="
                             f"{self.out_dim}) predicts {pred.shape[1]}: set out_dim to the source's privileged_dim")
        m = target_mask[:, :width].float()
        return (((pred[:, :width] - target[:, :width]) ** 2) * m).sum() / m.sum().clamp_min(1.0)
