"""What both System 2 adapters share: middle-layer truncation, pixel shuffle, the output projector, image
preprocessing in torch, prompt caching and the freeze/eval logic.

A backbone turns V camera views and an instruction into vision-language tokens for the action head:
frames -> vision tower -> connector (pixel shuffle + projection into the LM's width) -> image embeddings placed at the
image slots of the chat-format prompt -> the LM's first ``select_layer`` decoder layers -> LayerNorm + Linear to
``project_to``. GR00T N1 reads layer 12 of a 24-layer LM: middle layers carry more transferable features than the last
one, and the layers above are never built.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.utils import logging as hf_logging

from ..lora import LoRA, add_lora

#: The LM linears that ``llm_lora`` wraps unless told otherwise (Llama / Qwen / Gemma / Mistral attention).
LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

# A Hugging Face Hub model id: "name" or "namespace/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read now rather than at import."""
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_kwargs(path: str, key: str) -> dict[str, Any]:
    """``from_pretrained`` options for ``path``: a local directory (read from disk only) or a Hub id (downloaded
    into the Hugging Face cache when online; read from that cache alone when ``HF_HUB_OFFLINE`` is set).

    A path that cannot be a Hub id (absolute, ``./``, ``~``, several ``/``) but is no directory raises, naming the
    recipe key ``key``, before transformers answers with an error about the Hub.
    """
    if os.path.isdir(path):
        return {"local_files_only": True}
    if not _HUB_ID.fullmatch(path) or path.startswith("."):
        raise FileNotFoundError(
            f"{key}: {path!r} is not a directory; give a directory written with save_pretrained or a Hugging Face "
            "Hub id such as HuggingFaceTB/SmolVLM-256M-Instruct"
        )
    return {"local_files_only": True} if hub_offline() else {}


def load_config(path: str, key: str):
    """``AutoConfig`` of a local directory or Hub id (``hub_kwargs``), with an error naming ``key`` when an offline
    Hub id is not in the local cache."""
    kwargs = hub_kwargs(path, key)
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except OSError as err:
        if os.path.isdir(path) or not hub_offline():
            raise
        raise FileNotFoundError(
            f"{key}: {path!r} is not a local directory, and HF_HUB_OFFLINE is set, so it is read from the Hugging "
            "Face cache, which does not hold it; unset HF_HUB_OFFLINE to download it or give a local directory"
        ) from err


def truncated_text_config(config, select_layer: int):
    """A copy of a decoder-only LM ``config`` keeping layers ``[0, select_layer)`` (negative counts from the end).

    Building (or loading) a model from the returned config never creates the dropped layers, so they cost no memory,
    no load time and no compute; their checkpoint weights are skipped as unexpected keys.
    """
    total = config.num_hidden_layers
    keep = select_layer if select_layer > 0 else total + select_layer
    if not 1 <= keep <= total:
        raise ValueError(
            f"select_layer={select_layer} leaves {keep} of the LM's {total} layers; "
            f"use 1..{total} (layers kept from the bottom) or -{total - 1}..-1 (layers dropped from the top)"
        )
    config = copy.deepcopy(config)
    config.num_hidden_layers = keep
    # Models with per-layer kinds (sliding/full attention: Qwen2, Gemma, SmolLM3) validate the list against the count.
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:keep]
    return config


def strip_final_norm(decoder: nn.Module) -> nn.Module:
    """Make ``decoder(...).last_hidden_state`` the raw residual stream after its last kept layer.

    The final norm is trained for the output of the LM's top layer, not for a middle one; the adapter's projector
    normalises the features itself. Without it, the features equal ``hidden_states[select_layer]`` of the full model.
    """
    if not isinstance(getattr(decoder, "norm", None), nn.Module) or not hasattr(decoder, "layers"):
        raise TypeError(
            f"{type(decoder).__name__} is not a Llama-style decoder (`.layers` + final `.norm`); backbones support "
            "Llama, Mistral, Qwen2/3, Gemma, SmolLM2/3-style language models"
        )
    decoder.norm = nn.Identity()
    return decoder


