"""Isaac-GR00T's flow-matching action head <-> ``components.action_head.FlowMatchingActionHead``.

The reference head (``gr00t/model/action_head/flow_matching_action_head.py`` and its DiT) computes what ours
computes once four numerical conventions are set (``head_kwargs``): the action encoder's time code is
``[sin, cos]``, the DiT's diffusers time embedding uses ``downscale_freq_shift = 1``, the output norm's eps is 1e-6
and the position table has ``max_seq_len`` rows. The weights then map one to one, up to layout (``head_links``):

| reference (``action_head.`` removed) | ours |
|---|---|
| ``state_encoder.layer{1,2}.{W,b}`` ``[E, in, out]`` | ``state_encoder.layer{1,2}.{weights,biases}.{e}`` (a parameter per slot) |
| ``action_encoder.W{1,2,3}`` / ``action_decoder.layer{1,2}`` | ``action_encoder.layer{1,2,3}`` / ``action_decoder.layer{1,2}`` |
| ``model.timestep_encoder.timestep_embedder.linear_{1,2}`` | ``timestep_embedding.timestep_embedder.linear_{1,2}`` |
| ``model.transformer_blocks.i.norm1.linear`` (scale, shift) | ``blocks.i.norm1.modulation`` (scale, shift) |
| ``...attn1.{to_q, to_k + to_v, to_out.0}``, ``ff.net.{0.proj, 2}`` | ``blocks.i.{to_q, to_kv, to_out}``, ``ff.{0, 3}`` |
| ``model.proj_out_1`` (shift, scale) / ``model.proj_out_2`` | ``norm_out.modulation`` (scale, shift) / ``proj_out`` |
| N1.5: ``vlln``, ``vl_self_attention.transformer_blocks.i`` (``norm3``) | ``vl_norm``, ``vl_blocks.i`` (``norm2``) |
| N1.5: ``future_tokens.weight``; ``position_embedding.weight`` | ``future_tokens``; ``position_embedding`` |

The reference ignores the VL attention mask; ours honours it, so outputs agree wherever the mask is all True.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.action_head import FlowMatchingActionHead
from components.embodiment import EmbodimentLinear
from vla_zoo.groot.checkpoint import CONFIG, GrootCheckpointError, read_config, read_tensors, write_checkpoint

PREFIX = "action_head."


# ----------------------------------------------------------------------------------------------- configuration
def _need(cfg: dict[str, Any], key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise GrootCheckpointError(f"{where}: key {key!r} is missing")
    return cfg[key]


def _unsupported(where: str, key: str, value: Any, supported: Any) -> GrootCheckpointError:
    return GrootCheckpointError(f"{where}: key {key!r} is {value!r}; only {supported!r} (as in the released N1 / N1.5 "
                                "checkpoints) is supported")


def _check_blocks(cfg: dict[str, Any], where: str, norm_type: str | None) -> None:
    """Settings of the reference's transformer blocks that this head does not implement (all at released values)."""
    # the reference DiT's default positional_embeddings is "sinusoidal": an absent key means that
    for key, default, supported in (("positional_embeddings", "sinusoidal", None),
                                    ("activation_fn", "gelu-approximate", "gelu-approximate"),
                                    ("attention_bias", True, True), ("upcast_attention", False, False)):
        if cfg.get(key, default) != supported:
            raise _unsupported(where, key, cfg.get(key, default), supported)
    if norm_type is not None:
        for key, default, supported in (("norm_type", "ada_norm", norm_type), ("norm_elementwise_affine", False, False),
                                        ("norm_eps", 1e-5, 1e-5)):
            if cfg.get(key, default) != supported:
                raise _unsupported(where, key, cfg.get(key, default), supported)


