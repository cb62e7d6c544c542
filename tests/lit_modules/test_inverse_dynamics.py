"""InverseDynamicsModule: trains on the rows that have actions, keeps DDP ranks in step without them, logs R^2."""

from __future__ import annotations

import torch

from datamodules import schema
from lit_modules.inverse_dynamics import InverseDynamicsModule
from vla_zoo.idm_protocol import A_MAX, H, make_idm


def test_module_trains_on_action_rows_and_logs_r2() -> None:
    torch.manual_seed(0)
    module = InverseDynamicsModule(make_idm())
    B = 4
    batch = {
        schema.IMAGES: torch.randint(0, 256, (B, 2, 2, 3, 64, 64), dtype=torch.uint8),
        schema.ACTIONS: torch.randn(B, H, A_MAX),
        schema.ACTION_MASK: torch.zeros(B, H, A_MAX, dtype=torch.bool),
        schema.HAS_ACTION: torch.tensor([True, True, True, False]),
        schema.EMBODIMENT_ID: torch.zeros(B, dtype=torch.long),
    }
    batch[schema.ACTION_MASK][:3, :, :3] = True
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and module.model.encoder.frame_embedding.grad is not None
    module.eval()
    module.validation_step(batch, 0)
    assert torch.isfinite(module.val_r2.compute())


def test_a_batch_without_actions_gives_a_zero_loss_that_reaches_every_parameter() -> None:
    module = InverseDynamicsModule(make_idm())
    batch = {
        schema.IMAGES: torch.randint(0, 256, (2, 2, 2, 3, 64, 64), dtype=torch.uint8),
        schema.ACTIONS: torch.randn(2, H, A_MAX),
        schema.ACTION_MASK: torch.ones(2, H, A_MAX, dtype=torch.bool),
        schema.HAS_ACTION: torch.tensor([False, False]),
        schema.EMBODIMENT_ID: torch.zeros(2, dtype=torch.long),
    }
    loss = module.training_step(batch, 0)
    loss.backward()
    assert float(loss) == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters() if p.requires_grad)
