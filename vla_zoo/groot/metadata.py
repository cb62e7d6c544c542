"""Isaac-GR00T's ``experiment_cfg/metadata.json`` and a dataset's ``modality.json`` <-> our data spec.

``metadata.json`` holds, per embodiment tag, the raw-unit statistics of every state and action key
(``statistics.{state,action}.KEY.{min,max,mean,std,q01,q99}``, each a list over the key's dimensions) and the
modality layout (``modalities.{video,state,action}.KEY``: a camera's resolution ``[w, h]``, channels and fps; a
state / action key's ``shape``, ``absolute``, ``rotation_type``, ``continuous``). The reference concatenates the
keys into the flat state / action vectors the head sees; we do the same, in the order of ``modality.json`` when
given (as ``python -m datamodules.lerobot`` does for the dataset) and of ``metadata.json`` otherwise, so that:

- the per-key statistics, concatenated, are our ``Normalizer``'s statistics for the embodiment (GR00T's default
  ``min_max`` maps [min, max] to [-1, 1] as ours does; ``q01_q99`` and ``mean_std`` read the same fields);
- the keys become our ``Modality``'s groups (``KEY -> (start, end)`` in the flat vector);
- the embodiment tag names the embodiment and picks its action-head slot (``tags.py``).

The GR00T layout (tag, ``modalities``) is kept in the modality entry under ``"groot"``, so that ``export`` writes
``metadata.json`` back as it was read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from datamodules.episode import Modality
from datamodules.normalization import MODES, Normalizer
from vla_zoo.groot.checkpoint import GrootCheckpointError, _read_json
from vla_zoo.groot.tags import EMBODIMENT_TAG_SLOTS

METADATA = "experiment_cfg/metadata.json"
STAT_FIELDS = ("min", "max", "mean", "std", "q01", "q99")
#: GR00T's modality names -> ours in the normaliser's statistics.
KINDS = {"state": "state", "action": "actions"}


def read_metadata(folder: str | Path) -> dict[str, Any] | None:
    """``experiment_cfg/metadata.json`` of a checkpoint folder, or None when the folder has none."""
    path = Path(folder) / METADATA
    if not path.is_file():
        return None
    metadata = _read_json(path)
    if not isinstance(metadata, dict) or not metadata:
        raise GrootCheckpointError(f"{path}: expected an object of embodiment tags, got {type(metadata).__name__}")
    return metadata


def view_name(key: str) -> str:
    """A GR00T video key as a view name (WebDataset keys hold no dots), as ``datamodules.lerobot`` names views."""
    return key.replace(".", "_")


def _numbers(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        raise GrootCheckpointError(f"{where}: expected a non-empty list of finite numbers, got {value!r}")
    return value


def _order(entry: dict[str, Any], kind: str, modality_json: dict[str, Any] | None, where: str,
           modality_path: Path | None) -> list[str]:
    stats = entry["statistics"].get(kind)
    if not isinstance(stats, dict) or not stats:
        raise GrootCheckpointError(f"{where}: key 'statistics.{kind}' is missing or empty")
    if modality_json is None:
        layout = entry.get("modalities", {}).get(kind) or {}
        return list(layout) if set(layout) == set(stats) else list(stats)
    keys = list(modality_json.get(kind) or {})
    if set(keys) != set(stats):
        raise GrootCheckpointError(
            f"{modality_path}: key {kind!r} lists {sorted(keys)} but {where}.statistics.{kind} has {sorted(stats)}; "
            "give the modality.json of the dataset this checkpoint was trained on")
    return keys


def _flat(entry: dict[str, Any], kind: str, order: list[str], where: str, modality_json: dict[str, Any] | None,
          modality_path: Path | None) -> tuple[dict[str, list[float]], dict[str, tuple[int, int]], list[str]]:
    """Per-key statistics -> flat statistics, groups and per-dimension names, every length checked."""
    flat: dict[str, list[float]] = {f: [] for f in STAT_FIELDS}
    groups: dict[str, tuple[int, int]] = {}
    names: list[str] = []
    for key in order:
        stat_where = f"{where}.statistics.{kind}.{key}"
        stats = entry["statistics"][kind][key]
        if not isinstance(stats, dict):
            raise GrootCheckpointError(f"{stat_where}: expected an object with {list(STAT_FIELDS)}")
        values = {}
        for f in STAT_FIELDS:
            if f not in stats:
                raise GrootCheckpointError(f"{stat_where}: key {f!r} is missing (GR00T statistics hold {list(STAT_FIELDS)})")
            values[f] = _numbers(stats[f], f"{stat_where}.{f}")
        dim = len(values["min"])
        if any(len(v) != dim for v in values.values()):
            raise GrootCheckpointError(f"{stat_where}: the statistics have different lengths "
                                       f"{ {f: len(v) for f, v in values.items()} }")
        shape = (entry.get("modalities", {}).get(kind) or {}).get(key, {}).get("shape")
        if shape is not None and math.prod(shape) != dim:
            raise GrootCheckpointError(f"{where}.modalities.{kind}.{key}: key 'shape' is {shape} but its statistics "
                                       f"have {dim} values")
        if modality_json is not None:
            spec = modality_json[kind][key]
            if not isinstance(spec, dict) or spec.get("end", 0) - spec.get("start", 0) != dim:
                raise GrootCheckpointError(f"{modality_path}: key '{kind}.{key}' spans [start, end) = "
                                           f"[{spec.get('start') if isinstance(spec, dict) else None}, "
                                           f"{spec.get('end') if isinstance(spec, dict) else None}) but {stat_where} "
                                           f"has {dim} dimensions")
        for f in STAT_FIELDS:
            flat[f] += values[f]
        groups[key] = (len(names), len(names) + dim)
        names += [f"{key}_{i}" for i in range(dim)] if dim > 1 else [key]
    return flat, groups, names


def data_spec_from_metadata(metadata: dict[str, Any], path: str | Path, slots: dict[str, int], *, horizon: int,
                            max_state_dim: int, max_action_dim: int, image_size: int, normalization: str = "min_max",
                            modality_json: dict[str, Any] | None = None, modality_path: str | Path | None = None
                            ) -> dict[str, Any]:
    """Our data spec (``VLAPolicy.data_spec``) for the embodiments ``slots`` (tag -> action-head slot) of a
    ``metadata.json``; the views and image size are the first embodiment's (all must have the same cameras)."""
    if normalization not in MODES:
        raise GrootCheckpointError(f"normalization {normalization!r} is not one of {MODES}")
    modality_path = Path(modality_path) if modality_path is not None else None
    if modality_json is not None and len(slots) != 1:
        raise GrootCheckpointError(f"{modality_path}: a modality.json describes one embodiment, but {sorted(slots)} "
                                   "are imported; choose one with --embodiment TAG")
    embodiments: dict[str, Any] = {}
    views: list[str] | None = None
    size = [image_size, image_size]
    for tag, slot in slots.items():
        where = f"{path}: key {tag!r}"
        entry = metadata.get(tag)
        if not isinstance(entry, dict) or not isinstance(entry.get("statistics"), dict):
            raise GrootCheckpointError(f"{where} is missing or has no 'statistics' (tags here: {sorted(metadata)})")
        layout: dict[str, Any] = {}
        for kind, ours in KINDS.items():
            order = _order(entry, kind, modality_json, where, modality_path)
            layout[ours] = _flat(entry, kind, order, where, modality_json, modality_path)
        state_dim, action_dim = len(layout["state"][2]), len(layout["actions"][2])
        for dim, limit, key in ((state_dim, max_state_dim, "state"), (action_dim, max_action_dim, "action")):
            if dim > limit:
                raise GrootCheckpointError(f"{where}: its {key} has {dim} dimensions but the action head takes at "
                                           f"most {limit} (config.json)")
        video = entry.get("modalities", {}).get("video") or {}
        cameras = [view_name(k) for k in (modality_json.get("video", {}) if modality_json is not None else video)]
        if views is None:
            views = cameras
            first = next(iter(video.values()), {})
            if isinstance(first.get("resolution"), list) and len(first["resolution"]) == 2:
                size = [int(first["resolution"][1]), int(first["resolution"][0])]  # [w, h] -> our [h, w]
        elif cameras != views:
            raise GrootCheckpointError(f"{where}: cameras {cameras} differ from {views} of the first embodiment; a "
                                       "vla-zoo policy has one set of views: import one embodiment with --embodiment TAG")
        modality = Modality(layout["state"][2], layout["actions"][2], layout["state"][1], layout["actions"][1])
        normalizer = Normalizer({ours: layout[ours][0] for ours in KINDS.values()}, mode=normalization)
        embodiments[tag] = {
            "id": slot, "state_dim": state_dim, "action_dim": action_dim, "has_action": action_dim > 0,
            "normalizer": normalizer.to_dict(),
            # the GR00T layout as read, so that export writes the entry back unchanged
            "modality": {**modality.to_dict(), "groot": {
                "tag": tag, "modalities": entry.get("modalities", {}),
                "extra": {k: v for k, v in entry.items() if k not in ("statistics", "modalities")}}},
        }
    if not views:
        raise GrootCheckpointError(f"{path}: no camera in modalities.video of {sorted(slots)}; a policy needs a view")
    return {"embodiments": embodiments, "views": views, "image_size": size, "horizon": horizon,
            "max_state_dim": max_state_dim, "max_action_dim": max_action_dim, "sources": [], "source_targets": None}


