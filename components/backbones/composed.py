"""A System 2 backbone composed from any ``transformers`` vision encoder and any Llama-style causal LM.

Eagle-2 in GR00T N1 is exactly such a composition (SigLIP + pixel shuffle + MLP + SmolLM2); this adapter builds one
from separate checkpoints, e.g. SigLIP2 + Qwen3 or SigLIP + SmolLM2, or from small random configs. The prompt is the
LM's own chat format (when its tokenizer has one) with one block of image slots per view before the instruction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from ..lora import LoRA
from ..mlp import MLP
from .common import (
    hub_kwargs,
    load_config,
    OutputProjector,
    VisionLanguageBackbone,
    load_pretrained,
    pixel_shuffle,
    strip_final_norm,
    truncated_text_config,
)
from .tokenizer import IMAGE_TOKEN, offline_tokenizer
from .vision import SpatialSoftmaxKeypoints, build_vision_encoder


class PixelShuffleConnector(nn.Module):
    """Patch features ``[N, g*g, D_v]`` -> ``[N, (g/s)^2, D_lm]``: pixel shuffle, then LayerNorm + 2-layer MLP
    (Eagle-2's ``mlp1``), or one Linear (``layers=1``: Eagle 2.5's ``mlp1`` in GR00T N1.5, with ``s = 1``)."""

    def __init__(self, vision_dim: int, lm_dim: int, scale_factor: int, layers: int = 2) -> None:
        super().__init__()
        if layers not in (1, 2):
            raise ValueError(f"connector layers must be 1 (Linear) or 2 (LayerNorm + MLP), got {layers}")
        self.scale_factor = scale_factor
        in_dim = vision_dim * scale_factor**2
        self.mlp = (nn.Sequential(nn.LayerNorm(in_dim), MLP(in_dim, [lm_dim], lm_dim)) if layers == 2
                    else nn.Sequential(nn.Linear(in_dim, lm_dim)))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(patches, self.scale_factor))


def _language_model(path: str | None, tokenizer, select_layer: int, model_type: str, hidden_size: int, layers: int,
                    heads: int, config_overrides: dict[str, Any] | None = None,
                    keep_final_norm: bool = False) -> nn.Module:
    """The LM's first ``select_layer`` decoder layers: from a local checkpoint, or random from the size arguments
    (vocabulary and special tokens from ``tokenizer``) and ``config_overrides``; its final norm stripped unless
    ``keep_final_norm``."""
    if path is not None:
        config = load_config(path, "lm_pretrained_path")
        return load_pretrained(path, truncated_text_config(config, select_layer),
                               decoder_of=None if keep_final_norm else lambda model: model)
    config = AutoConfig.for_model(model_type, **{
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 3 * hidden_size,  # SmolLM2: 2.7x
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **(config_overrides or {}),
    })
    model = AutoModel.from_config(truncated_text_config(config, select_layer))
    return model if keep_final_norm else strip_final_norm(model)


def output_projector(kind: str, lm_dim: int, project_to: int) -> nn.Module:
    """LM width -> ``project_to``: LayerNorm + Linear, a Linear, or nothing (the widths must then agree)."""
    if kind == "norm_linear":
        return OutputProjector(lm_dim, project_to)
    if kind == "linear":
        return nn.Linear(lm_dim, project_to)
    if kind == "identity":
        if project_to != lm_dim:
            raise ValueError(f"projector='identity' passes the LM's width ({lm_dim}) on, but project_to={project_to}; "
                             f"set project_to: {lm_dim} or choose projector 'linear'")
        return nn.Identity()
    raise ValueError(f"projector={kind!r}: use 'norm_linear', 'linear' or 'identity'")


class ComposedBackbone(VisionLanguageBackbone):
    """VL tokens from a vision encoder + pixel-shuffle connector + a truncated causal LM.

    Args:
        vision_pretrained_path: local directory of a vision checkpoint (SigLIP / SigLIP2 / CLIP, a full dual-encoder
            checkpoint is fine: its vision half is taken; or a conv encoder such as ResNet / ConvNeXt, whose feature
            map cells become the patch tokens) with its ``preprocessor_config.json``. None: random
            ``vision_model_type`` encoder from the size arguments (a ViT type, or ``"resnet"``: a stride-4 stem and
            ``vision_layers`` basic-block stages of ``vision_hidden_size`` channels, grid image_size / 2^(1 + layers);
            for it, ``vision_hidden_size`` may also list each stage's channels, e.g. ``[32, 64]``: the first stage
            runs at the finest grid and costs most, so narrowing it alone keeps the output width for less compute).
        lm_pretrained_path: local directory of a causal LM (Llama-style: SmolLM2, Qwen2/3, Llama, Mistral, Gemma)
            with its tokenizer. None: random ``lm_model_type`` LM with the offline tokenizer.
        select_layer: keep LM layers ``[0, select_layer)``; negative counts from the top.
        project_to: width of the output tokens; also ``out_dim``.
        tune_llm / tune_visual: train the LM / the vision encoder.
        tune_projector: train the connector and the output projector (both new: not in any checkpoint).
        image_size: frames are resized to this (a fixed-resolution checkpoint's own size overrides it; SigLIP2
            NaFlex encoders take any multiple of the patch size).
        scale_factor: pixel shuffle factor; tokens per view = (image_size / patch_size / scale_factor) ** 2.
        keypoints: conv encoders only: K > 0 adds one token per view holding K spatial-softmax keypoints of the
            feature map (``SpatialSoftmaxKeypoints``), for precise object positions; 0 (default): none.
        coord_channels: random conv towers only: append two channels holding each pixel's (x, y) in [-1, 1] to the
            image (CoordConv, Liu et al. 2018), so a filter can read where a feature is, not only that it is there.
        vision_config_overrides / lm_config_overrides: random builds only: further ``transformers`` config fields
            (e.g. ``intermediate_size``, ``num_key_value_heads``, ``vocab_size``) over the ones derived from the
            size arguments, so a random build can have a published architecture (``recipes/groot/``).
        llm_lora: peft LoRA adapters on the LM's attention projections (``components.lora.LoRA``); needs
            ``tune_llm=False``: the adapters train, the LM stays as loaded.
        keep_final_norm: keep the LM's final norm on the output of layer ``select_layer`` (Isaac-GR00T reads the
            LM's last hidden state of its truncated LM, which is normed). Default: stripped (see ``strip_final_norm``).
        connector: ``"mlp"`` (LayerNorm + 2-layer MLP after the pixel shuffle) or ``"linear"`` (one Linear: GR00T
            N1.5's connector, with ``scale_factor: 1``).
        projector: the output projector: ``"norm_linear"`` (LayerNorm + Linear), ``"linear"`` (GR00T N1's
            ``backbone.linear``) or ``"identity"`` (GR00T N1.5: the LM's width goes to the head; ``project_to`` must
            equal it).
        tokenizer_path: a local tokenizer directory for an LM built from its config (weights loaded afterwards,
            e.g. an imported checkpoint); default: the LM checkpoint's tokenizer, or the offline one.
    """

    def __init__(
        self,
        vision_pretrained_path: str | None = None,
        lm_pretrained_path: str | None = None,
        *,
        select_layer: int = 2,
        project_to: int = 128,
        tune_llm: bool = False,
        tune_visual: bool = True,
        tune_projector: bool = True,
        max_text_tokens: int = 32,
        image_size: int = 64,
        scale_factor: int = 2,
        vision_model_type: str = "siglip_vision_model",
        patch_size: int = 8,
        vision_hidden_size: int | list[int] = 64,
        vision_layers: int = 2,
        vision_heads: int = 4,
        lm_model_type: str = "llama",
        lm_hidden_size: int = 128,
        lm_layers: int = 4,
        lm_heads: int = 4,
        keypoints: int = 0,
        coord_channels: bool = False,
        vision_config_overrides: dict[str, Any] | None = None,
        lm_config_overrides: dict[str, Any] | None = None,
        llm_lora: LoRA | None = None,
        keep_final_norm: bool = False,
        connector: str = "mlp",
        projector: str = "norm_linear",
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__(project_to, max_text_tokens)
        tokenizer_key = "tokenizer_path" if tokenizer_path else "lm_pretrained_path"
        tokenizer_path = tokenizer_path or lm_pretrained_path
        self.tokenizer = (
            offline_tokenizer()
            if tokenizer_path is None
            else AutoTokenizer.from_pretrained(tokenizer_path, **hub_kwargs(tokenizer_path, tokenizer_key))
        )
        self.vision_model, self.vision = build_vision_encoder(
            vision_pretrained_path, image_size=image_size, model_type=vision_model_type, patch_size=patch_size,
            hidden_size=vision_hidden_size, layers=vision_layers, heads=vision_heads, coord_channels=coord_channels,
            config_overrides=vision_config_overrides,
        )
        if self.vision.grid % scale_factor:
            raise ValueError(f"the vision encoder's {self.vision.grid}x{self.vision.grid} patch grid at image_size="
                             f"{self.vision.image_size} is not a multiple of scale_factor={scale_factor}; change one "
                             "of them")
        self.language_model = _language_model(lm_pretrained_path, self.tokenizer, select_layer, lm_model_type,
                                              lm_hidden_size, lm_layers, lm_heads, lm_config_overrides,
                                              keep_final_norm=keep_final_norm)
        lm_dim = self.language_model.config.hidden_size

        if connector not in ("mlp", "linear"):
            raise ValueError(f"connector={connector!r}: use 'mlp' (LayerNorm + 2-layer MLP) or 'linear' (one Linear)")
        self.connector = PixelShuffleConnector(self.vision.dim, lm_dim, scale_factor,
                                               layers=2 if connector == "mlp" else 1)
        if keypoints < 0 or (keypoints and not self.vision.feature_map):
            raise ValueError(f"keypoints={keypoints}: spatial-softmax keypoints need a conv vision encoder (a feature "
                             "map, e.g. vision_model_type: resnet) and a count >= 0; set keypoints: 0 for this encoder")
        self.keypoint_reader = SpatialSoftmaxKeypoints(self.vision.dim, keypoints, lm_dim) if keypoints else None
        self.projector = output_projector(projector, lm_dim, project_to)
        self._finish_init(
            tokenizer=self.tokenizer,
            image_size=self.vision.image_size,
            image_mean=self.vision.image_mean,
            image_std=self.vision.image_std,
            rescale_factor=self.vision.rescale_factor,
            tokens_per_image=(self.vision.grid // scale_factor) ** 2 + (1 if keypoints else 0),
            tune_llm=tune_llm,
            tune_visual=tune_visual,
            tune_projector=tune_projector,
            llm_lora=llm_lora,
        )

    def tunable_parts(self) -> dict[str, list[nn.Module]]:
        return {
            "visual": [self.vision_model],
            "llm": [self.language_model],
            "projector": [self.connector, self.projector]
            + ([self.keypoint_reader] if self.keypoint_reader is not None else []),
        }

    def _prompt(self, instruction: str, num_views: int) -> tuple[list[int], list[bool]]:
        tok = self.tokenizer
        content = IMAGE_TOKEN * num_views + instruction
        if tok.chat_template:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            prefix = []
        else:
            prompt, prefix = content, [tok.bos_token_id] if tok.bos_token_id is not None else []
        # Text around the image slots is tokenised piece by piece so no merge can swallow a slot; the slots' ids
        # are placeholders whose embeddings get replaced by the image tokens.
        pieces = [tok(text, add_special_tokens=False)["input_ids"] for text in prompt.split(IMAGE_TOKEN)]
        ids, is_image = list(prefix), [False] * len(prefix)
        for i, piece in enumerate(pieces):
            if i:
                ids += [self.pad_token_id] * self.tokens_per_image
                is_image += [True] * self.tokens_per_image
            ids += piece
            is_image += [False] * len(piece)
        return ids, is_image

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        patches, feature_map = self.vision.features(self.vision_model, pixels)  # [N, g*g, D_v], [N, D_v, g, g]
        tokens = self.connector(patches)  # [N, (g/s)^2, D_lm]
        if self.keypoint_reader is None:
            return tokens
        return torch.cat([tokens, self.keypoint_reader(feature_map)], dim=1)  # [N, (g/s)^2 + 1, D_lm]

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids)

    def _language_model(self) -> nn.Module:
        return self.language_model
