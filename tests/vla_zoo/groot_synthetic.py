"""Test support: tiny Isaac-GR00T checkpoint folders under the reference's key names.

The backbone's modules are transformers' own (``SiglipVisionModel``, ``LlamaForCausalLM`` for N1,
``Qwen3ForCausalLM`` for N1.5, truncated at ``select_layer`` as the reference truncates them) plus the Eagle
connector ``mlp1`` and projection as ``torch.nn`` layers in the reference's layout; the action head is a random one
written in the reference layout. ``experiment_cfg/metadata.json`` holds two embodiments in GR00T's format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from components.action_head import FlowMatchingActionHead
from components.backbones.tokenizer import offline_tokenizer
from vla_zoo.groot.backbone import EAGLE_PREFIX
from vla_zoo.groot.head import head_kwargs, head_state_to_reference

SELECT_LAYER = 2
WIDTH = {"gr00t_n1": 16, "gr00t_n1_5": 12}  # the DiT's width; N1.5's VL tokens are the LM's width, 16
STATE = {"single_arm": 3, "gripper": 1}
ACTION = {"single_arm": 3, "gripper": 1}


def eagle_config(model_type: str) -> dict:
    """An Eagle ``config.json`` at tiny sizes: N1's Eagle-2 (pixel shuffle, 2-layer mlp1, Llama) or N1.5's Eagle
    2.5 (no shuffle, one Linear, Qwen3)."""
    vision = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
              "num_attention_heads": 2, "patch_size": 4, "image_size": 16, "layer_norm_eps": 1e-6,
              "hidden_act": "gelu_pytorch_tanh", "num_channels": 3}
    vocab = len(offline_tokenizer())
    if model_type == "gr00t_n1":
        return {"model_type": "eagle_chat", "select_layer": -1, "force_image_size": 16, "downsample_ratio": 0.5,
                "vision_config": vision,
                "llm_config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 24,
                               "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 2,
                               "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 130000,
                               "vocab_size": vocab, "max_position_embeddings": 512, "tie_word_embeddings": True,
                               "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}}
    return {"model_type": "eagle_2_5_vl", "select_layer": -1, "force_image_size": 16, "downsample_ratio": 0.5,
            "use_pixel_shuffle": False, "mlp_connector_layers": 1, "vision_config": vision,
            "text_config": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 16,
                            "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                            "num_key_value_heads": 1, "head_dim": 8, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
                            "vocab_size": vocab, "max_position_embeddings": 512, "tie_word_embeddings": True,
                            "hidden_act": "silu", "attention_bias": False}}


def config(model_type: str) -> dict:
    """The checkpoint's ``config.json``: a tiny head with 32 embodiment slots (the released tags' slots exist)."""
    width = WIDTH[model_type]
    dit = {"num_attention_heads": 2, "attention_head_dim": width // 2, "output_dim": 12, "num_layers": 2,
           "dropout": 0.2, "final_dropout": True, "interleave_self_attention": True, "norm_type": "ada_norm",
           "positional_embeddings": None}
    head_cfg = {"diffusion_model_cfg": dit, "input_embedding_dim": width, "hidden_size": 12, "max_seq_len": 8,
                "action_dim": 6, "action_horizon": 4, "num_inference_timesteps": 4, "max_num_embodiments": 32,
                "max_state_dim": 6}
    if model_type == "gr00t_n1":
        backbone_cfg = {"select_layer": SELECT_LAYER, "tune_llm": False, "tune_visual": False, "projector_dim": 24,
                        "reproject_vision": False, "scale_image_resolution": 1}
    else:
        dit["cross_attention_dim"] = 16
        head_cfg.update(backbone_embedding_dim=16, use_vlln=True, num_target_vision_tokens=2, vl_self_attention_cfg={
            "num_attention_heads": 2, "attention_head_dim": 8, "output_dim": 16, "num_layers": 1, "dropout": 0.2,
            "final_dropout": True, "positional_embeddings": None})
        backbone_cfg = {"eagle_path": "NVEagle/tiny", "load_bf16": False, "project_to_dim": None,
                        "reproject_vision": False, "select_layer": SELECT_LAYER, "tune_llm": False, "tune_visual": True,
                        "use_flash_attention": False}
    return {"architectures": ["GR00T_N1_5" if model_type == "gr00t_n1_5" else "GR00T_N1"], "model_type": model_type,
            "action_head_cfg": head_cfg, "backbone_cfg": backbone_cfg, "action_horizon": 4, "action_dim": 6,
            "hidden_size": 16, "torch_dtype": "bfloat16"}


def _stats(dim: int, lo: float) -> dict:
    return {"max": [lo + 2.0 + i for i in range(dim)], "min": [lo - i * 0.5 for i in range(dim)],
            "mean": [lo + 0.75] * dim, "std": [0.5 + 0.1 * i for i in range(dim)],
            "q01": [lo - i * 0.25 for i in range(dim)], "q99": [lo + 1.5 + i for i in range(dim)]}


def metadata() -> dict:
    """Two embodiments in GR00T's format, with the same two cameras."""
    video = {"front": {"resolution": [20, 16], "channels": 3, "fps": 30.0},
             "wrist": {"resolution": [20, 16], "channels": 3, "fps": 30.0}}

    def layout(keys: dict, absolute: bool) -> dict:
        return {k: {"absolute": absolute, "rotation_type": None, "shape": [d], "continuous": k != "gripper"}
                for k, d in keys.items()}

    out = {}
    for tag, lo in (("new_embodiment", -1.0), ("gr1", 3.0)):
        out[tag] = {"statistics": {"state": {k: _stats(d, lo) for k, d in STATE.items()},
                                   "action": {k: _stats(d, lo + 1) for k, d in ACTION.items()}},
                    "modalities": {"video": video, "state": layout(STATE, True), "action": layout(ACTION, False)},
                    "embodiment_tag": tag}
    return out


