"""A System 2 backbone composed from any ``transformers`` vision encoder and any Llama-style causal LM.

Eagle-2 in GR00T N1 is exactly such a composition (SigLIP + pixel shuffle + MLP + SmolLM2); this adapter builds one
from separate checkpoints, e.g. SigLIP2 + Qwen3 or SigLIP + SmolLM2, or from small random configs. The prompt is the
LM's own chat format (when its tokenizer has one) with one block of image slots per view before the instruction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

from ..keypoints import SpatialSoftmaxKeypoints
from ..lora import LoRA
from ..mlp import MLP
from .common import (
    OutputProjector,
    VisionLanguageBackbone,
    load_pretrained,
    pixel_shuffle,
    strip_final_norm,
    truncated_text_config,
)
from .tokenizer import IMAGE_TOKEN, offline_tokenizer

# SigLIP's normalisation, used by the random-weight default.
_SIGLIP_MEAN = _SIGLIP_STD = (0.5, 0.5, 0.5)


class PixelShuffleConnector(nn.Module):
    """Patch features ``[N, g*g, D_v]`` -> ``[N, (g/s)^2, D_lm]``: pixel shuffle, then LayerNorm + 2-layer MLP
    (Eagle-2's ``mlp1``)."""

    def __init__(self, vision_dim: int, lm_dim: int, scale_factor: int) -> None:
        super().__init__()
        self.scale_factor = scale_factor
        in_dim = vision_dim * scale_factor**2
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), MLP(in_dim, [lm_dim], lm_dim))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(patches, self.scale_factor))


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
    ) -> None:
        super().__init__(project_to, max_text_tokens)
        self.tokenizer = (
            offline_tokenizer()
            if lm_pretrained_path is None
            else AutoTokenizer.from_pretrained(lm_pretrained_path, local_files_only=True)
        )

        # NaFlex encoders (SigLIP2) take patch sequences and resize their position grid to any image size.
        naflex = "siglip2_vision_model"
        if coord_channels and (vision_pretrained_path is not None or vision_model_type != "resnet"):
            raise ValueError("coord_channels=True needs the random conv tower (vision_model_type: resnet, no "
                             "vision_pretrained_path): a pretrained or ViT encoder takes 3-channel images")
        self.coord_channels = coord_channels
        conv_tower = vision_pretrained_path is None and vision_model_type == "resnet"
        per_stage = isinstance(vision_hidden_size, (list, tuple))
        if per_stage and (not conv_tower or len(vision_hidden_size) != vision_layers):
            raise ValueError(
                f"vision_hidden_size={list(vision_hidden_size)}: a list of channels per stage needs the random "
                f"conv tower (vision_model_type: resnet, no vision_pretrained_path) and one entry per stage "
                f"(vision_layers={vision_layers}); give one int otherwise")
        if conv_tower:
            stage_widths = list(vision_hidden_size) if per_stage else [vision_hidden_size] * vision_layers
            # A conv tower: stem (stride 4) + `vision_layers` basic-block stages of `stage_widths` channels,
            # every stage after the first halving the grid; its feature map becomes the patch tokens.
            vision_config = AutoConfig.for_model(
                "resnet",
                embedding_size=stage_widths[0] // 2,
                hidden_sizes=stage_widths,
                depths=[1] * vision_layers,
                layer_type="basic",
                num_channels=5 if coord_channels else 3,
            )
            image_mean, image_std, rescale_factor = _SIGLIP_MEAN, _SIGLIP_STD, 1 / 255
        elif vision_pretrained_path is None:
            grid_size = (
                {"num_patches": (image_size // patch_size) ** 2}
                if vision_model_type == naflex
                else {"image_size": image_size}
            )
            vision_config = AutoConfig.for_model(vision_model_type, **{
                "hidden_size": vision_hidden_size,
                "intermediate_size": 4 * vision_hidden_size,
                "num_hidden_layers": vision_layers,
                "num_attention_heads": vision_heads,
                "patch_size": patch_size,
                **grid_size,
                **(vision_config_overrides or {}),
            })
            image_mean, image_std, rescale_factor = _SIGLIP_MEAN, _SIGLIP_STD, 1 / 255
        else:
            vision_config = AutoConfig.from_pretrained(vision_pretrained_path, local_files_only=True)
            vision_config = getattr(vision_config, "vision_config", vision_config)
            try:
                image_processor = AutoImageProcessor.from_pretrained(vision_pretrained_path, local_files_only=True)
            except OSError as err:
                raise FileNotFoundError(
                    f"{vision_pretrained_path}: no preprocessor_config.json (needed for the image mean/std); save the "
                    "checkpoint's image processor there with save_pretrained"
                ) from err
            image_mean, image_std = image_processor.image_mean, image_processor.image_std
            rescale_factor = image_processor.rescale_factor
        self._naflex = vision_config.model_type == naflex
        # Conv encoders (ResNet, ConvNeXt, ...) have no patch size or fixed resolution: they return a feature map
        # [N, C, g, g] whose cells are the patch tokens.
        self._feature_map = hasattr(vision_config, "hidden_sizes")
        if not (self._naflex or self._feature_map):
            image_size = vision_config.image_size
        # The attention-pooling head makes a single image embedding for contrastive training; we use patch tokens.
        if hasattr(vision_config, "vision_use_head"):
            vision_config.vision_use_head = False
        self.vision_model = (
            AutoModel.from_config(vision_config)
            if vision_pretrained_path is None
            else load_pretrained(vision_pretrained_path, vision_config)
        )
        if self._feature_map:
            # oneDNN's convolutions run ~1.5x faster forward + backward in channels-last (NHWC) layout on this
            # CPU (benchmarks/train_step_speed.py), as cuDNN's do on tensor cores; parameters keep their layout
            # through .to(device), load_state_dict and EMA copies, and _embed_images feeds NHWC pixels.
            self.vision_model.to(memory_format=torch.channels_last)
            vision_dim = vision_config.hidden_sizes[-1]
            with torch.no_grad():  # the grid follows from the strides; one probe is simpler than summing them
                probe = self.vision_model(pixel_values=self._with_coords(torch.zeros(1, 3, image_size, image_size)))
            self.grid = probe.last_hidden_state.shape[-1]
            self.patch_size = image_size // self.grid
            if self.grid % scale_factor:
                raise ValueError(f"the vision encoder's {self.grid}x{self.grid} feature map at image_size={image_size} "
                                 f"is not a multiple of scale_factor={scale_factor}; change one of them")
        else:
            vision_dim = vision_config.hidden_size
            self.patch_size = vision_config.patch_size
            self.grid = image_size // self.patch_size
            if image_size % self.patch_size or self.grid % scale_factor:
                raise ValueError(
                    f"image_size={image_size} must be a multiple of the patch size ({self.patch_size}) and the patch "
                    f"grid ({self.grid}) a multiple of scale_factor={scale_factor}"
                )

        if lm_pretrained_path is None:
            tok = self.tokenizer
            lm_config = AutoConfig.for_model(lm_model_type, **{
                "vocab_size": len(tok),
                "hidden_size": lm_hidden_size,
                "intermediate_size": 3 * lm_hidden_size,  # SmolLM2: 2.7x
                "num_hidden_layers": lm_layers,
                "num_attention_heads": lm_heads,
                "num_key_value_heads": lm_heads,
                "pad_token_id": tok.pad_token_id,
                "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
                **(lm_config_overrides or {}),
            })
            lm_config = truncated_text_config(lm_config, select_layer)
            self.language_model = strip_final_norm(AutoModel.from_config(lm_config))
        else:
            lm_config = AutoConfig.from_pretrained(lm_pretrained_path, local_files_only=True)
            self.language_model = load_pretrained(
                lm_pretrained_path, truncated_text_config(lm_config, select_layer), decoder_of=lambda model: model
            )
        lm_dim = self.language_model.config.hidden_size

        self.connector = PixelShuffleConnector(vision_dim, lm_dim, scale_factor)
        if keypoints < 0 or (keypoints and not self._feature_map):
            raise ValueError(f"keypoints={keypoints}: spatial-softmax keypoints need a conv vision encoder (a feature "
                             "map, e.g. vision_model_type: resnet) and a count >= 0; set keypoints: 0 for this encoder")
        self.keypoint_reader = SpatialSoftmaxKeypoints(vision_dim, keypoints, lm_dim) if keypoints else None
        self.projector = OutputProjector(lm_dim, project_to)
        self._finish_init(
            tokenizer=self.tokenizer,
            image_size=image_size,
            image_mean=image_mean,
            image_std=image_std,
            rescale_factor=rescale_factor,
            tokens_per_image=(self.grid // scale_factor) ** 2 + (1 if keypoints else 0),
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
        n, g, p = pixels.shape[0], self.grid, self.patch_size
        if self._naflex:
            patches = pixels.view(n, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, p * p * 3)
            out = self.vision_model(
                pixel_values=patches,
                pixel_attention_mask=torch.ones(n, g * g, dtype=torch.long, device=pixels.device),
                spatial_shapes=torch.tensor([[g, g]] * n, device=pixels.device),
            )
        elif self._feature_map:
            nhwc = self._with_coords(pixels).contiguous(memory_format=torch.channels_last)
            out = self.vision_model(pixel_values=nhwc)
        else:
            out = self.vision_model(pixel_values=self._with_coords(pixels))
        if self._feature_map:
            feature_map = out.last_hidden_state  # [N, C, g, g]
            tokens = self.connector(feature_map.flatten(2).transpose(1, 2))  # [N, (g/s)^2, D_lm]
            if self.keypoint_reader is None:
                return tokens
            return torch.cat([tokens, self.keypoint_reader(feature_map)], dim=1)  # [N, (g/s)^2 + 1, D_lm]
        # Encoders with a CLS token (CLIP) or registers put them first; the patch grid is the last g*g tokens.
        return self.connector(out.last_hidden_state[:, -g * g :])  # [N, T, D_lm]

    def _with_coords(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, 3, h, w]`` -> ``[N, 5, h, w]`` with x and y in [-1, 1] when ``coord_channels``, else unchanged."""
        if not self.coord_channels:
            return pixels
        n, _, h, w = pixels.shape
        ys = torch.linspace(-1.0, 1.0, h, device=pixels.device, dtype=pixels.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=pixels.device, dtype=pixels.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # [2, h, w]: channel 0 is x, channel 1 is y
        return torch.cat([pixels, grid.expand(n, 2, h, w)], dim=1)

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids)

    def _language_model(self) -> nn.Module:
        return self.language_model
