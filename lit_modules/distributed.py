"""Checks that a module's parameters fit the trainer's distributed strategy, made before the first step."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer


def require_find_unused_parameters(trainer: Trainer, owner: str, why: str) -> None:
    """Refuse plain DDP for a module some of whose parameters get no gradient on some steps (embodiment slots absent
    from a rank's batch, a readout with nothing to read). Plain DDP reports them only at the forward after such a
    step, as an unfinished gradient reduction; this says which module, why, and the fix, before the first step.
    Call it from ``on_fit_start``: by then the strategy has wrapped the module, so torch's own DDP wrapper says how
    it was configured."""
    wrapper = trainer.strategy.model
    if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel) and not wrapper.find_unused_parameters:
        raise ValueError(
            f"trainer.strategy: {owner} under DDP needs find_unused_parameters ({why}); set `strategy: "
            "ddp_find_unused_parameters_true` (or ddp_spawn_find_unused_parameters_true) in the recipe"
        )