def metadata_from_data_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``metadata.json`` of a data spec's embodiments with actions, and notes on what could not be known (a
    checkpoint trained by vla-zoo on its own shards has no camera fps)."""
    slot_tags = {slot: tag for tag, slot in EMBODIMENT_TAG_SLOTS.items()}
    metadata: dict[str, Any] = {}
    notes: list[str] = []
    for name, e in spec["embodiments"].items():
        if not e.get("has_action", True):
            continue  # actionless video (latent / IDM pseudo-labels): nothing GR00T could normalise
        modality = e.get("modality") or {}
        groot = modality.get("groot") or {}
        tag = groot.get("tag") or (name if name in EMBODIMENT_TAG_SLOTS else slot_tags.get(e["id"], name))
        stats = Normalizer.from_dict(e["normalizer"]).stats
        statistics: dict[str, Any] = {}
        layout: dict[str, Any] = {}
        for kind, ours in KINDS.items():
            dim = e["state_dim"] if ours == "state" else e["action_dim"]
            groups = modality.get(f"{'state' if ours == 'state' else 'action'}_groups") or {kind: (0, dim)}
            statistics[kind] = {key: {f: list(stats[ours][f][a:b]) for f in STAT_FIELDS if f in stats[ours]}
                                for key, (a, b) in groups.items()}
            layout[kind] = {key: {"absolute": True, "rotation_type": None, "shape": [b - a], "continuous": True}
                            for key, (a, b) in groups.items()}
        modalities = groot.get("modalities")
        if not modalities:
            h, w = spec["image_size"]
            modalities = {"video": {v: {"resolution": [w, h], "channels": 3} for v in spec["views"]}, **layout}
            notes.append(f"{tag}: the camera fps is unknown to vla-zoo; metadata.json lists none for {spec['views']}")
        extra = groot.get("extra", {"embodiment_tag": tag})
        metadata[tag] = {"statistics": statistics, "modalities": modalities, **extra}
    return metadata, notes
