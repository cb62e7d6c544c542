"""State -> action-chunk regression: the simplest policy that trains on the zoo's batch schema.

It ignores images and language; the behaviour-cloning baseline of the recipes and the model of the smoke recipe.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import nn

from datamodules import schema


class StateChunkRegressor(LightningModule):
    def __init__(self, net: nn.Module, horizon: int = 16, max_action_dim: int = 8, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()  # `net` included: the checkpoint must rebuild the injected component
        self.net = net

    def forward(self, state: torch.Tensor) -> torch.Tensor:  # [B, S_max] -> [B, H, A_max]
        return self.net(state).view(state.shape[0], self.hparams.horizon, self.hparams.max_action_dim)

    def _loss(self, batch: dict) -> torch.Tensor:
        pred = self(batch[schema.STATE])
        mask = batch[schema.ACTION_MASK].float()
        return ((pred - batch[schema.ACTIONS]) ** 2 * mask).sum() / mask.sum().clamp_min(1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[schema.STATE].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, batch_size=batch[schema.STATE].shape[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
