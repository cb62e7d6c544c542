"""The vision tower of a composed backbone: a ``transformers`` vision encoder built from a checkpoint or from size
arguments, how to feed it pixels and read its patch tokens, and the spatial-softmax keypoint readout of a conv
tower's feature map.

Three kinds of encoder: a ViT (SigLIP, CLIP: patch tokens after an optional CLS token), a NaFlex ViT (SigLIP2: takes
patch sequences, so any image size that is a multiple of the patch size), and a conv tower (ResNet, ConvNeXt: a
feature map ``[N, C, g, g]`` whose cells are the patch tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from ..mlp import MLP
from .common import hub_kwargs, load_config, load_pretrained

# SigLIP's normalisation, used by the random-weight encoders.
_SIGLIP_MEAN = _SIGLIP_STD = (0.5, 0.5, 0.5)
_NAFLEX = "siglip2_vision_model"


@dataclass(frozen=True)
class VisionLayout:
    """What a backbone needs to know to feed a vision encoder and read it: its pixels' size and normalisation, and a
    ``grid x grid`` map of ``dim``-wide features (``patch_size`` pixels per cell)."""

    dim: int
    grid: int
    patch_size: int
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float
    naflex: bool = False  # the encoder takes patch sequences (SigLIP2)
    feature_map: bool = False  # a conv encoder: its output is a feature map, not tokens
    coord_channels: bool = False  # two (x, y) channels appended to the pixels (CoordConv)

    def with_coords(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, 3, h, w]`` -> ``[N, 5, h, w]`` with x and y in [-1, 1] when ``coord_channels``, else unchanged."""
        if not self.coord_channels:
            return pixels
        n, _, h, w = pixels.shape
        ys = torch.linspace(-1.0, 1.0, h, device=pixels.device, dtype=pixels.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=pixels.device, dtype=pixels.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # [2, h, w]: channel 0 is x, channel 1 is y
        return torch.cat([pixels, grid.expand(n, 2, h, w)], dim=1)

    def features(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised pixels ``[N, 3, s, s]`` -> patch tokens ``[N, g*g, dim]`` and, for a conv encoder, its feature
        map ``[N, dim, g, g]`` (else None)."""
        n, g, p = pixels.shape[0], self.grid, self.patch_size
        if self.naflex:
            patches = pixels.view(n, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, p * p * 3)
            out = model(
                pixel_values=patches,
                pixel_attention_mask=torch.ones(n, g * g, dtype=torch.long, device=pixels.device),
                spatial_shapes=torch.tensor([[g, g]] * n, device=pixels.device),
            )
        elif self.feature_map:
            out = model(pixel_values=self.with_coords(pixels).contiguous(memory_format=torch.channels_last))
            feature_map = out.last_hidden_state  # [N, C, g, g]
            return feature_map.flatten(2).transpose(1, 2), feature_map
        else:
            out = model(pixel_values=self.with_coords(pixels))
        # Encoders with a CLS token (CLIP) or registers put them first; the patch grid is the last g*g tokens.
        return out.last_hidden_state[:, -g * g:], None


def _random_config(image_size: int, model_type: str, patch_size: int, hidden_size: int | list[int], layers: int,
                   heads: int, coord_channels: bool, overrides: dict[str, Any] | None):
    """The config of a random encoder: a ViT of ``model_type`` (with any further config fields in ``overrides``),
    or (``"resnet"``) a conv tower: a stride-4 stem and ``layers`` basic-block stages of ``hidden_size`` channels
    (one int, or one per stage), every stage after the first halving the grid."""
    if model_type == "resnet":
        widths = list(hidden_size) if isinstance(hidden_size, (list, tuple)) else [hidden_size] * layers
        return AutoConfig.for_model("resnet", embedding_size=widths[0] // 2, hidden_sizes=widths, depths=[1] * layers,
                                    layer_type="basic", num_channels=5 if coord_channels else 3)
    grid_size = {"num_patches": (image_size // patch_size) ** 2} if model_type == _NAFLEX else {"image_size": image_size}
    return AutoConfig.for_model(model_type, **{
        "hidden_size": hidden_size, "intermediate_size": 4 * hidden_size, "num_hidden_layers": layers,
        "num_attention_heads": heads, "patch_size": patch_size, **grid_size, **(overrides or {}),
    })


def build_vision_encoder(
    pretrained_path: str | None,
    *,
    image_size: int,
    model_type: str,
    patch_size: int,
    hidden_size: int | list[int],
    layers: int,
    heads: int,
    coord_channels: bool = False,
    config_overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, VisionLayout]:
    """The encoder of a local checkpoint (with its ``preprocessor_config.json``; a dual-encoder checkpoint gives
    its vision half) or, with ``pretrained_path`` None, a random one from the size arguments (see
    ``ComposedBackbone``; ``config_overrides``: further fields of a random ViT's config), and its ``VisionLayout``. A fixed-resolution ViT's own image size overrides
    ``image_size``."""
    conv_tower = pretrained_path is None and model_type == "resnet"
    if coord_channels and not conv_tower:
        raise ValueError("coord_channels=True needs the random conv tower (vision_model_type: resnet, no "
                         "vision_pretrained_path): a pretrained or ViT encoder takes 3-channel images")
    if isinstance(hidden_size, (list, tuple)) and (not conv_tower or len(hidden_size) != layers):
        raise ValueError(
            f"vision_hidden_size={list(hidden_size)}: a list of channels per stage needs the random conv tower "
            f"(vision_model_type: resnet, no vision_pretrained_path) and one entry per stage "
            f"(vision_layers={layers}); give one int otherwise")
    if pretrained_path is None:
        config = _random_config(image_size, model_type, patch_size, hidden_size, layers, heads, coord_channels,
                                config_overrides)
        image_mean, image_std, rescale_factor = _SIGLIP_MEAN, _SIGLIP_STD, 1 / 255
    else:
        config = load_config(pretrained_path, "vision_pretrained_path")
        config = getattr(config, "vision_config", config)
        try:
            processor = AutoImageProcessor.from_pretrained(
                pretrained_path, **hub_kwargs(pretrained_path, "vision_pretrained_path"))
        except OSError as err:
            raise FileNotFoundError(
                f"{pretrained_path}: no preprocessor_config.json (needed for the image mean/std); save the "
                "checkpoint's image processor there with save_pretrained"
            ) from err
        image_mean, image_std = tuple(processor.image_mean), tuple(processor.image_std)
        rescale_factor = processor.rescale_factor
    naflex = config.model_type == _NAFLEX
    # Conv encoders have no patch size or fixed resolution: they return a feature map whose cells are the tokens.
    feature_map = hasattr(config, "hidden_sizes")
    if not (naflex or feature_map):
        image_size = config.image_size
    # The attention-pooling head makes a single image embedding for contrastive training; we use patch tokens.
    if hasattr(config, "vision_use_head"):
        config.vision_use_head = False
    model = AutoModel.from_config(config) if pretrained_path is None else load_pretrained(pretrained_path, config)
    common = dict(image_size=image_size, image_mean=image_mean, image_std=image_std, rescale_factor=rescale_factor,
                  naflex=naflex, feature_map=feature_map, coord_channels=coord_channels)
    if feature_map:
        # oneDNN's convolutions run ~1.5x faster forward + backward in channels-last (NHWC) layout on CPU, as cuDNN's
        # do on tensor cores; parameters keep their layout through .to(device), load_state_dict and EMA copies, and
        # VisionLayout.features feeds NHWC pixels.
        model.to(memory_format=torch.channels_last)
        probe_layout = VisionLayout(dim=config.hidden_sizes[-1], grid=1, patch_size=image_size, **common)
        with torch.no_grad():  # the grid follows from the strides; one probe is simpler than summing them
            grid = probe_layout.features(model, torch.zeros(1, 3, image_size, image_size))[1].shape[-1]
        return model, VisionLayout(dim=config.hidden_sizes[-1], grid=grid, patch_size=image_size // grid, **common)
    if image_size % config.patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of the patch size ({config.patch_size})")
    return model, VisionLayout(dim=config.hidden_size, grid=image_size // config.patch_size,
                               patch_size=config.patch_size, **common)


class SpatialSoftmaxKeypoints(nn.Module):
    """Feature map ``[N, C, g, g]`` -> one token ``[N, 1, D]`` holding K learned keypoints (Levine et al., 2016).

    Each keypoint is the expected cell centre under a softmax over the map's cells (a 1x1 conv gives its logits, a
    learned temperature their sharpness): an (x, y) in [-1, 1] with sub-cell precision, which patch tokens of a 16 px
    cell only carry implicitly. Robomimic and Diffusion Policy use the same readout for behaviour cloning from pixels.
    """

    def __init__(self, channels: int, num_keypoints: int, out_dim: int) -> None:
        super().__init__()
        self.to_logits = nn.Conv2d(channels, num_keypoints, kernel_size=1)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.mlp = MLP(2 * num_keypoints, [out_dim], out_dim)

    def keypoints(self, feature_map: torch.Tensor) -> torch.Tensor:  # [N, C, g, g] -> [N, K, 2] as (x, y)
        g = feature_map.shape[-1]
        attention = (self.to_logits(feature_map).flatten(2) / self.log_temperature.exp()).softmax(-1)  # [N, K, g*g]
        axis = torch.linspace(-1, 1, g, device=feature_map.device, dtype=feature_map.dtype)
        cells = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(g * g, 2)  # row-major (x, y)
        return attention @ cells

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:  # [N, C, g, g] -> [N, 1, D]
        return self.mlp(self.keypoints(feature_map).flatten(1))[:, None]
