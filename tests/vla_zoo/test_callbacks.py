"""vla_zoo.callbacks: our replacements compute what the Lightning callbacks they replace compute; a non-finite loss
stops the fit."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging

from vla_zoo.callbacks import ForeachEMAWeightAveraging, NonFiniteLossError, StopOnNonFiniteLoss


class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callback: WeightAveraging) -> _Regression:
    """Train 40 steps with ``callback``; the module holds the callback's average after fit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 4, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=8)
    torch.manual_seed(0)
    model = _Regression()
    trainer = L.Trainer(max_steps=40, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, data)
    return model


def test_foreach_ema_matches_lightnings_average_and_is_a_weight_averaging_callback():
    ours = ForeachEMAWeightAveraging(decay=0.9)
    assert isinstance(ours, EMAWeightAveraging)  # so ClosedLoopEvalCallback's ordering guard still applies
    averaged = _fit(ours)
    reference = _fit(EMAWeightAveraging(decay=0.9))
    for (name, a), b in zip(averaged.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert ours._average_model.multi_avg_fn is not None and ours._average_model.avg_fn is None  # the fast path
    # ... and it is an average, not the last weights: a fit without averaging ends elsewhere.
    raw = _fit(WeightAveraging(use_buffers=True, avg_fn=lambda avg, new, n: new))  # "average" = the latest weights
    gap = max(float((a - b).abs().max()) for a, b in zip(averaged.parameters(), raw.parameters()))
    assert gap > 1e-2


class _NaNAtStep2(L.LightningModule):
    """Its loss is NaN from step 2 on (what non-finite statistics or a diverging run give)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch["x"]).pow(2).mean()
        return loss * float("nan") if self.global_step >= 2 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _TwoSources(L.LightningDataModule):
    source_names = ["robot", "human"]

    def train_dataloader(self):
        x = torch.randn(80, 4, generator=torch.Generator().manual_seed(0))
        ids = torch.tensor([0, 0, 1, 0] * 20)  # every batch of 4: three robot samples, one human
        return torch.utils.data.DataLoader([{"x": x[i], "source_id": ids[i]} for i in range(80)], batch_size=4)


def _fit_nan(callback: StopOnNonFiniteLoss) -> _NaNAtStep2:
    model = _NaNAtStep2()
    trainer = L.Trainer(max_steps=4, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=_TwoSources())
    return model


def test_a_non_finite_loss_stops_the_fit_naming_step_and_sources_before_any_weight_moves():
    callback = StopOnNonFiniteLoss()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2 .*sources 'robot' \(3\), 'human' \(1\)"):
        _fit_nan(callback)
    # The opt-out lets the run go on, and shows what the stop prevents: the NaN reaches the weights.
    model = _fit_nan(StopOnNonFiniteLoss(enabled=False))
    assert not torch.isfinite(model.w).all()


def test_the_stop_leaves_the_weights_finite():
    model = _NaNAtStep2()
    trainer = L.Trainer(max_steps=4, callbacks=[StopOnNonFiniteLoss()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    with pytest.raises(NonFiniteLossError):
        trainer.fit(model, datamodule=_TwoSources())
    assert torch.isfinite(model.w).all() and trainer.global_step == 2
