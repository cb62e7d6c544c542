"""LoRA (peft) on the DiT and on the LM, and the tune_* flags: what trains, what stays bit-identical, what reloads."""

from __future__ import annotations

import copy

import pytest
import torch

from components.action_head import FlowMatchingActionHead
from components.backbones import ComposedBackbone
from components.lora import LoRA, adapter_state_dict, has_lora, load_adapters, merge_lora, save_adapters


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_head(**overrides) -> FlowMatchingActionHead:
    cfg = dict(num_embodiments=2, max_state_dim=4, max_action_dim=3, horizon=4, hidden_dim=32, num_layers=2,
               num_heads=2, cross_attention_dim=16, dropout=0.0, embodiment_hidden_dim=32)
    return FlowMatchingActionHead(**{**cfg, **overrides})


def head_batch(seed: int = 0, B: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 5, 16, generator=g), torch.ones(B, 5, dtype=torch.bool), torch.randn(B, 4, generator=g),
            torch.randn(B, 4, 3, generator=g), torch.ones(B, 4, 3, dtype=torch.bool), torch.arange(B) % 2)


def train_steps(module, loss_fn, steps: int = 5) -> None:
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(step).backward()
        opt.step()


LORA = LoRA(rank=4, alpha=8.0, dropout=0.0)


def test_dit_lora_trains_adapters_while_the_dit_stays_bit_identical():
    torch.manual_seed(0)
    head = tiny_head(tune_diffusion_model=False, lora=LORA)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith(("state_encoder", "action_encoder", "action_decoder",
                                                             "position_embedding")) for n in trainable)
    train_steps(head, lambda step: head.loss(*head_batch(step))["loss"])
    after = head.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    dit = [k for k in before if k.startswith(("blocks.", "timestep_embedding.", "norm_out.", "proj_out."))]
    assert not changed & {k for k in dit if ".lora_" not in k}  # every DiT weight bit-identical
    assert {k for k in dit if ".lora_B" in k} <= changed  # every adapter moved (B starts at 0)
    assert any(k.startswith("action_decoder.") for k in changed)  # tune_projector: the adapters of the robot train


def test_merged_and_unmerged_lora_agree_and_merge_leaves_plain_linears():
    torch.manual_seed(0)
    head = tiny_head(tune_diffusion_model=False, lora=LORA)
    with torch.no_grad():  # non-zero adapters, so merging has something to fold in
        for name, p in head.named_parameters():
            if ".lora_B" in name:
                p.normal_(std=0.5)
    head.eval()
    vl, mask, state, actions, _, ids = head_batch()
    t = torch.rand(8)
    unmerged = head(actions, t, vl, mask, state, ids)
    merged_head = merge_lora(copy.deepcopy(head))
    assert not has_lora(merged_head)
    assert all(".lora_" not in k and "base_layer" not in k for k in merged_head.state_dict())
    torch.testing.assert_close(merged_head(actions, t, vl, mask, state, ids), unmerged, rtol=1e-5, atol=1e-5)
    plain = tiny_head()  # the merged weights are a plain head's
    plain.load_state_dict(merged_head.state_dict())
    assert (plain.eval()(actions, t, vl, mask, state, ids) - unmerged).abs().max() < 1e-5
    assert (head.blocks[0].to_q.get_base_layer().weight - merged_head.blocks[0].to_q.weight).abs().max() > 1e-3


def test_adapter_only_checkpoint_is_small_and_reloads_onto_the_plain_base(tmp_path):
    torch.manual_seed(0)
    base = tiny_head(num_layers=4, hidden_dim=64, embodiment_hidden_dim=64).state_dict()  # a "pretrained" head
    kwargs = dict(num_layers=4, hidden_dim=64, embodiment_hidden_dim=64, tune_diffusion_model=False,
                  tune_projector=False, lora=LoRA(rank=2, alpha=4.0, dropout=0.0))
    head = tiny_head(**kwargs)
    head.load_state_dict(base)  # plain keys into the wrapped DiT: the adapters keep their identity start
    train_steps(head, lambda step: head.loss(*head_batch(step))["loss"])
    save_adapters(head, tmp_path / "adapters.safetensors")
    torch.save(head.state_dict(), tmp_path / "full.pt")
    size, full = (tmp_path / "adapters.safetensors").stat().st_size, (tmp_path / "full.pt").stat().st_size
    assert size < full / 10, (size, full)

    torch.manual_seed(123)  # a different random start: everything must come from the base and the adapters
    fresh = tiny_head(**kwargs)
    fresh.load_state_dict(base)
    load_adapters(fresh, tmp_path / "adapters.safetensors")
    vl, mask, state, actions, _, ids = head_batch(99)
    t = torch.rand(8)
    assert torch.equal(fresh.eval()(actions, t, vl, mask, state, ids), head.eval()(actions, t, vl, mask, state, ids))
    with pytest.raises(ValueError, match="do not match this model's LoRA layers"):
        load_adapters(tiny_head(**{**kwargs, "lora": LoRA(rank=2, target_modules=["to_q"])}),
                      tmp_path / "adapters.safetensors")


def test_llm_lora_trains_adapters_while_the_lm_stays_bit_identical():
    torch.manual_seed(0)
    backbone = ComposedBackbone(tune_llm=False, tune_visual=False, llm_lora=LORA)
    assert backbone.language_model.training is True  # frozen, but carries adapters: follows the trainer
    lm = backbone.language_model
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    images = torch.randint(0, 255, (2, 1, 3, 64, 64), dtype=torch.uint8)
    train_steps(backbone, lambda step: backbone(images, ["pick", "place"])[0].square().mean())
    changed = {k for k, v in lm.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".lora_" in k for k in changed)
    assert {k for k in before if ".lora_B" in k} <= changed
    assert set(adapter_state_dict(lm)) == {k for k in before if ".lora_" in k}


def test_tune_flags_freeze_their_parts_and_keep_them_in_eval():
    head = tiny_head(tune_projector=False, dropout=0.2).train()
    frozen = ("state_encoder", "action_encoder", "action_decoder", "position_embedding")
    for name, p in head.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen)), name
    assert not head.action_decoder.training and head.blocks.training
    head = tiny_head(tune_diffusion_model=False).train()
    assert not any(p.requires_grad for p in head.blocks.parameters()) and not head.blocks.training
    assert all(p.requires_grad for p in head.action_encoder.parameters())


def test_lora_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="set tune_diffusion_model: false"):
        tiny_head(lora=LORA)
    with pytest.raises(ValueError, match="set tune_llm: false"):
        ComposedBackbone(tune_llm=True, llm_lora=LORA)
    with pytest.raises(ValueError, match=r"match no linear layer here; its linear layers are named \[.*'to_q'"):
        tiny_head(tune_diffusion_model=False, lora=LoRA(target_modules=["q_proj"]))
