"""Reading and writing Isaac-GR00T checkpoint folders (``config.json`` + safetensors), data only.

A released folder (``nvidia/GR00T-N1-2B``, ``nvidia/GR00T-N1.5-3B``) holds ``config.json`` and either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json`` (``{"weight_map": {key: shard}}``).
Keys start with ``backbone.`` or ``action_head.``. Only safetensors are read (never pickles), so nothing loaded
runs code; every problem is a ``GrootCheckpointError`` naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MODEL_TYPES = ("gr00t_n1", "gr00t_n1_5")
LAYOUT = f"{CONFIG} and {SINGLE} (or {INDEX} with its shards), as in a download of nvidia/GR00T-N1.5-3B"


class GrootCheckpointError(ValueError):
    """A folder that is not a readable Isaac-GR00T checkpoint; the message names the file, the key and the fix."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GrootCheckpointError(f"{path}: cannot read it as JSON ({err})") from err


def read_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder, checked for ``model_type`` and ``action_head_cfg``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GrootCheckpointError(f"{folder}: not a folder; give the Isaac-GR00T checkpoint folder holding {LAYOUT}")
    path = folder / CONFIG
    if not path.is_file():
        raise GrootCheckpointError(f"{folder} is not an Isaac-GR00T checkpoint: {CONFIG} is missing (expected {LAYOUT})")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise GrootCheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise GrootCheckpointError(
            f"{path}: key 'model_type' is {model_type!r}; this importer reads {list(MODEL_TYPES)} "
            "(Isaac-GR00T N1 / N1.5 checkpoints)"
        )
    if not isinstance(config.get("action_head_cfg"), dict):
        raise GrootCheckpointError(f"{path}: key 'action_head_cfg' is missing or not an object")
    return config


def tensor_index(folder: str | Path) -> dict[str, Path]:
    """Every tensor key of the checkpoint -> the safetensors file that holds it (shards checked to exist)."""
    folder = Path(folder)
    index, single = folder / INDEX, folder / SINGLE
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise GrootCheckpointError(f"{index}: key 'weight_map' is missing or empty")
        for key, shard in weight_map.items():
            if not (folder / shard).is_file():
                raise GrootCheckpointError(
                    f"{index}: shard {shard!r} (holding key {key!r}) is missing from {folder}; download every shard "
                    "the index lists"
                )
        return {key: folder / shard for key, shard in weight_map.items()}
    if single.is_file():
        return {key: single for key in _keys(single)}
    raise GrootCheckpointError(f"{folder} is not an Isaac-GR00T checkpoint: neither {SINGLE} nor {INDEX} is there "
                               f"(expected {LAYOUT})")


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (OSError, SafetensorError) as err:
        raise GrootCheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def read_tensors(folder: str | Path, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """The tensors whose key starts with ``prefix`` (prefix removed), and each one's file (for error messages)."""
    where = {k: p for k, p in tensor_index(folder).items() if k.startswith(prefix)}
    if not where:
        raise GrootCheckpointError(f"{folder}: no tensor key starts with {prefix!r}; is this a GR00T checkpoint?")
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(set(where.values())):
        wanted = [k for k, p in where.items() if p == path]
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                for key in wanted:
                    if key not in present:
                        raise GrootCheckpointError(f"{path}: key {key!r} is listed by {INDEX} but not stored in it")
                    tensors[key[len(prefix):]] = f.get_tensor(key)
        except (OSError, SafetensorError) as err:
            raise GrootCheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    return tensors, {k[len(prefix):]: p for k, p in where.items()}


def write_checkpoint(folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and one ``model.safetensors`` (tensors made contiguous, none shared)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(folder / SINGLE))
    (folder / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
