"""recipes/finetune_lora.yaml: LoRA on the LM and the DiT, the embodiment adapters and projector trained in full."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.model_summary import ModelSummary

from tests.conftest import REPO_ROOT
from vla_zoo.cli import VLAZooCLI

RECIPES = REPO_ROOT / "recipes"


def test_finetune_lora_recipe_trains_adapters_and_projectors_only(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["vla-zoo"])
    args = []
    for name in ("pretrain.yaml", "posttrain.yaml", "finetune_lora.yaml"):
        args += ["--config", str(RECIPES / name)]
    model = VLAZooCLI(args=args, run=False).model
    model.configure_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # the projectors: the output projector and, in the default ComposedBackbone, its pixel-shuffle connector
    full = ("backbone.projector.", "backbone.connector.", "action_head.state_encoder.", "action_head.action_encoder.",
            "action_head.action_decoder.", "action_head.position_embedding")
    assert trainable and all(".lora_" in n or n.startswith(full) for n in trainable), sorted(trainable)[:10]
    lora = {n for n in trainable if ".lora_" in n}
    assert any(n.startswith("action_head.blocks.") for n in lora) and any(n.startswith("backbone.") for n in lora)
    # what the fit's model summary prints: trainable of total
    summary = ModelSummary(model)
    assert 0 < summary.trainable_parameters < summary.total_parameters / 2
    assert summary.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the LM's wrapped projections: base frozen, adapters at their identity start (B = 0)
    lm = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "base_layer")][0]
    assert lm.base_layer.weight.requires_grad is False and torch.count_nonzero(lm.lora_B.default.weight) == 0