def head_kwargs(config: dict[str, Any], source: str | Path = CONFIG) -> dict[str, Any]:
    """``FlowMatchingActionHead`` arguments that reproduce the reference head a ``config.json`` describes."""
    head_cfg = config["action_head_cfg"]
    where = f"{source}: action_head_cfg"
    dit = _need(head_cfg, "diffusion_model_cfg", where)
    dit_where = f"{where}.diffusion_model_cfg"
    _check_blocks(dit, dit_where, norm_type="ada_norm")
    heads, head_dim = _need(dit, "num_attention_heads", dit_where), _need(dit, "attention_head_dim", dit_where)
    width = heads * head_dim  # the DiT's inner width = the width of the state / action tokens
    if head_cfg.get("input_embedding_dim", 1536) != width:
        raise GrootCheckpointError(
            f"{where}: key 'input_embedding_dim' is {head_cfg.get('input_embedding_dim', 1536)} but the DiT's "
            f"num_attention_heads x attention_head_dim is {heads} x {head_dim} = {width}; they must be equal"
        )
    hidden = head_cfg.get("hidden_size", 1024)
    if dit.get("output_dim", 26) != hidden:
        raise GrootCheckpointError(f"{dit_where}: key 'output_dim' is {dit.get('output_dim', 26)}; the action decoder "
                                   f"reads hidden_size = {hidden} features, so it must be {hidden}")
    if not head_cfg.get("add_pos_embed", True):
        raise _unsupported(where, "add_pos_embed", False, True)
    kwargs: dict[str, Any] = dict(
        num_embodiments=head_cfg.get("max_num_embodiments", 32),
        max_state_dim=_need(head_cfg, "max_state_dim", where),
        max_action_dim=_need(head_cfg, "action_dim", where),
        horizon=_need(head_cfg, "action_horizon", where),
        hidden_dim=width,
        num_layers=dit.get("num_layers", 12),
        num_heads=heads,
        cross_attention_dim=dit.get("cross_attention_dim") or width,  # N1: the VL tokens come at the DiT's width
        interleave=bool(dit.get("interleave_self_attention", False)),
        dropout=float(dit.get("dropout", 0.1)),
        embodiment_hidden_dim=hidden,
        num_inference_steps=head_cfg.get("num_inference_timesteps") or 4,
        noise_beta_alpha=head_cfg.get("noise_beta_alpha", 1.5),
        noise_beta_beta=head_cfg.get("noise_beta_beta", 1.0),
        noise_s=head_cfg.get("noise_s", 0.999),
        num_timestep_buckets=head_cfg.get("num_timestep_buckets", 1000),
        time_code_layout="sin_cos",
        time_frequency_shift=1.0,
        output_norm_eps=1e-6,
        max_seq_len=head_cfg.get("max_seq_len", 1024),
    )
    if config["model_type"] == "gr00t_n1_5":
        kwargs["num_future_tokens"] = head_cfg.get("num_target_vision_tokens", 32)
        if head_cfg.get("use_vlln", True):
            vsa_where = f"{where}.vl_self_attention_cfg"
            vsa = _need(head_cfg, "vl_self_attention_cfg", where)
            _check_blocks(vsa, vsa_where, norm_type=None)
            vl_heads, vl_head_dim = _need(vsa, "num_attention_heads", vsa_where), _need(vsa, "attention_head_dim", vsa_where)
            vl_width = head_cfg.get("backbone_embedding_dim", 1536)
            if vl_heads * vl_head_dim != vl_width or kwargs["cross_attention_dim"] != vl_width:
                raise GrootCheckpointError(
                    f"{where}: the VL self-attention width ({vl_heads} x {vl_head_dim}) and the DiT's "
                    f"cross_attention_dim ({kwargs['cross_attention_dim']}) must both equal backbone_embedding_dim "
                    f"({vl_width})"
                )
            kwargs.update(vl_layer_norm=True, vl_self_attention_layers=vsa.get("num_layers", 12),
                          vl_self_attention_heads=vl_heads)
    return kwargs


