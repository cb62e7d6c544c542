"""Behaviour-cloning baseline: regress the action chunk directly with an MLP (the ablation for flow matching).

Same ``loss``/``sample`` interface as ``FlowMatchingActionHead``, so a recipe swaps one for the other by
``class_path``. A regression head trained with MSE predicts the conditional MEAN action: on multimodal
demonstrations it averages the modes, which is what the flow-matching head is there to avoid.
"""

from __future__ import annotations

import torch
from torch import nn

from components.action_head import masked_mse
from components.embodiment import ActionDecoder, EmbodimentGroups, StateEncoder, expand_embodiments
from components.mlp import MLP


class RegressionActionHead(nn.Module):
    """Masked-mean-pooled VL tokens (+ state token) -> MLP -> per-step features -> embodiment decoder -> [B, H, A_max]."""

    def __init__(
        self,
        num_embodiments: int,
        max_state_dim: int,
        max_action_dim: int,
        horizon: int,
        cross_attention_dim: int,
        hidden_dim: int = 1024,
        num_layers: int = 2,
        embodiment_hidden_dim: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.max_state_dim, self.max_action_dim, self.horizon = max_state_dim, max_action_dim, horizon
        self.cross_attention_dim = cross_attention_dim
        self.vl_proj = nn.Linear(cross_attention_dim, hidden_dim)
        self.state_encoder = StateEncoder(num_embodiments, max_state_dim, embodiment_hidden_dim, hidden_dim)
        self.trunk = nn.Sequential(MLP(hidden_dim, [hidden_dim] * (num_layers - 1), hidden_dim), nn.Dropout(dropout))
        self.position_embedding = nn.Parameter(torch.randn(horizon, hidden_dim) * 0.02)  # [H, D]
        self.action_decoder = ActionDecoder(num_embodiments, hidden_dim, embodiment_hidden_dim, max_action_dim)

    def expand_embodiments(self, num_embodiments: int) -> None:
        expand_embodiments(self, num_embodiments)

    def forward(self, vl_tokens: torch.Tensor, vl_mask: torch.Tensor, state: torch.Tensor | None,
                embodiment_id: torch.Tensor) -> torch.Tensor:
        # vl_tokens [B, S, D_vl], vl_mask [B, S] -> actions [B, H, A_max]
        groups = EmbodimentGroups.from_ids(embodiment_id)
        m = vl_mask.to(vl_tokens.dtype)[..., None]  # [B, S, 1]
        pooled = (vl_tokens * m).sum(1) / m.sum(1).clamp(min=1)  # masked mean; all-False rows pool to 0
        h = self.vl_proj(pooled)  # [B, D]
        if state is not None:
            h = h + self.state_encoder(state, groups)
        h = self.trunk(torch.nn.functional.gelu(h))[:, None] + self.position_embedding  # [B, H, D]
        return self.action_decoder(h, groups)

    def loss(self, vl_tokens: torch.Tensor, vl_mask: torch.Tensor, state: torch.Tensor | None, actions: torch.Tensor,
             action_mask: torch.Tensor, embodiment_id: torch.Tensor) -> dict[str, torch.Tensor]:
        """Masked MSE between the predicted and the demonstrated chunk (padded dims/steps ignored)."""
        pred = self(vl_tokens, vl_mask, state, embodiment_id)[:, : actions.shape[1]]
        return masked_mse(pred, actions, action_mask)

    @torch.no_grad()
    def sample(self, vl_tokens: torch.Tensor, vl_mask: torch.Tensor, state: torch.Tensor | None,
               embodiment_id: torch.Tensor, num_steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The regressed chunk (deterministic: ``num_steps`` and ``generator`` are accepted for interface parity)."""
        return self(vl_tokens, vl_mask, state, embodiment_id)
