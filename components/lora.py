"""LoRA adapters (through ``peft``) on a component's sub-module: the LM of a backbone, the DiT blocks of a head.

``add_lora`` injects peft's LoRA layers in place (``inject_adapter_in_model``): each targeted ``nn.Linear`` becomes
``y = W x + (alpha / r) B A x`` with ``W`` frozen and ``A [r, in]``, ``B [out, r]`` trained (``B`` starts at zero,
so the wrapped module computes exactly what it did). peft freezes every other weight of the wrapped module too.

State dicts: a LoRA-wrapped module stores ``x.base_layer.weight`` and ``x.lora_{A,B}.default.weight`` where the
plain module stored ``x.weight``. ``add_lora`` registers load hooks so that a plain state dict (a pretrained
checkpoint, ``init_from``, an imported GR00T checkpoint) loads into the wrapped module, the adapters keeping their
identity start; a state dict that has adapters loads them, and must have all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_MARK = ".lora_"


@dataclass
class LoRA:
    """LoRA settings: ``rank`` r, ``alpha`` (scale alpha / r), ``dropout`` on the adapter's input, and the
    ``target_modules`` (names or name suffixes of ``nn.Linear`` layers; None: the component's default)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | None = None


def add_lora(module: nn.Module, spec: LoRA, default_targets: Sequence[str]) -> None:
    """Wrap ``module``'s target linears with LoRA adapters in place (its other weights frozen, adapters trainable)."""
    if spec.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {spec.rank}")
    targets = list(spec.target_modules or default_targets)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    try:
        inject_adapter_in_model(config, module)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA target_modules {targets} match no linear layer here; its linear layers are named "
                         f"{names}") from err
    plain_load: dict[str, object] = {}

    def rename_plain_keys(_module, state_dict, prefix, *_args) -> None:
        # a plain state dict names the wrapped linear's weight ``x.weight``; the wrapper holds it as ``x.base_layer``
        plain_load["prefix"] = prefix
        plain_load["plain"] = not any(k.startswith(prefix) and ADAPTER_MARK in k for k in state_dict)
        for name, layer in module.named_modules():
            if isinstance(layer, LoraLayer):
                for p in ("weight", "bias"):
                    plain, based = f"{prefix}{name}.{p}", f"{prefix}{name}.base_layer.{p}"
                    if plain in state_dict and based not in state_dict:
                        state_dict[based] = state_dict.pop(plain)

    def keep_fresh_adapters(_module, incompatible) -> None:
        # loading a plain state dict: the adapters keep their start (B = 0, the identity), not an error
        if plain_load.get("plain"):
            prefix = plain_load["prefix"]
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                            if not (k.startswith(prefix) and ADAPTER_MARK in k)]

    module.register_load_state_dict_pre_hook(rename_plain_keys)
    module.register_load_state_dict_post_hook(keep_fresh_adapters)


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in module.modules())


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W += (alpha / r) B A``) and put the plain linear back, in place:
    the result computes the same and needs neither peft nor the adapters (for export and deployment)."""
    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, layer.get_base_layer())
    return module


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA adapters' tensors of ``module``'s state dict (what fine-tuning changed on wrapped modules)."""
    return {k: v.detach() for k, v in module.state_dict().items() if ADAPTER_MARK in k}


def save_adapters(module: nn.Module, path: str | Path) -> None:
    """Write the adapters alone (safetensors, data only): megabytes where the model is gigabytes."""
    save_file({k: v.contiguous() for k, v in adapter_state_dict(module).items()}, str(path))


def load_adapters(module: nn.Module, path: str | Path) -> None:
    """Load adapters written by ``save_adapters`` into a module wrapped with the same LoRA settings."""
    adapters = load_file(str(path))
    expected = adapter_state_dict(module).keys()
    missing, unexpected = sorted(expected - adapters.keys()), sorted(adapters.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: the adapters do not match this model's LoRA layers (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); build the model with the LoRA settings that trained them")
    module.load_state_dict(adapters, strict=False)