@dataclass
class Reference:
    """The reference's modules whose tensors the folder holds (for module-level parity)."""

    vision: SiglipVisionModel
    mlp1: nn.Sequential
    lm: nn.Module  # the *ForCausalLM, layers above SELECT_LAYER removed
    linear: nn.Module
    head: FlowMatchingActionHead


def write(folder: Path, model_type: str = "gr00t_n1_5", shards: int = 2, dtype: torch.dtype = torch.bfloat16,
          tied_under_lm_head: bool = False) -> Reference:
    """A whole reference checkpoint folder (``shards`` safetensors files and their index), tensors in ``dtype``."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    eagle, cfg = eagle_config(model_type), config(model_type)
    vision = SiglipVisionModel(SiglipVisionConfig(**eagle["vision_config"])).eval()  # with its pooling head
    text = dict(eagle.get("text_config", eagle.get("llm_config")))
    text.pop("architectures")
    text.pop("model_type")
    lm = (LlamaForCausalLM(LlamaConfig(**text)) if model_type == "gr00t_n1" else Qwen3ForCausalLM(Qwen3Config(**text)))
    del lm.model.layers[SELECT_LAYER:]  # the reference pops the layers above select_layer before it saves
    lm.eval()
    vision_dim, lm_dim = eagle["vision_config"]["hidden_size"], text["hidden_size"]
    if model_type == "gr00t_n1":
        mlp1 = nn.Sequential(nn.LayerNorm(4 * vision_dim), nn.Linear(4 * vision_dim, lm_dim), nn.GELU(),
                             nn.Linear(lm_dim, lm_dim))
        linear = nn.Linear(lm_dim, WIDTH[model_type])
    else:
        mlp1, linear = nn.Sequential(nn.Linear(vision_dim, lm_dim)), nn.Identity()
    head = FlowMatchingActionHead(**head_kwargs(cfg)).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): make them matter
        for module in (*vision.modules(), *mlp1.modules()):
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)

    eagle_prefix = "backbone." + EAGLE_PREFIX[model_type]
    tensors = {"action_head." + k: v for k, v in head_state_to_reference(head).items()}
    # the reference's transformers (4.51) nests SigLIP's weights under `vision_model.`
    tensors.update({eagle_prefix + "vision_model.vision_model." + k.removeprefix("vision_model."): v
                    for k, v in vision.state_dict().items()})
    tensors.update({eagle_prefix + "mlp1." + k: v for k, v in mlp1.state_dict().items()})
    lm_state = lm.state_dict()
    if tied_under_lm_head:  # tied embeddings saved once, under the LM head's name
        lm_state.pop("model.embed_tokens.weight")
    tensors.update({eagle_prefix + "language_model." + k: v for k, v in lm_state.items()})
    projection = "backbone.linear." if model_type == "gr00t_n1" else "backbone.eagle_linear."
    tensors.update({projection + k: v for k, v in linear.state_dict().items()})
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in tensors.items()}

    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "experiment_cfg").mkdir()
    (folder / "experiment_cfg" / "metadata.json").write_text(json.dumps(metadata(), indent=2))
    (folder / "eagle_config.json").write_text(json.dumps(eagle))  # for --eagle-config (not part of the reference)
    # the modules' weights rounded to the checkpoint's dtype, as the importer reads them (buffers such as the
    # rotary frequencies stay as computed)
    with torch.no_grad():
        for module in (vision, mlp1, lm, linear, head):
            for p in module.parameters():
                p.copy_(p.to(dtype))
    return Reference(vision, mlp1, lm, linear, head)