# ----------------------------------------------------------------------------------------------- weight layout
@dataclass(frozen=True)
class Link:
    """Our state-dict entries <-> the reference's, and how one layout becomes the other.

    ``same``: one tensor each side. ``kv``: our ``to_kv`` = reference ``to_k`` over ``to_v`` (rows). ``swap``: the
    two row halves exchanged (adaLN (scale, shift) vs (shift, scale)). ``slots``: our E per-slot tensors = the
    reference's one ``[E, ...]`` tensor.
    """

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    kind: str = "same"

    def to_theirs(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.kind == "kv":
            return list(tensors[0].chunk(2, dim=0))
        if self.kind == "swap":
            return [torch.cat(tensors[0].chunk(2, dim=0)[::-1])]
        if self.kind == "slots":
            return [torch.stack(tensors)]
        return tensors

    def to_ours(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.kind == "kv":
            return [torch.cat(tensors)]
        if self.kind == "swap":
            return [torch.cat(tensors[0].chunk(2, dim=0)[::-1])]
        if self.kind == "slots":
            return [t.clone() for t in tensors[0].unbind(0)]
        return tensors


def head_links(head: FlowMatchingActionHead) -> list[Link]:
    """Every parameter of ``head`` linked to its reference key(s) (without the ``action_head.`` prefix)."""
    links: list[Link] = []

    def linear(ours: str, theirs: str, kind: str = "same") -> None:
        links.extend(Link((f"{ours}.{p}",), (f"{theirs}.{p}",), kind) for p in ("weight", "bias"))

    def attention_block(ours: str, theirs: str, time_conditioned: bool) -> None:
        if time_conditioned:
            linear(f"{ours}.norm1.modulation", f"{theirs}.norm1.linear")
        else:
            linear(f"{ours}.norm1", f"{theirs}.norm1")
            linear(f"{ours}.norm2", f"{theirs}.norm3")
        linear(f"{ours}.to_q", f"{theirs}.attn1.to_q")
        links.extend(Link((f"{ours}.to_kv.{p}",), (f"{theirs}.attn1.to_k.{p}", f"{theirs}.attn1.to_v.{p}"), "kv")
                     for p in ("weight", "bias"))
        linear(f"{ours}.to_out", f"{theirs}.attn1.to_out.0")
        linear(f"{ours}.ff.0", f"{theirs}.ff.net.0.proj")
        linear(f"{ours}.ff.3", f"{theirs}.ff.net.2")

    adapters = {"state_encoder.layer1": "state_encoder.layer1", "state_encoder.layer2": "state_encoder.layer2",
                "action_encoder.layer1": "action_encoder.W1", "action_encoder.layer2": "action_encoder.W2",
                "action_encoder.layer3": "action_encoder.W3", "action_decoder.layer1": "action_decoder.layer1",
                "action_decoder.layer2": "action_decoder.layer2"}
    for ours, theirs in adapters.items():
        layer = head.get_submodule(ours)
        assert isinstance(layer, EmbodimentLinear)
        for mine, ref in (("weights", "W"), ("biases", "b")):
            slots = tuple(f"{ours}.{mine}.{e}" for e in range(layer.num_embodiments))
            links.append(Link(slots, (f"{theirs}.{ref}",), "slots"))
    links.append(Link(("position_embedding",), ("position_embedding.weight",)))
    for i in (1, 2):
        linear(f"timestep_embedding.timestep_embedder.linear_{i}", f"model.timestep_encoder.timestep_embedder.linear_{i}")
    for i, block in enumerate(head.blocks):
        attention_block(f"blocks.{i}", f"model.transformer_blocks.{i}", block.time_conditioned)
    linear("norm_out.modulation", "model.proj_out_1", "swap")
    linear("proj_out", "model.proj_out_2")
    if head.vl_norm is not None:
        linear("vl_norm", "vlln")
    for i, block in enumerate(head.vl_blocks):
        attention_block(f"vl_blocks.{i}", f"vl_self_attention.transformer_blocks.{i}", block.time_conditioned)
    if head.future_tokens is not None:
        links.append(Link(("future_tokens",), ("future_tokens.weight",)))
    return links


def head_state_to_reference(head: FlowMatchingActionHead) -> dict[str, torch.Tensor]:
    """``head``'s weights under the reference's key names (without the ``action_head.`` prefix) and layouts."""
    ours = head.state_dict()
    out: dict[str, torch.Tensor] = {}
    for link in head_links(head):
        out.update(zip(link.theirs, link.to_theirs([ours[k] for k in link.ours])))
    return out


def head_state_from_reference(head: FlowMatchingActionHead, theirs: dict[str, torch.Tensor],
                              files: dict[str, Path] | None = None, source: str | Path = "the checkpoint") -> dict[str, torch.Tensor]:
    """Reference-layout weights (keys without ``action_head.``) -> ``head``'s state dict, with every key and shape
    checked against what ``head`` (possibly on the meta device) expects. ``files`` names each key's file."""
    files = files or {}
    expected = {k: tuple(v.shape) for k, v in head_state_to_reference(head).items()}
    missing = [k for k in expected if k not in theirs]
    if missing:
        raise GrootCheckpointError(
            f"{source}: key {PREFIX + missing[0]!r} is missing ({len(missing)} missing in all); the head that "
            f"{CONFIG}'s action_head_cfg describes needs it: check that config.json belongs to these weights"
        )
    unexpected = [k for k in theirs if k not in expected]
    if unexpected:
        k = unexpected[0]
        raise GrootCheckpointError(
            f"{files.get(k, source)}: key {PREFIX + k!r} is not part of the head that {CONFIG}'s action_head_cfg "
            f"describes ({len(unexpected)} such keys); check model_type and action_head_cfg against these weights"
        )
    for k, shape in expected.items():
        if tuple(theirs[k].shape) != shape:
            raise GrootCheckpointError(
                f"{files.get(k, source)}: key {PREFIX + k!r} has shape {list(theirs[k].shape)} but {CONFIG}'s "
                f"action_head_cfg gives {list(shape)}; check the sizes in action_head_cfg against these weights"
            )
    state: dict[str, torch.Tensor] = {}
    for link in head_links(head):
        state.update(zip(link.ours, link.to_ours([theirs[k] for k in link.theirs])))
    return state


def load_groot_action_head(path: str | Path, dtype: torch.dtype | None = torch.float32) -> FlowMatchingActionHead:
    """The action head of an Isaac-GR00T N1 / N1.5 checkpoint folder as a ``FlowMatchingActionHead`` in eval mode.

    ``path`` holds ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json`` and its shards);
    only the ``action_head.`` tensors are read. The head is built on the meta device and takes the checkpoint's
    tensors (cast to ``dtype``; None keeps the checkpoint's), so no memory goes to a random initialisation first.
    """
    path = Path(path)
    config = read_config(path)
    kwargs = head_kwargs(config, path / CONFIG)
    theirs, files = read_tensors(path, PREFIX)
    with torch.device("meta"):
        head = FlowMatchingActionHead(**kwargs)
    state = head_state_from_reference(head, theirs, files, path)
    head.load_state_dict({k: v if dtype is None else v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return head.eval()


def reference_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of the reference head that ``FlowMatchingActionHead(**kwargs)`` equals (the inverse of
    ``head_kwargs``): N1.5 when the head has future tokens or VL processing, else N1. A head configured with this
    zoo's own numerics has no reference equivalent and is refused."""
    defaults = {k: p.default for k, p in inspect.signature(FlowMatchingActionHead).parameters.items()
                if p.default is not inspect.Parameter.empty}
    kw = {**defaults, **kwargs}
    for key, value in (("time_code_layout", "sin_cos"), ("time_frequency_shift", 1.0), ("output_norm_eps", 1e-6),
                       ("use_state", True)):
        if kw[key] != value:
            raise GrootCheckpointError(
                f"action head argument {key}={kw[key]!r}: the Isaac-GR00T head computes with {key}={value!r}, so "
                "these weights would not compute the same there; only heads imported from (or configured like) "
                "a GR00T checkpoint can be exported"
            )
    width, cross = kw["hidden_dim"], kw["cross_attention_dim"]
    n1_5 = bool(kw["num_future_tokens"] or kw["vl_layer_norm"] or kw["vl_self_attention_layers"])
    if n1_5 and bool(kw["vl_layer_norm"]) != bool(kw["vl_self_attention_layers"]):
        raise GrootCheckpointError("action head arguments vl_layer_norm and vl_self_attention_layers: GR00T N1.5 "
                                   "has both or neither (its use_vlln switches both)")
    if not n1_5 and cross != width:
        raise GrootCheckpointError(f"action head argument cross_attention_dim={cross}: a GR00T N1 head reads VL tokens "
                                   f"at the DiT's width hidden_dim={width}")
    dit = dict(num_attention_heads=kw["num_heads"], attention_head_dim=width // kw["num_heads"],
               output_dim=kw["embodiment_hidden_dim"], num_layers=kw["num_layers"], dropout=kw["dropout"],
               final_dropout=True, interleave_self_attention=kw["interleave"], norm_type="ada_norm",
               positional_embeddings=None)
    head_cfg: dict[str, Any] = dict(
        diffusion_model_cfg=dit, input_embedding_dim=width, hidden_size=kw["embodiment_hidden_dim"],
        max_seq_len=kw["max_seq_len"] or kw["horizon"], action_dim=kw["max_action_dim"], action_horizon=kw["horizon"],
        noise_beta_alpha=kw["noise_beta_alpha"], noise_beta_beta=kw["noise_beta_beta"], noise_s=kw["noise_s"],
        num_timestep_buckets=kw["num_timestep_buckets"], num_inference_timesteps=kw["num_inference_steps"],
        max_num_embodiments=kw["num_embodiments"], max_state_dim=kw["max_state_dim"], tune_projector=True,
        tune_diffusion_model=True, add_pos_embed=True,
    )
    if n1_5:
        dit["cross_attention_dim"] = cross
        vl_heads = kw["vl_self_attention_heads"] or kw["num_heads"]
        head_cfg.update(backbone_embedding_dim=cross, use_vlln=bool(kw["vl_layer_norm"]),
                        num_target_vision_tokens=kw["num_future_tokens"])
        if kw["vl_layer_norm"]:
            head_cfg["vl_self_attention_cfg"] = dict(
                num_attention_heads=vl_heads, attention_head_dim=cross // vl_heads, output_dim=cross,
                num_layers=kw["vl_self_attention_layers"], dropout=kw["dropout"], final_dropout=True,
                positional_embeddings=None)
    return {"model_type": "gr00t_n1_5" if n1_5 else "gr00t_n1", "action_head_cfg": head_cfg,
            "action_horizon": kw["horizon"], "action_dim": kw["max_action_dim"]}


def save_groot_action_head(head: FlowMatchingActionHead, kwargs: dict[str, Any], folder: str | Path) -> None:
    """Write ``head`` (built from ``kwargs``) as a reference head checkpoint: ``config.json`` + ``model.safetensors``
    under ``action_head.`` keys. The config is checked before anything is written."""
    config = reference_config(kwargs)
    write_checkpoint(folder, config, {PREFIX + k: v for k, v in head_state_to_reference(head).items()})
