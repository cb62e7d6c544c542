"""The paper's optimisation (Table 6) and the one warm-up + decay schedule every LightningModule here trains with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from lightning.pytorch import LightningModule

LR_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def paper_adamw(params) -> torch.optim.Optimizer:
    """AdamW, lr 1e-4, betas (0.95, 0.999), weight decay 1e-5."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-5)


def check_schedule(lr_schedule: str, warmup_ratio: float) -> None:
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {sorted(LR_SCHEDULES)}, got {lr_schedule!r}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up over ``warmup_ratio`` of the run's steps (paper: 5%), then ``kind``: ``cosine`` (paper),
    ``linear`` or ``constant``. YAML: ``lr_schedule: {kind: cosine, warmup_ratio: 0.05}``."""

    kind: str = "cosine"
    warmup_ratio: float = 0.05

    def __post_init__(self) -> None:
        check_schedule(self.kind, self.warmup_ratio)


def configure_optimizers(
    module: LightningModule, optimizer_factory: Callable, lr_schedule: str, warmup_ratio: float,
    warmup_steps: int | None = None,
) -> dict[str, Any]:
    """Optimiser over the trainable parameters + linear warm-up over ``warmup_ratio`` of the run (or over
    ``warmup_steps``, at most half the run, so that a short run still decays), then ``lr_schedule`` (transformers'
    schedulers), stepped every optimisation step."""
    from transformers import get_scheduler

    optimizer = optimizer_factory([p for p in module.parameters() if p.requires_grad])
    total = max(1, int(module.trainer.estimated_stepping_batches))
    warmup = int(warmup_ratio * total) if warmup_steps is None else min(warmup_steps, total // 2)
    scheduler = get_scheduler(LR_SCHEDULES[lr_schedule], optimizer, num_warmup_steps=warmup,
                              num_training_steps=total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
