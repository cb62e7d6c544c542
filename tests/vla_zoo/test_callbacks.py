"""vla_zoo.callbacks: our replacements compute what the Lightning callbacks they replace compute; a non-finite loss
stops the fit; a signal saves a checkpoint to resume from; the closed-loop evaluation logs success rates of the
weights the checkpoint deploys."""

from __future__ import annotations

import json
import math
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, WeightAveraging

from tests.vla_zoo.fit_fixtures import SignalAtStep
from tests.vla_zoo.test_evaluation import GainModule, GainPolicy, LineEnv
from vla_zoo.callbacks import (
    CheckpointOnSignal,
    ClosedLoopEvalCallback,
    ForeachEMAWeightAveraging,
    NonFiniteLossError,
    StopOnNonFiniteLoss,
)


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


class _Scheduled(L.LightningModule):
    """AdamW with a per-step decaying learning rate, so optimizer moments and the rate both depend on the step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fit_scheduled(root, max_steps: int, *callbacks, ckpt_path=None) -> L.Trainer:
    torch.manual_seed(0)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, default_root_dir=root,
                        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True), *callbacks])
    trainer.fit(_Scheduled(), data, ckpt_path=ckpt_path)
    return trainer


def test_sigint_saves_a_checkpoint_equal_to_an_uninterrupted_run_at_that_step_and_resume_continues(tmp_path):
    # Python's default_int_handler, or SIG_IGN where the shell started pytest in the background without job control
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        _fit_scheduled(tmp_path / "cut", 20, CheckpointOnSignal(), SignalAtStep(5, signal.SIGINT))
    assert stopped.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl+C behaves as before after the fit
    cut = torch.load(tmp_path / "cut" / "ckpt" / "last.ckpt", weights_only=True)
    _fit_scheduled(tmp_path / "whole", 5)
    whole = torch.load(tmp_path / "whole" / "ckpt" / "last.ckpt", weights_only=True)
    assert cut["global_step"] == whole["global_step"] == 5
    assert cut["lr_schedulers"] == whole["lr_schedulers"]
    assert cut["optimizer_states"][0]["param_groups"] == whole["optimizer_states"][0]["param_groups"]
    for key, state in whole["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(cut["optimizer_states"][0]["state"][key][name], value), (key, name)
    for name, value in whole["state_dict"].items():
        assert torch.equal(cut["state_dict"][name], value), name
    resumed = _fit_scheduled(tmp_path / "cut", 8, CheckpointOnSignal(), ckpt_path="last")
    assert resumed.global_step == 8
    assert resumed.optimizers[0].state_dict()["state"][0]["step"] == 8  # AdamW's moments continued, not restarted
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.9 ** 8)


@pytest.mark.parametrize("gain, expected", [(1.0, 1.0), (0.0, 0.0)])
def test_callback_logs_success_per_task_and_mean_every_n_validations(tmp_path, gain, expected):
    evaluations = []

    def factory(module):
        evaluations.append(module.current_epoch)
        return GainPolicy(module)

    callback = ClosedLoopEvalCallback(factory, tasks=["reachable", "blocked"], make_env=LineEnv, episodes_per_task=2,
                                      every_n_val_epochs=2, record_videos=1)
    trainer = Trainer(max_epochs=4, callbacks=[callback], default_root_dir=tmp_path, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=1)
    trainer.fit(GainModule(gain))
    assert evaluations == [1, 3]  # after the 2nd and 4th validation, never in the sanity check
    metrics = trainer.callback_metrics
    assert float(metrics["eval/success/reachable"]) == expected
    assert float(metrics["eval/success/blocked"]) == 0.0
    assert float(metrics["eval/success/mean"]) == pytest.approx(expected / 2)
    report = json.loads((tmp_path / "closed_loop" / f"step_{trainer.global_step}" / "results.json").read_text())
    assert report["success"] == {"reachable": expected, "blocked": 0.0}
    assert math.isclose(callback.last_results["average"], expected / 2)


class DriftingGainModule(GainModule):
    """SGD moves ``gain`` by -0.25 every step (loss = gain), so the raw and the averaged weights differ."""

    def training_step(self, batch, batch_idx):
        return self.gain.sum() + batch[0].sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.25)


def test_callback_rolls_out_the_averaged_weights_and_refuses_an_order_that_would_not(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    seen = []

    def factory(module):
        seen.append(float(module.gain))
        return GainPolicy(module)

    def fit(callbacks):
        trainer = Trainer(max_epochs=1, callbacks=callbacks, default_root_dir=tmp_path, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0)
        trainer.fit(DriftingGainModule(1.0))

    evaluate = ClosedLoopEvalCallback(factory, tasks=["reachable"], make_env=LineEnv, episodes_per_task=1,
                                      record_videos=0)
    fit([evaluate, EMAWeightAveraging(decay=0.5)])
    # Raw gain after the two steps: 0.75, 0.5. EMA: the first update copies (0.75), the second 0.5*0.75 + 0.5*0.5.
    assert seen == [pytest.approx(0.625)]
    with pytest.raises(ValueError, match="list ClosedLoopEvalCallback before EMAWeightAveraging"):
        fit([EMAWeightAveraging(decay=0.5), evaluate])
