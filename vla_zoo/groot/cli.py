"""``python -m vla_zoo.groot``: Isaac-GR00T checkpoints in and out of vla-zoo.

    python -m vla_zoo.groot inspect SRC                     # what the folder holds, checked; JSON
    python -m vla_zoo.groot import SRC OUT.ckpt [--embodiment new_embodiment ...]
    python -m vla_zoo.groot export CKPT OUT_DIR             # a vla-zoo checkpoint's head -> the reference layout

``import`` converts the action head (every ``action_head.`` tensor, checked against ``config.json``) into a
checkpoint that a fit starts from: ``--model.init_args.init_from=OUT.ckpt`` with
``--model.init_args.init_from_parts=[action_head]`` and the matching ``recipes/groot/*.yaml``. ``export`` writes a
head (LoRA adapters merged) back as ``config.json`` + ``model.safetensors`` under the reference key names; importing
and exporting a checkpoint gives its head tensors back bit for bit. Bad input stops with a message naming the file
and the key, exit status 1, and nothing written.
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
from vla_zoo.groot.checkpoint import CONFIG, GrootCheckpointError, read_config, tensor_index, write_checkpoint
from vla_zoo.groot.head import PREFIX, head_kwargs, head_state_to_reference, load_groot_action_head, reference_config
from vla_zoo.groot.tags import embodiment_slot

#: Checkpoint key of what ``import`` read: source folder, model type, head arguments, embodiment tags -> slots.
IMPORT_KEY = "vla_zoo_groot"
#: Head arguments that change how it trains, not what it computes: dropped when a head is exported.
TRAINING_ONLY = ("gradient_checkpointing", "tune_projector", "tune_diffusion_model", "lora")


def inspect_checkpoint(src: str | Path) -> dict[str, Any]:
    """The checked summary of a reference checkpoint folder: model type, head arguments, tensor counts."""
    src = Path(src)
    config = read_config(src)
    kwargs = head_kwargs(config, src / CONFIG)
    keys = tensor_index(src)
    return {
        "model_type": config["model_type"],
        "action_head": kwargs,
        "tensors": {"action_head": sum(k.startswith(PREFIX) for k in keys),
                    "backbone": sum(k.startswith("backbone.") for k in keys), "other": sum(
                        not k.startswith((PREFIX, "backbone.")) for k in keys)},
    }


def import_checkpoint(src: str | Path, out: str | Path, embodiments: list[str] = ()) -> dict[str, Any]:
    """Write the head of reference folder ``src`` as a vla-zoo checkpoint ``out`` (``state_dict`` under
    ``action_head.``, plus ``vla_zoo_groot``); every check runs before anything is written."""
    src, out = Path(src), Path(out)
    config = read_config(src)
    kwargs = head_kwargs(config, src / CONFIG)
    slots = {tag.partition("=")[0]: embodiment_slot(tag, kwargs["num_embodiments"]) for tag in embodiments}
    head = load_groot_action_head(src)
    info = {"source": str(src), "model_type": config["model_type"], "action_head": kwargs, "embodiments": slots}
    payload = {"state_dict": {PREFIX + k: v for k, v in head.state_dict().items()}, IMPORT_KEY: info}
    _replace_atomically(out, lambda tmp: torch.save(payload, tmp))
    return info


def _head_arguments(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    if IMPORT_KEY in checkpoint:
        return dict(checkpoint[IMPORT_KEY]["action_head"])
    from vla_zoo.cli import CHECKPOINT_CONFIG_KEY

    if CHECKPOINT_CONFIG_KEY not in checkpoint:
        raise GrootCheckpointError(f"{path}: neither a `python -m vla_zoo.groot import` checkpoint nor one written by "
                                   "the vla-zoo CLI (no embedded recipe to rebuild its action head from)")
    head = yaml.safe_load(checkpoint[CHECKPOINT_CONFIG_KEY])["model"]["init_args"]["action_head"]
    if not head.get("class_path", "").endswith("FlowMatchingActionHead"):
        raise GrootCheckpointError(f"{path}: key model.init_args.action_head is {head.get('class_path')!r}; only a "
                                   "FlowMatchingActionHead has an Isaac-GR00T counterpart")
    return dict(head.get("init_args", {}))


def export_checkpoint(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the action head of vla-zoo checkpoint ``ckpt`` as a reference head folder ``out``."""
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_file():
        raise GrootCheckpointError(f"{ckpt}: no such checkpoint file")
    # our own checkpoint format (Lightning's), read as the project's other loaders read it
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    kwargs = _head_arguments(checkpoint, ckpt)
    lora = kwargs.get("lora")
    build = {**kwargs, "lora": LoRA(**lora) if isinstance(lora, dict) else lora}
    state = {k[len(PREFIX):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(PREFIX)}
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
    tensors = {PREFIX + k: v for k, v in head_state_to_reference(head).items()}
    _replace_atomically(out, lambda tmp: write_checkpoint(tmp, config, tensors), folder=True)
    return {"model_type": config["model_type"], "tensors": len(tensors)}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vla_zoo.groot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="check a reference checkpoint folder and summarise it (JSON)")
    inspect.add_argument("src", type=Path)
    imp = sub.add_parser("import", help="a reference checkpoint folder's action head -> a vla-zoo checkpoint")
    imp.add_argument("src", type=Path)
    imp.add_argument("out", type=Path)
    imp.add_argument("--embodiment", action="append", default=[], metavar="TAG[=SLOT]",
                     help="an embodiment tag to record with its slot (e.g. new_embodiment); repeatable")
    exp = sub.add_parser("export", help="a vla-zoo checkpoint's action head -> a reference checkpoint folder")
    exp.add_argument("ckpt", type=Path)
    exp.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            result = inspect_checkpoint(args.src)
        elif args.command == "import":
            result = import_checkpoint(args.src, args.out, args.embodiment)
        else:
            result = export_checkpoint(args.ckpt, args.out)
    except GrootCheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0
