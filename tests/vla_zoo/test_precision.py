"""``trainer.precision: auto``: bf16-mixed only with bf16 units and a measured speed-up, cached; 32-true otherwise;
the choice reaches the Trainer through the CLI, and bf16-mixed clips gradients with fused optimisers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch import Trainer as LightningTrainer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from components.action_head import FlowMatchingActionHead
from tests.conftest import REPO_ROOT
from vla_zoo import precision
from vla_zoo.cli import Trainer, VLAZooCLI
from vla_zoo.precision import (
    ENV_CHOICE,
    BF16MixedPrecision,
    choose_precision,
    matmul_shapes,
    measure_speed,
    planned_matmul_shapes,
)


class Measure:
    """A stand-in for the micro-measurement: bf16 takes ``fp32_s / speedup``; counts its calls."""

    def __init__(self, speedup: float) -> None:
        self.speedup, self.calls = speedup, 0

    def __call__(self, shapes, device, rows):
        self.calls += 1
        return {"fp32_s": 0.02, "bf16_s": 0.02 / self.speedup, "speedup": self.speedup}


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """bf16 units present, a private cache, and no choice inherited from a launching process."""
    monkeypatch.setattr(precision, "bf16_units", lambda device: "avx512_bf16")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(ENV_CHOICE, "")  # recorded, so the value resolve_auto sets is undone after the test
    monkeypatch.delenv(ENV_CHOICE)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return tmp_path


def tiny_head() -> FlowMatchingActionHead:
    return FlowMatchingActionHead(num_embodiments=2, max_state_dim=4, max_action_dim=4, horizon=4, hidden_dim=32,
                                  num_layers=2, num_heads=2, cross_attention_dim=16, embodiment_hidden_dim=32)


def test_bf16_chosen_where_measured_faster_and_fp32_where_not(machine) -> None:
    fast, slow = Measure(1.8), Measure(0.7)
    choice = choose_precision(tiny_head(), "cpu", measure=fast)
    assert choice.precision == "bf16-mixed" and fast.calls == 1
    assert "avx512_bf16" in choice.reason and "1.80x" in choice.reason, choice.reason
    # Another model (other shapes) is measured anew; here bf16 loses.
    choice = choose_precision(nn.Linear(8, 8), "cpu", measure=slow)
    assert choice.precision == "32-true" and slow.calls == 1
    assert "0.70x" in choice.reason and "under the 1.1x needed" in choice.reason, choice.reason
    # A speed-up inside the noise margin is not worth the switch.
    assert choose_precision(nn.Linear(8, 16), "cpu", measure=Measure(1.05)).precision == "32-true"


def test_no_bf16_units_falls_back_to_fp32_without_measuring(machine, monkeypatch) -> None:
    monkeypatch.setattr(precision, "bf16_units", lambda device: None)
    measure = Measure(3.0)
    choice = choose_precision(tiny_head(), "cpu", measure=measure)
    assert choice.precision == "32-true" and measure.calls == 0
    assert "no bf16 units" in choice.reason and "emulated" in choice.reason, choice.reason
    # An accelerator auto does not measure (TPU, MPS, ...) keeps fp32 too.
    choice = choose_precision(tiny_head(), "mps", measure=measure)
    assert choice.precision == "32-true" and measure.calls == 0 and "'mps'" in choice.reason


def test_measurement_is_cached_per_machine_and_model(machine) -> None:
    measure = Measure(1.5)
    head = tiny_head()
    assert choose_precision(head, "cpu", measure=measure).precision == "bf16-mixed"
    again = choose_precision(head, "cpu", measure=Measure(0.5))  # would say fp32 if it measured
    assert again.precision == "bf16-mixed" and "cached" in again.reason
    cache = machine / "vla_zoo" / "precision_auto.json"
    assert len(json.loads(cache.read_text())) == 1
    cache.write_text("{not json")  # torn or corrupt: measured again, never an error
    assert choose_precision(head, "cpu", measure=Measure(0.5)).precision == "32-true"


def test_ranks_launched_by_lightning_take_the_launching_process_choice(machine, monkeypatch) -> None:
    precision.resolve_auto(tiny_head(), "cpu", measure=Measure(2.0))  # the launching process
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning started for another rank
    measure = Measure(0.5)
    choice = choose_precision(tiny_head(), "cpu", measure=measure)
    assert choice.precision == "bf16-mixed" and measure.calls == 0 and ENV_CHOICE in choice.reason


def test_shapes_count_linear_layers_attentions_and_parts_built_later() -> None:
    shapes = matmul_shapes(tiny_head())
    assert shapes[("attention", 16)] == 2  # two DiT blocks of 2 heads x 16, each counted once
    assert shapes[("linear", 32, 128)] == 2  # the FFN's first layer of each block
    assert shapes[("linear", 4, 32)] == 2  # the first per-embodiment layer of the state and action encoders

    class Lazy(LightningModule):  # a part built in configure_model, as recipes' factories are
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(3, 5)
            self.body = None

        def configure_model(self) -> None:
            if self.body is None:
                self.body = nn.Linear(5, 7)

    lazy = Lazy()
    assert planned_matmul_shapes(lazy) == {("linear", 3, 5): 1, ("linear", 5, 7): 1}
    assert lazy.body is None and lazy.stem.weight.device.type == "cpu"  # the module itself is untouched


def test_measure_speed_times_both_arms() -> None:
    result = measure_speed({("linear", 8, 8): 2, ("attention", 8): 1}, torch.device("cpu"), rows=64, rounds=2)
    assert result["fp32_s"] > 0 and result["bf16_s"] > 0 and result["speedup"] > 0


@pytest.mark.parametrize("speedup, expected", [(2.0, "bf16-mixed"), (0.5, "32-true")])
def test_cli_resolves_auto_for_its_model(machine, monkeypatch, speedup, expected, tmp_path, caplog) -> None:
    measure = Measure(speedup)
    monkeypatch.setattr(precision, "measure_speed", measure)
    with caplog.at_level("INFO", logger="lightning.pytorch.vla_zoo"):
        cli = VLAZooCLI(args=["--config", str(REPO_ROOT / "recipes" / "minimal.yaml"), "--trainer.precision=auto",
                              "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert cli.trainer.precision == expected and measure.calls == 1
    assert isinstance(cli.trainer.precision_plugin, BF16MixedPrecision) == (expected == "bf16-mixed")
    assert f"precision auto -> {expected}" in caplog.text
    assert cli.config["trainer"]["precision"] == "auto"  # the saved recipe keeps the rule, not this machine's answer


class FusedAdamW(BoringModel):
    def configure_optimizers(self):
        self.norms: list[float] = []
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=True)

    def on_before_zero_grad(self, optimizer) -> None:  # the gradients the last step was taken with (clipped)
        grads = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        if grads:
            self.norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))


def test_bf16_mixed_clips_gradients_with_a_fused_optimizer(tmp_path: Path) -> None:
    kwargs = dict(accelerator="cpu", precision="bf16-mixed", gradient_clip_val=1e-3, max_steps=2, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="fused"):  # Lightning's own refuses
        LightningTrainer(**kwargs).fit(FusedAdamW())
    model = FusedAdamW()
    trainer = Trainer(**kwargs)
    trainer.fit(model)
    assert trainer.precision == "bf16-mixed" and trainer.global_step == 2
    assert model.norms and max(model.norms) <= 1e-3 * 1.01, model.norms
