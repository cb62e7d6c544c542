"""Isaac-GR00T's Eagle VLM backbone <-> ``components.backbones.ComposedBackbone``.

The reference backbone (``gr00t/model/backbone/eagle_backbone.py`` and the Eagle model code under
``eagle2_hg_model/``) is a SigLIP vision tower, a connector ``mlp1`` (N1: pixel shuffle, LayerNorm, Linear, GELU,
Linear; N1.5: one Linear per patch, no shuffle), a causal LM whose layers above ``select_layer`` are removed and
whose last (normed) hidden state is read, and a final projection (N1: ``linear``; N1.5: ``eagle_linear``, an
Identity without weights when ``project_to_dim`` is null). ``ComposedBackbone`` computes the same with
``keep_final_norm``, ``connector`` and ``projector`` set (``backbone_kwargs``); the weights map one to one:

| reference (``backbone.`` removed; N1 ``model.``, N1.5 ``eagle_model.`` = P) | ours |
|---|---|
| ``P vision_model.vision_model.*`` | ``vision_model.*`` (SigLIP's own nesting, if any, kept) |
| ``P mlp1.{0, 1, 3}`` (N1) / ``P mlp1.0`` (N1.5) | ``connector.mlp.{0, 1.0, 1.2}`` / ``connector.mlp.0`` |
| ``P language_model.model.*`` | ``language_model.*`` |
| ``linear`` (N1) / ``eagle_linear`` (N1.5, when set) | ``projector`` |

Reference tensors the computation does not use (SigLIP's attention-pooling ``head``, the LM's ``lm_head``, layers
above ``select_layer``) are kept aside so that an export writes them back. The prompt differs: the reference wraps
each image's tokens in its chat template with ``<img>`` markers, ours puts them in its own LM's format, so the two
agree module by module, not on a whole prompt.

The Eagle architecture is not in the checkpoint folder (the reference builds it from its own code's
``eagle2_hg_model/config.json``): ``RELEASED_EAGLE`` holds the released N1 / N1.5 ones; another is passed as that
``config.json`` (``--eagle-config``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vla_zoo.groot.checkpoint import CONFIG, GrootCheckpointError, _read_json

PREFIX = "backbone."
#: What the Eagle model is called inside the reference backbone, by model type.
EAGLE_PREFIX = {"gr00t_n1": "model.", "gr00t_n1_5": "eagle_model."}
#: The reference's final projection, by model type.
PROJECTION = {"gr00t_n1": "linear.", "gr00t_n1_5": "eagle_linear."}

_SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
           "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14, "image_size": 224,
           "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "num_channels": 3}
#: The Eagle VLMs of the released checkpoints (``eagle2_hg_model/config.json`` at the N1 and N1.5 releases), the
#: fields this mapping reads: N1 is Eagle-2 (SigLIP + SmolLM2-1.7B), N1.5 Eagle 2.5 (SigLIP + Qwen3-1.7B).
RELEASED_EAGLE: dict[str, dict[str, Any]] = {
    "gr00t_n1": {
        "model_type": "eagle_chat", "select_layer": -1, "force_image_size": 224, "downsample_ratio": 0.5,
        "vision_config": _SIGLIP,
        "llm_config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                       "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
                       "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 130000, "vocab_size": 49164,
                       "max_position_embeddings": 8192, "tie_word_embeddings": True, "hidden_act": "silu",
                       "attention_bias": False, "mlp_bias": False},
    },
    "gr00t_n1_5": {
        "model_type": "eagle_2_5_vl", "select_layer": -1, "force_image_size": 224, "downsample_ratio": 0.5,
        "use_pixel_shuffle": False, "mlp_connector_layers": 1,
        "vision_config": _SIGLIP,
        "text_config": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
                        "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
                        "vocab_size": 151680, "max_position_embeddings": 40960, "tie_word_embeddings": True,
                        "hidden_act": "silu", "attention_bias": False},
    },
}
#: Config fields of the vision tower / LM that change what it computes (the others name files, dtypes, tokens).
_VISION_FIELDS = ("intermediate_size", "layer_norm_eps", "hidden_act", "num_channels")
_LM_FIELDS = ("intermediate_size", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
              "vocab_size", "max_position_embeddings", "tie_word_embeddings", "hidden_act", "attention_bias",
              "mlp_bias", "use_sliding_window", "sliding_window", "max_window_layers")
_LM_TYPES = ("llama", "qwen2", "qwen3")


# ----------------------------------------------------------------------------------------------- configuration
def eagle_config(model_type: str, path: str | Path | None = None) -> tuple[dict[str, Any], str]:
    """The Eagle config (a ``config.json`` of the reference's ``eagle2_hg_model``) and where it came from."""
    if path is None:
        return RELEASED_EAGLE[model_type], f"the released {model_type} Eagle config"
    config = _read_json(Path(path))
    if not isinstance(config, dict) or not isinstance(config.get("vision_config"), dict) or not isinstance(
            config.get("text_config", config.get("llm_config")), dict):
        raise GrootCheckpointError(f"{path}: not an Eagle config.json (needs the objects 'vision_config' and "
                                   "'text_config' or 'llm_config', as in Isaac-GR00T's eagle2_hg_model/config.json)")
    return config, str(path)


def _check(value: Any, supported: Any, where: str, key: str) -> None:
    if value != supported:
        raise GrootCheckpointError(f"{where}: key {key!r} is {value!r}; only {supported!r} (as in the released "
                                   "N1 / N1.5 checkpoints) is supported")


def backbone_kwargs(config: dict[str, Any], eagle: dict[str, Any], head: dict[str, Any], source: str | Path = CONFIG,
                    eagle_source: str = "the Eagle config", tokenizer_path: str | None = None) -> dict[str, Any]:
    """``ComposedBackbone`` arguments that compute what the reference backbone computes: ``config`` is the
    checkpoint's ``config.json``, ``eagle`` the Eagle config, ``head`` the action head's arguments (its
    ``cross_attention_dim`` is the width the backbone must deliver)."""
    model_type = config["model_type"]
    cfg = config.get("backbone_cfg") or {}
    where = f"{source}: backbone_cfg"
    vision, text = eagle["vision_config"], eagle.get("text_config", eagle.get("llm_config"))
    _check(vision.get("model_type"), "siglip_vision_model", f"{eagle_source}: vision_config", "model_type")
    _check(eagle.get("select_layer", -1), -1, eagle_source, "select_layer")  # the tower's last, post-normed output
    if text.get("model_type") not in _LM_TYPES:
        raise GrootCheckpointError(f"{eagle_source}: text_config: key 'model_type' is {text.get('model_type')!r}; "
                                   f"this importer maps {list(_LM_TYPES)} language models")
    for key, supported in (("reproject_vision", False), ("scale_image_resolution", 1), ("remove_llm", False)):
        _check(cfg.get(key, supported), supported, where, key)
    image_size = eagle.get("force_image_size") or vision["image_size"]
    _check(image_size, vision["image_size"], eagle_source, "force_image_size")  # no resized position grid
    # Eagle-2 (N1) always shuffles and uses the 2-layer connector; Eagle 2.5 has switches for both.
    shuffle = eagle.get("use_pixel_shuffle", True)
    scale = round(1 / eagle.get("downsample_ratio", 0.5)) if shuffle else 1
    layers = eagle.get("mlp_connector_layers", 2)
    if layers not in (1, 2):
        raise GrootCheckpointError(f"{eagle_source}: key 'mlp_connector_layers' is {layers!r}; only 1 or 2 exist")
    lm_width, out_width = text["hidden_size"], head["cross_attention_dim"]
    # N1: `linear` when projector_dim != -1; N1.5: `eagle_linear` when project_to_dim is set (its class default is
    # 1536), otherwise an Identity that hands the LM's width to the head.
    projected = cfg.get("projector_dim", -1) != -1 if model_type == "gr00t_n1" else \
        cfg.get("project_to_dim", 1536) is not None
    if not projected and out_width != lm_width:
        raise GrootCheckpointError(f"{where}: no projection, so the LM's width ({lm_width}, {eagle_source}) reaches "
                                   f"the action head, whose cross-attention reads {out_width}; they must be equal (another Eagle "
                                   "architecture than the released one: --eagle-config)")
    select_layer = cfg.get("select_layer", 12)
    if not 1 <= select_layer <= text["num_hidden_layers"]:
        raise GrootCheckpointError(f"{where}: key 'select_layer' is {select_layer!r}; the LM ({eagle_source}) has "
                                   f"{text['num_hidden_layers']} layers")
    tune_visual = bool(cfg.get("tune_visual", model_type == "gr00t_n1_5"))
    return dict(
        select_layer=select_layer,
        project_to=out_width,
        tune_llm=bool(cfg.get("tune_llm", False)),
        tune_visual=tune_visual,
        # the reference trains `mlp1` with the vision tower and a projection always
        tune_projector=True if projected else tune_visual,
        image_size=image_size,
        scale_factor=scale,
        vision_model_type="siglip_vision_model",
        patch_size=vision["patch_size"],
        vision_hidden_size=vision["hidden_size"],
        vision_layers=vision["num_hidden_layers"],
        vision_heads=vision["num_attention_heads"],
        vision_config_overrides={k: vision[k] for k in _VISION_FIELDS if vision.get(k) is not None},
        lm_model_type=text["model_type"],
        lm_hidden_size=lm_width,
        lm_layers=text["num_hidden_layers"],
        lm_heads=text["num_attention_heads"],
        lm_config_overrides={k: text[k] for k in _LM_FIELDS if text.get(k) is not None},
        keep_final_norm=True,
        connector="mlp" if layers == 2 else "linear",
        projector="linear" if projected else "identity",
        tokenizer_path=tokenizer_path,
    )


def backbone_cfg(model_type: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The reference's ``backbone_cfg`` for a backbone built from ``kwargs`` (the inverse of ``backbone_kwargs``
    for the fields the reference reads)."""
    cfg: dict[str, Any] = {"select_layer": kwargs["select_layer"], "tune_llm": kwargs.get("tune_llm", False),
                           "tune_visual": kwargs.get("tune_visual", True), "reproject_vision": False}
    projected = kwargs.get("projector") == "linear"
    if model_type == "gr00t_n1":
        cfg["projector_dim"] = kwargs["lm_hidden_size"] if projected else -1
    else:
        cfg["project_to_dim"] = kwargs["project_to"] if projected else None
    return cfg


# ----------------------------------------------------------------------------------------------- weight layout
def _connector_key(rest: str, layers: int) -> str:
    """``connector.mlp.`` key rest -> the ``mlp1.`` one: ours nests the 2-layer MLP as ``1.{0,2}``."""
    if layers == 1:
        return rest
    index, _, param = rest.partition(".")
    if index == "0":
        return rest
    sub, _, param = param.partition(".")
    return {"0": "1", "2": "3"}[sub] + "." + param


def reference_key(ours: str, model_type: str, connector_layers: int) -> str:
    """Our backbone state-dict key (``backbone.`` removed) -> the reference's (``backbone.`` removed)."""
    eagle = EAGLE_PREFIX[model_type]
    if ours.startswith("vision_model."):
        # The reference's transformers nests SigLIP's weights one level deeper (``vision_model.``) than recent ones.
        return eagle + "vision_model.vision_model." + ours.removeprefix("vision_model.").removeprefix("vision_model.")
    if ours.startswith("language_model."):
        return eagle + "language_model.model." + ours.removeprefix("language_model.")
    if ours.startswith("connector.mlp."):
        return eagle + "mlp1." + _connector_key(ours.removeprefix("connector.mlp."), connector_layers)
    if ours.startswith("projector."):
        return PROJECTION[model_type] + ours.removeprefix("projector.")
    raise GrootCheckpointError(f"backbone parameter {ours!r} has no Isaac-GR00T counterpart: only the vision tower, "
                               "connector, LM and projector of a GR00T-configured ComposedBackbone map")


def unused_reference_key(key: str, model_type: str, select_layer: int) -> bool:
    """Reference tensors the computation never reads: SigLIP's pooling head, the LM head, layers above the read one."""
    eagle = EAGLE_PREFIX[model_type]
    if key.startswith(eagle + "vision_model.vision_model.head.") or key == eagle + "language_model.lm_head.weight":
        return True
    layer = re.fullmatch(re.escape(eagle) + r"language_model\.model\.layers\.(\d+)\..+", key)
    return layer is not None and int(layer.group(1)) >= select_layer


def backbone_state_from_reference(expected: dict[str, torch.Size], theirs: dict[str, torch.Tensor], model_type: str,
                                  connector_layers: int, select_layer: int, files: dict[str, Path],
                                  source: str | Path, tied: bool = False
                                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Reference backbone tensors (keys without ``backbone.``) -> (our state dict, the unused reference tensors,
    our keys read under another reference name). ``expected`` is our backbone's key -> shape; every key and shape
    is checked, errors naming the file and the key."""
    names = {k: reference_key(k, model_type, connector_layers) for k in expected}
    aliases: dict[str, str] = {}
    eagle = EAGLE_PREFIX[model_type]
    embed, lm_head = "language_model.embed_tokens.weight", eagle + "language_model.lm_head.weight"
    if tied and embed in names and names[embed] not in theirs and lm_head in theirs:
        aliases[embed] = names[embed] = lm_head  # tied embeddings saved under the LM head's name only
    missing = [k for k, ref in names.items() if ref not in theirs]
    if missing:
        raise GrootCheckpointError(
            f"{source}: key {PREFIX + names[missing[0]]!r} is missing ({len(missing)} missing in all); the backbone "
            f"that {CONFIG}'s backbone_cfg and the Eagle config describe needs it: check both against these weights "
            "(another Eagle architecture than the released one: --eagle-config)")
    used = set(names.values())
    unused = {k: v for k, v in theirs.items() if k not in used and unused_reference_key(k, model_type, select_layer)}
    unexpected = [k for k in theirs if k not in used and k not in unused]
    if unexpected:
        k = unexpected[0]
        raise GrootCheckpointError(
            f"{files.get(k, source)}: key {PREFIX + k!r} is not part of the backbone that {CONFIG}'s backbone_cfg "
            f"and the Eagle config describe ({len(unexpected)} such keys); check model_type and the Eagle config "
            "against these weights")
    for k, ref in names.items():
        if tuple(theirs[ref].shape) != tuple(expected[k]):
            raise GrootCheckpointError(
                f"{files.get(ref, source)}: key {PREFIX + ref!r} has shape {list(theirs[ref].shape)} but the backbone "
                f"that {CONFIG} and the Eagle config describe needs {list(expected[k])}; check the Eagle config "
                "(--eagle-config) against these weights")
    return {k: theirs[ref] for k, ref in names.items()}, unused, aliases


def backbone_state_to_reference(ours: dict[str, torch.Tensor], model_type: str, connector_layers: int,
                                aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Our backbone state dict (no adapters) -> reference tensors (keys without ``backbone.``)."""
    aliases = aliases or {}
    return {aliases.get(k) or reference_key(k, model_type, connector_layers): v for k, v in ours.items()}
