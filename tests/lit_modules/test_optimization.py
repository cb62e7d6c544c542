"""The shared optimisation: the paper's AdamW, the schedule names, and the warm-up + decay every module trains with."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lit_modules.optimization import LRSchedule, check_schedule, configure_optimizers, paper_adamw


class Stub(nn.Module):
    """What ``configure_optimizers`` reads of a LightningModule: its parameters and the trainer's step count."""

    def __init__(self, total_steps: int) -> None:
        super().__init__()
        self.trainable, self.frozen = nn.Linear(2, 2), nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.trainer = SimpleNamespace(estimated_stepping_batches=total_steps)


def learning_rates(config: dict, steps: int) -> list[float]:
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1.0)


def test_paper_adamw_has_the_papers_hyperparameters() -> None:
    group = paper_adamw(nn.Linear(2, 2).parameters()).param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.95, 0.999), 1e-5)


def test_warmup_then_cosine_over_the_trainable_parameters_only() -> None:
    module = Stub(total_steps=100)
    config = configure_optimizers(module, adamw, "cosine", warmup_ratio=0.1)
    assert config["lr_scheduler"]["interval"] == "step"
    optimised = {id(p) for g in config["optimizer"].param_groups for p in g["params"]}
    assert optimised == {id(p) for p in module.trainable.parameters()}
    lr = learning_rates(config, 101)
    assert lr[0] == 0.0 and lr[5] == pytest.approx(0.5) and lr[10] == pytest.approx(1.0)  # linear warm-up
    assert lr[55] == pytest.approx(0.5) and lr[100] == pytest.approx(0.0, abs=1e-9)  # half a cosine to zero
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_other_schedules_and_an_absolute_warmup_capped_at_half_the_run() -> None:
    linear = learning_rates(configure_optimizers(Stub(100), adamw, "linear", warmup_ratio=0.0), 101)
    assert linear[0] == 1.0 and linear[50] == pytest.approx(0.5) and linear[100] == pytest.approx(0.0)
    constant = learning_rates(configure_optimizers(Stub(100), adamw, "constant", warmup_ratio=0.2), 100)
    assert constant[10] == pytest.approx(0.5) and set(constant[20:]) == {1.0}
    # warmup_steps replaces warmup_ratio, and a 30-step warm-up in a 40-step run stops at step 20.
    capped = learning_rates(configure_optimizers(Stub(40), adamw, "cosine", warmup_ratio=0.5, warmup_steps=30), 41)
    assert capped[10] == pytest.approx(0.5) and capped[20] == pytest.approx(1.0) and capped[19] < 1.0
    plain = learning_rates(configure_optimizers(Stub(1000), adamw, "cosine", warmup_ratio=0.5, warmup_steps=30), 31)
    assert plain[30] == pytest.approx(1.0) and plain[15] == pytest.approx(0.5)


def test_bad_schedule_settings_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"lr_schedule must be one of \['constant', 'cosine', 'linear'\], got 'step'"):
        check_schedule("step", 0.05)
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 1\)"):
            check_schedule("cosine", ratio)
    with pytest.raises(ValueError, match=r"lr_schedule must be one of .*got 'step'"):
        LRSchedule(kind="step")
    assert LRSchedule() == LRSchedule("cosine", 0.05)
