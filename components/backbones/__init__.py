"""System 2 backbones: camera views + instruction -> vision-language tokens ``[B, S, out_dim]`` and their mask."""

from .composed import ComposedBackbone
from .smolvlm import SmolVLMBackbone

__all__ = ["ComposedBackbone", "SmolVLMBackbone"]