def load_pretrained(path: str, config, decoder_of: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """``AutoModel.from_pretrained`` from a local directory or a Hub id (``hub_kwargs``), in float32 (Lightning's
    precision plugin casts).

    Weights we skip on purpose (dropped layers, LM and pooling heads, the text tower of a dual encoder) are not
    reported; a weight the built model needs but the checkpoint lacks is an error. ``decoder_of`` picks the LM
    decoder whose final norm gets stripped (see ``strip_final_norm``).
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModel.from_pretrained(
            path, config=config, dtype=torch.float32, output_loading_info=True, **hub_kwargs(path, "pretrained path")
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if decoder_of is not None:
        strip_final_norm(decoder_of(model))
    missing = sorted(set(info["missing_keys"]) & set(model.state_dict()))
    if missing:
        raise ValueError(f"{path}: the checkpoint has no weights for {len(missing)} parameters, e.g. {missing[:5]}")
    return model


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Space-to-depth over a square patch grid: ``[N, g*g, D] -> [N, (g/scale)^2, D*scale^2]``.

    Each output token concatenates a ``scale x scale`` block of neighbouring patches, cutting the tokens per image by
    ``scale^2`` without dropping information (Eagle-2 / Idefics3 use it to reach 64 tokens per frame).
    """
    n, p, d = x.shape
    g = int(round(p**0.5))
    if g * g != p or g % scale:
        raise ValueError(f"pixel shuffle needs a square patch grid divisible by scale={scale}, got {p} patches")
    x = x.view(n, g // scale, scale, g // scale, scale, d)  # [N, gh, sh, gw, sw, D]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [N, gh, gw, sh, sw, D]
    return x.reshape(n, (g // scale) ** 2, scale * scale * d)


class OutputProjector(nn.Sequential):
    """LayerNorm + Linear from the LM's width to the action head's (GR00T: ``vlln`` + ``eagle_linear``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))


class VisionLanguageBackbone(nn.Module):
    """Base of the adapters: the shared forward, the tuning flags and prompt caching.

    Subclasses build their modules (``projector`` among them), then call ``_finish_init``. They implement
    ``tunable_parts`` (every parameter in exactly one of "visual", "llm", "projector"), ``_embed_images``,
    ``_embed_tokens``, ``_language_model`` and ``_prompt`` (one instruction's prompt ids and which are image slots).
    """

    # Robot datasets repeat a few hundred instructions; the cache makes tokenisation free after the first batches.
    max_cached_prompts = 65536

    def __init__(self, project_to: int, max_text_tokens: int) -> None:
        super().__init__()
        if project_to < 1 or max_text_tokens < 1:
            raise ValueError(f"project_to and max_text_tokens must be >= 1, got {project_to}, {max_text_tokens}")
        self.out_dim = project_to
        self.max_text_tokens = max_text_tokens
        self._prompt_cache: dict[tuple[str, int], tuple[list[int], list[bool]]] = {}

    def _finish_init(
        self,
        *,
        tokenizer,
        image_size: int,
        image_mean,
        image_std,
        rescale_factor: float,
        tokens_per_image: int,
        tune_llm: bool,
        tune_visual: bool,
        tune_projector: bool,
        llm_lora: LoRA | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.tokens_per_image = tokens_per_image
        # Padding ids only need to exist in the vocabulary: the mask hides them and image slots are overwritten.
        self.pad_token_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        # uint8 -> normalised float as one affine map per channel: x * scale + shift.
        mean = torch.as_tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.as_tensor(image_std, dtype=torch.float32).view(3, 1, 1)
        self.register_buffer("_pixel_scale", rescale_factor / std, persistent=False)
        self.register_buffer("_pixel_shift", -mean / std, persistent=False)
        _, is_image = self._prompt("check", 1)
        if sum(is_image) != tokens_per_image:
            raise ValueError(
                f"the prompt holds {sum(is_image)} image tokens per view but the connector emits {tokens_per_image}; "
                "the processor's image_seq_len must equal (image_size // patch_size)**2 // scale_factor**2"
            )
        self.tune = {"visual": tune_visual, "llm": tune_llm, "projector": tune_projector}
        parts = self.tunable_parts()
        for name, modules in parts.items():
            for module in modules:
                module.requires_grad_(self.tune[name])
        if llm_lora is not None:
            if tune_llm:
                raise ValueError("backbone: llm_lora trains adapters on the frozen language model; set tune_llm: "
                                 "false with it (or drop llm_lora to train the whole LM)")
            add_lora(self._language_model(), llm_lora, LLM_LORA_TARGETS)
        owned = {id(p) for modules in parts.values() for m in modules for p in m.parameters()}
        stray = [n for n, p in self.named_parameters() if id(p) not in owned]
        assert not stray, f"parameters outside every tunable part: {stray}"
        self.train(self.training)

    def tunable_parts(self) -> dict[str, list[nn.Module]]:
        raise NotImplementedError

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode whatever the trainer asks, so forward never has to re-force it; a frozen
        part that carries LoRA adapters follows the trainer (its adapters' dropout)."""
        super().train(mode)
        for name, modules in self.tunable_parts().items():
            if not self.tune[name]:
                for module in modules:
                    if not any(p.requires_grad for p in module.parameters()):
                        module.eval()
        return self

    # --- prompts -------------------------------------------------------------------------------------------------

    def _truncated_instruction(self, instruction: str) -> str:
        ids = self.tokenizer(instruction, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_text_tokens:
            return instruction
        return self.tokenizer.decode(ids[: self.max_text_tokens])

    def _prompt(self, instruction: str, num_views: int) -> tuple[list[int], list[bool]]:
        raise NotImplementedError

    def _tokenize(self, instructions: list[str], num_views: int, device) -> tuple[torch.Tensor, ...]:
        prompts = []
        for instruction in instructions:
            key = (instruction, num_views)
            if key not in self._prompt_cache:
                if len(self._prompt_cache) >= self.max_cached_prompts:
                    self._prompt_cache.clear()
                self._prompt_cache[key] = self._prompt(self._truncated_instruction(instruction), num_views)
            prompts.append(self._prompt_cache[key])
        lengths = [len(ids) for ids, _ in prompts]
        length = max(lengths)
        # Right padding: with causal attention, real tokens never see the padding after them, so their features do
        # not depend on how much of it the batch needed.
        ids = torch.tensor([ids + [self.pad_token_id] * (length - n) for (ids, _), n in zip(prompts, lengths)])
        is_image = torch.tensor([slots + [False] * (length - n) for (_, slots), n in zip(prompts, lengths)])
        mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
        return ids.to(device), is_image.to(device), mask.to(device)

    # --- forward -------------------------------------------------------------------------------------------------

    def _pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, h, w]`` -> normalised float ``[N, 3, S, S]`` at the vision tower's resolution, batched."""
        x = frames.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return (x * self._pixel_scale + self._pixel_shift).to(self._pixel_dtype())

    def _pixel_dtype(self) -> torch.dtype:
        return next(p for m in self.tunable_parts()["visual"] for p in m.parameters()).dtype

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:  # [N, 3, S, S] -> [N, T, D_lm]
        raise NotImplementedError

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, D_lm]
        raise NotImplementedError

    def _language_model(self) -> nn.Module:
        raise NotImplementedError

    def features(self, images: torch.Tensor, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's hidden state after layer ``select_layer`` ``[B, S, D_lm]`` and its mask ``[B, S]``."""
        if images.dtype != torch.uint8 or images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be uint8 [B, V, 3, h, w], got {images.dtype} {list(images.shape)}")
        b, v = images.shape[:2]
        if len(instructions) != b:
            raise ValueError(f"got {len(instructions)} instructions for a batch of {b} image sets")
        ids, is_image, mask = self._tokenize(list(instructions), v, images.device)
        # No torch.no_grad() around frozen parts: their parameters do not require grad, so autograd records nothing
        # for them unless gradients must flow through them to a tuned part upstream (e.g. a tuned vision tower
        # under a frozen LM), which is exactly when the graph is needed.
        image_embeds = self._embed_images(self._pixels(images.flatten(0, 1)))  # [B*V, T, D]
        embeds = self._embed_tokens(ids)  # [B, L, D]
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))
        out = self._language_model()(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        return out.last_hidden_state, mask

    def forward(self, images: torch.Tensor, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[B, V, 3, h, w]`` + B instructions -> tokens ``[B, S, out_dim]``, mask ``[B, S]`` (True = real)."""
        hidden, mask = self.features(images, instructions)
        return self.projector(hidden), mask
