"""``python -m vla_zoo.groot``: Isaac-GR00T checkpoints in and out of vla-zoo.

    python -m vla_zoo.groot inspect SRC                     # what the folder holds, checked; JSON
    python -m vla_zoo.groot import SRC OUT.ckpt [--tokenizer DIR] [--embodiment TAG[=SLOT] ...] [--recipe OUT.yaml]
    python -m vla_zoo.groot export CKPT OUT_DIR             # a vla-zoo checkpoint -> the reference layout

``import`` converts a whole reference folder: the action head (``action_head.*``, checked against
``config.json``), the Eagle backbone (``backbone.*``, onto ``ComposedBackbone``; the Eagle architecture is the
released one of the model type unless ``--eagle-config`` gives Isaac-GR00T's ``eagle2_hg_model/config.json``) and
``experiment_cfg/metadata.json`` (per-embodiment statistics and layout -> our normalisers and ``Modality``; the order
of ``--modality``'s keys when given). The result is a checkpoint that ``Policy.from_checkpoint`` and
``python -m vla_zoo.deploy.server --checkpoint`` serve, and that a fit starts from with
``--model.init_args.init_from=OUT.ckpt`` (with the recipe ``--recipe`` writes, or ``recipes/groot/*.yaml``). The
LM's tokenizer is not part of a GR00T folder: ``--tokenizer`` names one (the LM's own download); without it the
offline tokenizer stands in, which only suits tests.

``export`` writes a vla-zoo checkpoint (imported, or trained from one; LoRA adapters merged) back as
``config.json`` + ``model.safetensors`` + ``experiment_cfg/metadata.json`` under the reference names; an imported
checkpoint exported gives the reference tensors (dtype included), ``config.json`` and ``metadata.json`` back.
A folder with only an action head imports (and exports) the head alone, for ``init_from: {path: OUT.ckpt, parts:
[action_head]}``.
Bad input stops with a message naming the file and the key, exit status 1, and nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from components.action_head import FlowMatchingActionHead
from components.lora import LoRA, merge_lora
from lit_modules.checkpoint import CONFIG_KEY, DATA_SPEC_KEY, read_checkpoint
from vla_zoo.groot.backbone import (
    PREFIX as BACKBONE,
    backbone_cfg,
    backbone_kwargs,
    backbone_state_from_reference,
    backbone_state_to_reference,
    eagle_config,
)
from vla_zoo.groot.checkpoint import CONFIG, GrootCheckpointError, _read_json, read_config, read_tensors, tensor_index
from vla_zoo.groot.head import PREFIX, head_kwargs, head_state_to_reference, load_groot_action_head, reference_config
from vla_zoo.groot.metadata import METADATA, data_spec_from_metadata, metadata_from_data_spec, read_metadata
from vla_zoo.groot.tags import embodiment_slot

#: Checkpoint key of what ``import`` read: source folder, model type, config.json, component arguments, embodiment
#: tags -> slots, and the reference tensors the model does not use (written back by ``export``).
IMPORT_KEY = "vla_zoo_groot"
#: Head arguments that change how it trains, not what it computes: dropped when a head is exported.
TRAINING_ONLY = ("gradient_checkpointing", "tune_projector", "tune_diffusion_model", "lora")
POLICY = "lit_modules.vla_policy.VLAPolicy"
BACKBONE_CLASS = "components.backbones.ComposedBackbone"
HEAD_CLASS = "components.action_head.FlowMatchingActionHead"


def inspect_checkpoint(src: str | Path) -> dict[str, Any]:
    """The checked summary of a reference checkpoint folder: model type, head arguments, tensor counts, tags."""
    src = Path(src)
    config = read_config(src)
    kwargs = head_kwargs(config, src / CONFIG)
    keys = tensor_index(src)
    metadata = read_metadata(src)
    return {
        "model_type": config["model_type"],
        "action_head": kwargs,
        "tensors": {"action_head": sum(k.startswith(PREFIX) for k in keys),
                    "backbone": sum(k.startswith(BACKBONE) for k in keys), "other": sum(
                        not k.startswith((PREFIX, BACKBONE)) for k in keys)},
        "embodiment_tags": sorted(metadata) if metadata else [],
    }


# ------------------------------------------------------------------------------------------------------ import
def _slots(requested: list[str], metadata: dict[str, Any] | None, num_embodiments: int, src: Path) -> dict[str, int]:
    """Embodiment tag -> action-head slot: the ``--embodiment`` tags (``TAG=SLOT`` for a tag outside the released
    table), or every tag of ``metadata.json``."""
    given = {tag.partition("=")[0]: tag for tag in requested}
    if metadata is None:
        return {name: embodiment_slot(tag, num_embodiments) for name, tag in given.items()}
    path = src / METADATA
    for name in given:
        if name not in metadata:
            raise GrootCheckpointError(f"{path}: no key {name!r} (--embodiment); its embodiment tags are {sorted(metadata)}")
    slots = {}
    for name in given or metadata:
        try:
            slots[name] = embodiment_slot(given.get(name, name), num_embodiments)
        except GrootCheckpointError as err:
            raise GrootCheckpointError(f"{path}: key {name!r}: {err}") from err
    return slots


def _build_backbone(kwargs: dict[str, Any], where: str):
    from components.backbones import ComposedBackbone

    build = dict(kwargs)
    if isinstance(build.get("llm_lora"), dict):
        build["llm_lora"] = LoRA(**build["llm_lora"])
    try:
        with torch.device("meta"):  # shapes only: the checkpoint's tensors are assigned afterwards
            return ComposedBackbone(**build)
    except (OSError, ValueError, TypeError) as err:
        raise GrootCheckpointError(f"{where}: cannot build its backbone ({err})") from err


def _recipe(backbone: dict[str, Any] | None, head: dict[str, Any]) -> dict[str, Any]:
    init_args: dict[str, Any] = {"action_head": {"class_path": HEAD_CLASS, "init_args": head}}
    if backbone is not None:
        init_args = {"backbone": {"class_path": BACKBONE_CLASS, "init_args": backbone}, **init_args}
    return {"model": {"class_path": POLICY, "init_args": init_args}}


def import_checkpoint(src: str | Path, out: str | Path, embodiments: list[str] = (), *,
                      eagle_config_path: str | Path | None = None, tokenizer: str | Path | None = None,
                      modality: str | Path | None = None, normalization: str = "min_max",
                      recipe: str | Path | None = None) -> dict[str, Any]:
    """Write reference folder ``src`` as the vla-zoo checkpoint ``out`` (and, with ``recipe``, the model part of a
    recipe that rebuilds it); every check runs before anything is written."""
    src, out = Path(src), Path(out)
    config = read_config(src)
    head_kw = head_kwargs(config, src / CONFIG)
    metadata = read_metadata(src)
    if modality is not None and metadata is None:
        raise GrootCheckpointError(f"{src}: --modality lays out {METADATA}'s statistics, but the folder has none")
    slots = _slots(list(embodiments), metadata, head_kw["num_embodiments"], src)
    keys = tensor_index(src)
    head = load_groot_action_head(src, dtype=None)  # the checkpoint's dtype: export gives the same bytes back
    state = {PREFIX + k: v for k, v in head.state_dict().items()}
    info: dict[str, Any] = {"source": str(src), "model_type": config["model_type"], "config": config,
                            "action_head": head_kw, "backbone": None, "embodiments": slots}
    bb_kw = None
    if any(k.startswith(BACKBONE) for k in keys):
        eagle, eagle_src = eagle_config(config["model_type"], eagle_config_path)
        bb_kw = backbone_kwargs(config, eagle, head_kw, src / CONFIG, eagle_src,
                                tokenizer_path=str(tokenizer) if tokenizer is not None else None)
        backbone = _build_backbone(bb_kw, str(src))
        expected = {k: v.shape for k, v in backbone.state_dict().items()}
        theirs, files = read_tensors(src, BACKBONE)
        text = eagle.get("text_config", eagle.get("llm_config"))
        ours, unused, aliases = backbone_state_from_reference(
            expected, theirs, config["model_type"], 2 if bb_kw["connector"] == "mlp" else 1, bb_kw["select_layer"],
            files, src, tied=bool(text.get("tie_word_embeddings")))
        state.update({BACKBONE + k: v for k, v in ours.items()})
        info.update(backbone=bb_kw, eagle_config=eagle, unused=unused, aliases=aliases)
    spec = None
    if metadata is not None and bb_kw is not None:
        modality_json = _read_json(Path(modality)) if modality is not None else None
        if modality_json is not None and not isinstance(modality_json, dict):
            raise GrootCheckpointError(f"{modality}: expected a modality.json object")
        spec = data_spec_from_metadata(metadata, src / METADATA, slots, horizon=head_kw["horizon"],
                                       max_state_dim=head_kw["max_state_dim"], max_action_dim=head_kw["max_action_dim"],
                                       image_size=bb_kw["image_size"], normalization=normalization,
                                       modality_json=modality_json, modality_path=modality)
    payload: dict[str, Any] = {"state_dict": state, IMPORT_KEY: info}
    model_recipe = _recipe(bb_kw, head_kw)
    if bb_kw is not None:
        import lightning


        # What Lightning's load_from_checkpoint needs to rebuild the policy from the recipe (as LightningCLI saves
        # it), and the recipe itself for load_run_config.
        init_args = model_recipe["model"]["init_args"]
        payload.update({"pytorch-lightning_version": lightning.__version__, CONFIG_KEY: yaml.safe_dump(
            model_recipe, sort_keys=False), "hyper_parameters": {
            "_class_path": POLICY, **init_args, "_instantiator": "lightning.pytorch.cli.instantiate_module"}})
        if spec is not None:
            payload[DATA_SPEC_KEY] = spec
    if recipe is not None and (Path(recipe).exists() or not Path(recipe).parent.is_dir()):
        raise GrootCheckpointError(f"{recipe}: it exists already, or its folder does not; choose another path")
    _replace_atomically(out, lambda tmp: torch.save(payload, tmp))
    if recipe is not None:
        model_recipe["model"]["init_args"]["init_from"] = str(out)
        Path(recipe).write_text(yaml.safe_dump(model_recipe, sort_keys=False))
    summary = {"source": str(src), "model_type": config["model_type"], "embodiments": slots,
               "parts": ["backbone", "action_head"] if bb_kw is not None else ["action_head"],
               "policy": spec is not None}
    if spec is None:
        summary["note"] = ("no backbone tensors: a head for init_from {path, parts: [action_head]}" if bb_kw is None else
                           f"no {METADATA}: weights for init_from only, no statistics for a policy")
    if bb_kw is not None and tokenizer is None:
        summary["tokenizer"] = ("none given: the offline test tokenizer stands in, which the released LM cannot "
                                "read; pass --tokenizer (the LM's download, e.g. Qwen/Qwen3-1.7B for N1.5)")
    return summary


# ------------------------------------------------------------------------------------------------------ export
def _read(path: Path) -> dict[str, Any]:
    """A vla-zoo checkpoint, memory-mapped and read with weights_only (a crafted file is refused, naming it)."""
    try:
        return read_checkpoint(path, mmap=True)
    except ValueError as err:
        raise GrootCheckpointError(str(err)) from None


def _arguments(checkpoint: dict[str, Any], path: Path, part: str) -> dict[str, Any] | None:
    """The recorded arguments of ``part`` (``action_head`` / ``backbone``): from ``import`` or the embedded recipe."""
    if IMPORT_KEY in checkpoint:
        kwargs = checkpoint[IMPORT_KEY].get(part)
        return dict(kwargs) if kwargs is not None else None
    if CONFIG_KEY not in checkpoint:
        raise GrootCheckpointError(f"{path}: neither a `python -m vla_zoo.groot import` checkpoint nor one written by "
                                   "the vla-zoo CLI (no embedded recipe to rebuild its model from)")
    component = yaml.safe_load(checkpoint[CONFIG_KEY])["model"]["init_args"].get(part)
    if component is None:
        return None
    expected = HEAD_CLASS if part == "action_head" else BACKBONE_CLASS
    if not component.get("class_path", "").endswith(expected.rpartition(".")[2]):
        raise GrootCheckpointError(f"{path}: key model.init_args.{part} is {component.get('class_path')!r}; only a "
                                   f"{expected.rpartition('.')[2]} has an Isaac-GR00T counterpart")
    return dict(component.get("init_args", {}))


def _import_record(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What ``import`` recorded for this checkpoint, or for the imported checkpoint its fit started from
    (``init_from``): the reference config and the tensors the model does not hold."""
    if IMPORT_KEY in checkpoint:
        return checkpoint[IMPORT_KEY]
    if CONFIG_KEY not in checkpoint:
        return {}
    init_from = (yaml.safe_load(checkpoint[CONFIG_KEY])["model"].get("init_args") or {}).get("init_from")
    init_from = init_from.get("path") if isinstance(init_from, dict) else init_from  # InitFrom(path, parts)
    if not init_from or not Path(init_from).is_file():
        return {}
    start = _read(Path(init_from))
    record = dict(start.get(IMPORT_KEY, {}))
    return {"base_config": record["config"], **{k: record[k] for k in ("unused", "aliases") if k in record}} \
        if record.get("config") else {}


def _export_backbone(kwargs: dict[str, Any], state: dict[str, torch.Tensor], ckpt: Path, model_type: str,
                     aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    defaults = {"keep_final_norm": False, "vision_model_type": "siglip_vision_model", "vision_pretrained_path": None,
                "lm_pretrained_path": None, "keypoints": 0}
    for key, value in (("keep_final_norm", True), ("vision_model_type", "siglip_vision_model"),
                       ("vision_pretrained_path", None), ("lm_pretrained_path", None), ("keypoints", 0)):
        if kwargs.get(key, defaults[key]) != value:
            raise GrootCheckpointError(f"{ckpt}: backbone argument {key}={kwargs.get(key)!r}; exporting needs "
                                       f"{key}={value!r}, as an imported GR00T backbone has (its weights all in the "
                                       "checkpoint, computing what the reference computes)")
    if kwargs.get("projector") not in ("linear", "identity"):
        raise GrootCheckpointError(f"{ckpt}: backbone argument projector={kwargs.get('projector')!r}; GR00T's is a "
                                   "Linear (N1 linear, N1.5 eagle_linear) or nothing")
    backbone = _build_backbone(kwargs, str(ckpt))
    try:
        backbone.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise GrootCheckpointError(f"{ckpt}: its backbone does not match its recorded arguments ({err})") from err
    merge_lora(backbone)
    layers = 2 if kwargs.get("connector", "mlp") == "mlp" else 1
    return backbone_state_to_reference(backbone.state_dict(), model_type, layers, aliases)


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Write vla-zoo checkpoint ``ckpt`` as a reference checkpoint folder ``out`` (tensors in their own dtype, or
    ``dtype``)."""
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_file():
        raise GrootCheckpointError(f"{ckpt}: no such checkpoint file")
    checkpoint = _read(ckpt)
    info = _import_record(checkpoint)
    kwargs = _arguments(checkpoint, ckpt, "action_head")
    lora = kwargs.get("lora")
    build = {**kwargs, "lora": LoRA(**lora) if isinstance(lora, dict) else lora}
    weights = checkpoint.get("state_dict", {})
    state = {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}
    if not state:
        raise GrootCheckpointError(f"{ckpt}: key 'state_dict' holds no 'action_head.' tensors")
    with torch.device("meta"):
        head = FlowMatchingActionHead(**build)
    try:
        head.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise GrootCheckpointError(f"{ckpt}: its action head does not match its recorded arguments ({err})") from err
    merge_lora(head)
    plain = {k: v for k, v in kwargs.items() if k not in TRAINING_ONLY}
    config = reference_config(plain)  # refuses a head with this zoo's own numerics, before anything is written
    model_type = config["model_type"]
    tensors = {PREFIX + k: v for k, v in head_state_to_reference(head).items()}
    bb_state = {k[len(BACKBONE):]: v for k, v in weights.items() if k.startswith(BACKBONE)}
    bb_kw = _arguments(checkpoint, ckpt, "backbone") if bb_state else None
    if bb_kw is not None:
        ref = _export_backbone(bb_kw, bb_state, ckpt, model_type, info.get("aliases", {}))
        tensors.update({BACKBONE + k: v for k, v in {**ref, **info.get("unused", {})}.items()})
        config["backbone_cfg"] = backbone_cfg(model_type, bb_kw)
    if info.get("config") is not None:
        config = info["config"]  # as imported: what the architecture checks above agreed with
    elif info.get("base_config") is not None:  # trained from an imported checkpoint: its other settings kept
        base = info["base_config"]
        config = {**base, **config, **{key: {**base.get(key, {}), **config[key]}
                                       for key in ("action_head_cfg", "backbone_cfg") if key in config}}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    from lit_modules.vla_policy import DATA_SPEC_KEY

    spec = checkpoint.get(DATA_SPEC_KEY)
    metadata, notes = metadata_from_data_spec(spec) if spec is not None else (None, [])

    def write(tmp: Path) -> None:
        from vla_zoo.groot.checkpoint import write_checkpoint

        write_checkpoint(tmp, config, tensors)
        if metadata is not None:
            (tmp / METADATA).parent.mkdir(parents=True)
            (tmp / METADATA).write_text(json.dumps(metadata, indent=1) + "\n")

    _replace_atomically(out, write, folder=True)
    result: dict[str, Any] = {"model_type": model_type, "tensors": len(tensors),
                              "embodiment_tags": sorted(metadata) if metadata else []}
    if notes:
        result["notes"] = notes
    return result


def _replace_atomically(out: Path, write, folder: bool = False) -> None:
    """Write into a temporary sibling of ``out``, then rename it to ``out``: a failure leaves nothing behind."""
    if not out.parent.is_dir():
        raise GrootCheckpointError(f"{out}: its folder {out.parent} does not exist")
    if out.exists():
        raise GrootCheckpointError(f"{out} already exists; remove it or choose another path")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.")) if folder else \
        out.with_name(f".{out.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vla_zoo.groot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="check a reference checkpoint folder and summarise it (JSON)")
    inspect.add_argument("src", type=Path)
    imp = sub.add_parser("import", help="a reference checkpoint folder -> a vla-zoo checkpoint")
    imp.add_argument("src", type=Path)
    imp.add_argument("out", type=Path)
    imp.add_argument("--embodiment", action="append", default=[], metavar="TAG[=SLOT]",
                     help="an embodiment tag of metadata.json to import (default: all), with its slot for a tag "
                          "outside the released table (e.g. new_embodiment, my_robot=30); repeatable")
    imp.add_argument("--tokenizer", type=Path, default=None,
                     help="the LM's tokenizer folder (a download of Qwen/Qwen3-1.7B for N1.5, "
                          "HuggingFaceTB/SmolLM2-1.7B-Instruct for N1); default: the offline test tokenizer")
    imp.add_argument("--eagle-config", type=Path, default=None,
                     help="the Eagle VLM's config.json (default: the released N1 / N1.5 one of config.json's model_type)")
    imp.add_argument("--modality", type=Path, default=None,
                     help="the training dataset's meta/modality.json: its key order lays out the flat state / action")
    imp.add_argument("--normalization", default="min_max", choices=["min_max", "q01_q99", "mean_std"],
                     help="how the policy normalises state and actions with metadata.json's statistics "
                          "(GR00T's default: min_max)")
    imp.add_argument("--recipe", type=Path, default=None,
                     help="also write the model part of a recipe that rebuilds this checkpoint (init_from set)")
    exp = sub.add_parser("export", help="a vla-zoo checkpoint -> a reference checkpoint folder")
    exp.add_argument("ckpt", type=Path)
    exp.add_argument("out", type=Path)
    exp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="cast the tensors (default: keep each one's dtype, as imported or trained)")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            result = inspect_checkpoint(args.src)
        elif args.command == "import":
            result = import_checkpoint(args.src, args.out, args.embodiment, eagle_config_path=args.eagle_config,
                                       tokenizer=args.tokenizer, modality=args.modality,
                                       normalization=args.normalization, recipe=args.recipe)
        else:
            result = export_checkpoint(args.ckpt, args.out, DTYPES.get(args.dtype))
    except GrootCheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0
