"""Import LeRobot datasets (codebase v2.0 / v2.1 and v3.0 layouts, optional GR00T ``meta/modality.json``).

``load_lerobot_episodes`` reads a local LeRobot dataset folder (or a Hub ``repo_id`` through LeRobot's own dataset
class, with the ``lerobot`` extra) into ``datamodules.episode.Episode`` objects; ``convert_lerobot`` streams them into
our shards (``datamodules.shards.write_source``, which also writes the statistics); ``python -m datamodules.lerobot
SRC OUT --embodiment NAME`` does the same from the shell. The other way, ``export_lerobot`` (``--export``) writes a
shard source as a LeRobot v3.0 folder.

Layouts (facts from LeRobot's dataset code):
- v2.x: one parquet per episode at ``info["data_path"]`` (``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}
  .parquet``, chunk = episode_index // ``chunks_size``), one mp4 per episode and camera at ``info["video_path"]``,
  ``meta/episodes.jsonl`` (episode_index, tasks, length), ``meta/tasks.jsonl`` (task_index, task).
- v3.0: many episodes per data / video file (``data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet``,
  ``videos/{video_key}/chunk-.../file-....mp4``), ``meta/episodes/chunk-*/file-*.parquet`` with one row per episode
  (``data/chunk_index``, ``data/file_index``, ``dataset_from_index``, ``dataset_to_index``,
  ``videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp}``), ``meta/tasks.parquet``. Parquet
  timestamps stay episode-relative, so a frame lives at ``from_timestamp + timestamp`` in the shared mp4.
- Cameras are features of dtype ``video`` (mp4) or ``image`` (HF ``Image`` struct ``{bytes, path}`` in the parquet,
  or PNG files at ``images/{image_key}/episode-{episode_index:06d}/frame-{frame_index:06d}.png``).

Consistency checks, per episode; an episode failing one is dropped and its reason recorded in the
``ConversionReport`` (never silently):
- parquet rows == ``length`` in the episodes metadata (and == ``dataset_to_index - dataset_from_index`` in v3.0);
- ``episode_index`` column constant, ``frame_index`` == 0..T-1;
- consecutive timestamps 1/fps apart within ``tolerance_s``;
- every video holds exactly T frames in the episode's window, and each parquet timestamp has a decoded frame
  within ``tolerance_s`` (frames are matched by presentation time, never by counting from the file start);
- state and actions finite; every image present.
``tolerance_s`` defaults to a quarter frame (0.25 / fps): strict enough that a one-frame shift or a dropped frame
is caught, and under half a frame so the nearest-frame match is unambiguous, yet loose enough for the millisecond
rounding of mp4 time bases and recorded clocks (LeRobot's own loader uses 1e-4 s).

A malformed dataset (missing ``meta/info.json``, unknown ``codebase_version``, missing data or video file, missing
column or metadata key) raises ``LeRobotFormatError`` naming the file and key, before any episode is decoded.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from datamodules.episode import Episode, Modality

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
STATE_KEY = "observation.state"
ACTION_KEY = "action"
CAMERA_PREFIX = "observation.images."
DEFAULT_IMAGE_PATH = "images/{image_key}/episode-{episode_index:06d}/frame-{frame_index:06d}.png"
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index")


class LeRobotFormatError(ValueError):
    """The dataset folder does not follow the LeRobot layout; the message names the file and the key."""


class _Inconsistent(Exception):
    """One episode disagrees with itself (video vs parquet vs metadata): drop it, keep the rest."""


@dataclass
class ConversionReport:
    """What a LeRobot import found. ``converted`` / ``dropped`` fill in as the episode iterator is consumed."""

    root: str
    codebase_version: str
    fps: float
    views: dict[str, str]  # our view name -> LeRobot feature key
    modality: Modality | None
    episodes_total: int
    converted: list[int] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # {"episode_index", "reason"}
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "codebase_version": self.codebase_version,
            "fps": self.fps,
            "views": dict(self.views),
            "modality": self.modality.to_dict() if self.modality else None,
            "episodes_total": self.episodes_total,
            "episodes_converted": len(self.converted),
            "episodes_dropped": len(self.dropped),
            "dropped": list(self.dropped),
            "complete": self.complete,
        }


@dataclass
class _VideoSegment:
    root: Path
    rel: str  # path inside the dataset folder, as the reports show it
    from_ts: float  # where the episode starts in the file (v3.0); 0 for v2.x
    to_ts: float | None  # where it ends (v3.0); None = end of file (v2.x)

    @property
    def path(self) -> Path:
        return self.root / self.rel


@dataclass
class _EpisodeSource:
    index: int
    length: int
    tasks: list[str]
    data_path: Path
    videos: dict[str, _VideoSegment]  # LeRobot video key -> segment
    row_range: tuple[int, int] | None = None  # v3.0 dataset_from_index / dataset_to_index


@dataclass
class _Columns:
    """Which parquet columns make the flat state / action vectors and the instruction."""

    state: list[tuple[str, int, int]]  # (column, start, end) slices, concatenated in order
    action: list[tuple[str, int, int]]
    task: str | None


def _fail(path: Path | str, key: str, what: str) -> LeRobotFormatError:
    return LeRobotFormatError(f"{path}: {key}: {what}")


def _read_json(path: Path, hint: str = "") -> Any:
    if not path.is_file():
        raise _fail(path, "(file)", "missing" + hint)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise _fail(path, "(file)", f"not valid JSON ({e})") from e


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise _fail(path, "(file)", "missing (v2.x datasets list their episodes and tasks in meta/*.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise _fail(path, f"line {n}", f"not valid JSON ({e})") from e
    return rows


def _require(d: dict[str, Any], key: str, path: Path, where: str = "") -> Any:
    if key not in d:
        raise _fail(path, where + key, "missing")
    return d[key]


def _view_name(key: str) -> str:
    # WebDataset keys may not contain dots: "observation.images.top" -> "top", "observation.image" -> "observation_image"
    return key.removeprefix(CAMERA_PREFIX).replace(".", "_")


def _feature_names(info: dict[str, Any], key: str, dim: int) -> list[str] | None:
    """Per-dimension names from ``info.json`` (a list, or v2.0's ``{"motors": [...]}``), if they fit."""
    names = info["features"][key].get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if isinstance(names, list) and len(names) == dim and all(isinstance(n, str) for n in names):
        return names
    return None


def _feature_dim(info: dict[str, Any], key: str, info_path: Path) -> int:
    shape = _require(info["features"][key], "shape", info_path, f"features.{key}.")
    if len(shape) != 1:
        raise _fail(info_path, f"features.{key}.shape", f"expected a flat vector, got {shape}")
    return int(shape[0])


def _load_tasks(root: Path, version: str) -> dict[int, str]:
    if version.startswith("v2"):
        path = root / "meta/tasks.jsonl"
        return {int(_require(r, "task_index", path)): str(_require(r, "task", path)) for r in _read_jsonl(path)}
    path = root / "meta/tasks.parquet"
    if not path.is_file():
        raise _fail(path, "(file)", "missing (v3.0 datasets list their tasks in meta/tasks.parquet)")
    table = pq.read_table(path)
    if "task_index" not in table.column_names:
        raise _fail(path, "task_index", "missing column")
    # LeRobot writes the task strings as the pandas index, stored as a column named "task" or "__index_level_0__".
    text_columns = [n for n in table.column_names if pa.types.is_string(table.schema.field(n).type)
                    or pa.types.is_large_string(table.schema.field(n).type)]
    if "task" in text_columns:
        text_columns = ["task"]
    if len(text_columns) != 1:
        raise _fail(path, "task", f"expected one string column with the task texts, found {text_columns}")
    return dict(zip(table["task_index"].to_pylist(), table[text_columns[0]].to_pylist()))


def _v2_sources(root: Path, info: dict[str, Any], video_keys: list[str]) -> list[_EpisodeSource]:
    info_path, path = root / "meta/info.json", root / "meta/episodes.jsonl"
    data_tpl = _require(info, "data_path", info_path)
    video_tpl = _require(info, "video_path", info_path) if video_keys else ""
    chunks_size = int(info.get("chunks_size", 1000))
    sources = []
    for row in _read_jsonl(path):
        idx = int(_require(row, "episode_index", path))
        chunk = idx // chunks_size
        try:
            data_path = root / data_tpl.format(episode_chunk=chunk, episode_index=idx)
            videos = {k: _VideoSegment(root, video_tpl.format(episode_chunk=chunk, video_key=k, episode_index=idx),
                                       0.0, None) for k in video_keys}
        except (KeyError, IndexError, ValueError) as e:
            raise _fail(info_path, "data_path/video_path", f"template does not format ({e!r})") from e
        sources.append(_EpisodeSource(idx, int(_require(row, "length", path)), list(row.get("tasks", [])),
                                      data_path, videos))
    return sources


def _v3_sources(root: Path, info: dict[str, Any], video_keys: list[str]) -> list[_EpisodeSource]:
    info_path = root / "meta/info.json"
    data_tpl = _require(info, "data_path", info_path)
    video_tpl = _require(info, "video_path", info_path) if video_keys else ""
    files = sorted((root / "meta/episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise _fail(root / "meta/episodes", "chunk-*/file-*.parquet", "no episodes metadata files")
    needed = ["episode_index", "length", "data/chunk_index", "data/file_index",
              "dataset_from_index", "dataset_to_index"]
    for k in video_keys:
        needed += [f"videos/{k}/{f}" for f in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
    sources = []
    for path in files:
        names = pq.read_schema(path).names
        for key in needed:
            if key not in names:
                raise _fail(path, key, "missing column in the episodes metadata")
        rows = pq.read_table(path, columns=needed + (["tasks"] if "tasks" in names else [])).to_pylist()
        for row in rows:
            try:
                data_path = root / data_tpl.format(chunk_index=row["data/chunk_index"],
                                                   file_index=row["data/file_index"])
                videos = {
                    k: _VideoSegment(
                        root, video_tpl.format(video_key=k, chunk_index=row[f"videos/{k}/chunk_index"],
                                                file_index=row[f"videos/{k}/file_index"]),
                        float(row[f"videos/{k}/from_timestamp"]), float(row[f"videos/{k}/to_timestamp"]))
                    for k in video_keys
                }
            except (KeyError, IndexError, ValueError) as e:
                raise _fail(info_path, "data_path/video_path", f"template does not format ({e!r})") from e
            sources.append(_EpisodeSource(
                int(row["episode_index"]), int(row["length"]), list(row.get("tasks") or []), data_path, videos,
                (int(row["dataset_from_index"]), int(row["dataset_to_index"]))))
    return sorted(sources, key=lambda s: s.index)


def _columns_and_modality(
    info: dict[str, Any], info_path: Path, modality_json: dict[str, Any] | None, modality_path: Path | None
) -> tuple[_Columns, Modality | None]:
    features = info["features"]
    if modality_json is None:
        parts, names = {}, {}
        for kind, key in (("state", STATE_KEY), ("action", ACTION_KEY)):
            if key in features:
                dim = _feature_dim(info, key, info_path)
                parts[kind] = [(key, 0, dim)]
                names[kind] = _feature_names(info, key, dim) or [f"{kind}_{i}" for i in range(dim)]
        task = "task_index" if "task_index" in features else None
        columns = _Columns(parts.get("state", []), parts.get("action", []), task)
        modality = Modality(names.get("state", []), names.get("action", [])) if parts else None
        return columns, modality

    parts, names, groups = {}, {}, {}
    for kind, default_key in (("state", STATE_KEY), ("action", ACTION_KEY)):
        parts[kind], names[kind], groups[kind] = [], [], {}
        for group, spec in modality_json.get(kind, {}).items():
            where = f"{kind}.{group}."
            key = spec.get("original_key", default_key)
            if key not in features:
                raise _fail(modality_path, where + "original_key", f"{key!r} is not a feature in {info_path}")
            dim = _feature_dim(info, key, info_path)
            start, end = int(_require(spec, "start", modality_path, where)), int(_require(spec, "end", modality_path, where))
            if not 0 <= start < end <= dim:
                raise _fail(modality_path, where + "start/end", f"[{start}, {end}) does not fit {key!r} of size {dim}")
            feature_names = _feature_names(info, key, dim)
            offset = len(names[kind])
            names[kind] += feature_names[start:end] if feature_names else [f"{group}_{i}" for i in range(end - start)]
            groups[kind][group] = (offset, offset + end - start)
            parts[kind].append((key, start, end))
    # GR00T keeps per-frame task indices in `annotation.<source>.<type>` columns; the task description one is the
    # instruction. Without it, LeRobot's own `task_index` column is.
    task = "task_index" if "task_index" in features else None
    for name in modality_json.get("annotation", {}):
        if name.endswith("task_description"):
            task = "annotation." + name
    modality = Modality(names["state"], names["action"], groups["state"], groups["action"])
    return _Columns(parts["state"], parts["action"], task), modality


def _camera_views(
    info: dict[str, Any], modality_json: dict[str, Any] | None, modality_path: Path | None, views: list[str] | None
) -> dict[str, str]:
    features = info["features"]
    cameras = [k for k, f in features.items() if f.get("dtype") in ("video", "image")]
    if modality_json is not None and "video" in modality_json:
        available = {}
        for name, spec in modality_json["video"].items():
            key = spec.get("original_key", CAMERA_PREFIX + name)
            if key not in cameras:
                raise _fail(modality_path, f"video.{name}.original_key", f"{key!r} is not a video/image feature "
                            f"of meta/info.json (cameras: {cameras})")
            available[_view_name(name)] = key
    else:
        available = {_view_name(k): k for k in cameras}
    if not available:
        raise LeRobotFormatError("meta/info.json: features: no camera (dtype 'video' or 'image'); vla-zoo episodes "
                                 "need at least one view")
    if views is None:
        return available
    unknown = [v for v in views if v not in available]
    if unknown:
        raise ValueError(f"views {unknown} are not in this dataset; available views: {sorted(available)}")
    return {v: available[v] for v in views}


def _check_data_files(sources: list[_EpisodeSource], required: list[str], video_keys: list[str]) -> None:
    seen: set[Path] = set()
    for src in sources:
        if src.data_path not in seen:
            seen.add(src.data_path)
            if not src.data_path.is_file():
                raise _fail(src.data_path, f"episode {src.index}", "data file missing")
            try:
                names = pq.read_schema(src.data_path).names
            except pa.ArrowException as e:
                raise _fail(src.data_path, f"episode {src.index}", f"not a readable parquet file ({e})") from e
            for key in required:
                if key not in names:
                    raise _fail(src.data_path, key, "missing column")
        for k in video_keys:
            if not src.videos[k].path.is_file():
                raise _fail(src.videos[k].path, f"episode {src.index} video {k}", "video file missing")


class _TableCache:
    """Keeps the last data file in memory: v3.0 packs consecutive episodes into the same file."""

    def __init__(self, columns: list[str]) -> None:
        self.columns, self.path, self.table = columns, None, None

    def rows(self, src: _EpisodeSource) -> pa.Table:
        if src.data_path != self.path:
            names = pq.read_schema(src.data_path).names
            self.table = pq.read_table(src.data_path, columns=[c for c in self.columns if c in names])
            self.path = src.data_path
        if src.row_range is None:
            return self.table
        return self.table.filter(pc.equal(self.table["episode_index"], src.index))


def _vectors(table: pa.Table, parts: list[tuple[str, int, int]], path: Path) -> np.ndarray:
    pieces = []
    for key, start, end in parts:
        column = table[key].combine_chunks()
        if not (pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type)
                or pa.types.is_large_list(column.type)):
            raise _fail(path, key, f"expected a list column, got {column.type}")
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != lengths.max() or lengths[0] < end):
            raise _Inconsistent(f"{key} rows have lengths {sorted(set(lengths.tolist()))}, need >= {end}")
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        pieces.append(flat.reshape(len(column), -1)[:, start:end])
    return np.concatenate(pieces, axis=1)


def _resized(image: np.ndarray | Image.Image, size: int | None) -> np.ndarray:
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BOX)
    return np.asarray(image, dtype=np.uint8)


def _decode_video(seg: _VideoSegment, timestamps: np.ndarray, tol: float, size: int | None) -> np.ndarray:
    """Frames of one episode from an mp4, matched to the parquet timestamps by presentation time."""
    start = seg.from_ts - tol
    end = None if seg.to_ts is None else seg.to_ts - tol
    times, images = [], []
    try:
        with av.open(str(seg.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if start > 0:  # v3.0: jump to the keyframe before the episode instead of decoding the file from 0
                container.seek(int(start / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                t = frame.time
                if t is None:
                    raise _Inconsistent(f"video {seg.rel} has a frame without a presentation timestamp")
                if t < start:
                    continue
                if end is not None and t >= end:
                    break
                times.append(t)
                if size is None:
                    images.append(frame.to_ndarray(format="rgb24"))
                else:  # swscale's area filter: a proper downscale, and the full-size RGB frame is never built
                    images.append(frame.to_ndarray(format="rgb24", width=size, height=size, interpolation="AREA"))
    except av.error.FFmpegError as e:
        raise _Inconsistent(f"cannot decode video {seg.rel}: {e}") from e
    if len(times) != len(timestamps):
        raise _Inconsistent(f"video {seg.rel} holds {len(times)} frames in [{seg.from_ts:.4f}, "
                            f"{'end' if seg.to_ts is None else f'{seg.to_ts:.4f}'}) s, parquet has "
                            f"{len(timestamps)} rows")
    query = seg.from_ts + timestamps
    times = np.asarray(times)
    nearest = np.abs(times[None, :] - query[:, None]).argmin(axis=1)
    error = np.abs(times[nearest] - query)
    if error.max() > tol:
        i = int(error.argmax())
        raise _Inconsistent(f"video {seg.rel}: no frame within {tol:.4f} s of timestamp {query[i]:.4f} "
                            f"(row {i}; nearest frame at {times[nearest[i]]:.4f} s)")
    return np.stack(images)[nearest]


def _read_images(table: pa.Table, key: str, root: Path, src: _EpisodeSource, size: int | None) -> np.ndarray:
    frames = table["frame_index"].to_pylist()
    if key in table.column_names:
        column = table[key].combine_chunks()
        if not pa.types.is_struct(column.type) or column.type.get_field_index("bytes") < 0:
            raise _fail(src.data_path, key, f"expected an image struct {{bytes, path}}, got {column.type}")
        blobs = column.field("bytes").to_pylist()
        paths = (column.field("path").to_pylist() if column.type.get_field_index("path") >= 0
                 else [None] * len(blobs))
    else:
        blobs = [None] * len(frames)
        paths = [DEFAULT_IMAGE_PATH.format(image_key=key, episode_index=src.index, frame_index=f) for f in frames]
    images = []
    for frame, blob, rel in zip(frames, blobs, paths):
        if blob is not None:
            image = Image.open(io.BytesIO(blob))
        elif rel is not None and (root / rel).is_file():
            image = Image.open(root / rel)
        else:
            raise _Inconsistent(f"image {key} of frame {frame} is neither in {src.data_path.name} nor at {rel}")
        images.append(_resized(image, size))
    return np.stack(images)


def _load_episode(src: _EpisodeSource, table: pa.Table, *, root: Path, fps: float, tol: float,
                  views: dict[str, str], video_keys: set[str], columns: _Columns, tasks: dict[int, str],
                  embodiment: str, image_size: int | None) -> Episode:
    t = table.num_rows
    if t == 0:
        raise _Inconsistent("no rows in the parquet")
    if t != src.length:
        raise _Inconsistent(f"parquet has {t} rows, episodes metadata says length {src.length}")
    if src.row_range is not None and src.row_range[1] - src.row_range[0] != t:
        raise _Inconsistent(f"parquet has {t} rows, dataset_from_index/dataset_to_index span "
                            f"{src.row_range[1] - src.row_range[0]}")
    episode_index = table["episode_index"].to_numpy()
    if (episode_index != src.index).any():
        raise _Inconsistent(f"episode_index column holds {sorted(set(episode_index.tolist()))}")
    frame_index = table["frame_index"].to_numpy()
    if not np.array_equal(frame_index, np.arange(t)):
        bad = int(np.flatnonzero(frame_index != np.arange(t))[0])
        raise _Inconsistent(f"frame_index not contiguous from 0: row {bad} holds {frame_index[bad]}")
    timestamps = table["timestamp"].to_numpy().astype(np.float64)
    steps = np.diff(timestamps)
    off = ~(np.abs(steps - 1.0 / fps) <= tol)  # also catches NaN
    if off.any() or not np.isfinite(timestamps[0]):
        bad = int(np.flatnonzero(off)[0]) if off.any() else 0
        raise _Inconsistent(f"timestamps not 1/fps = {1.0 / fps:.4f} s apart (within {tol:.4f} s): row {bad + 1} "
                            f"is at {timestamps[min(bad + 1, t - 1)]:.4f} s, row {bad} at {timestamps[bad]:.4f} s")

    state = _vectors(table, columns.state, src.data_path) if columns.state else None
    actions = _vectors(table, columns.action, src.data_path) if columns.action else None
    for name, arr in (("state", state), ("actions", actions)):
        if arr is not None and not np.isfinite(arr).all():
            raise _Inconsistent(f"non-finite values in {name} (row {int(np.flatnonzero(~np.isfinite(arr))[0]) // arr.shape[1]})")

    task_index = None
    if columns.task is not None:
        task_index = int(table[columns.task][0].as_py())
        if task_index not in tasks:
            raise _Inconsistent(f"{columns.task} = {task_index} is not in the tasks metadata")
        instruction = tasks[task_index]
    else:
        instruction = src.tasks[0] if src.tasks else ""

    frames = {}
    for view, key in views.items():
        if key in video_keys:
            frames[view] = _decode_video(src.videos[key], timestamps, tol, image_size)
        else:
            frames[view] = _read_images(table, key, root, src, image_size)
    return Episode(frames=frames, instruction=instruction, embodiment=embodiment, fps=fps, state=state,
                   actions=actions, metadata={"episode_index": src.index, "task_index": task_index})


def load_lerobot_episodes(
    root: str | Path,
    *,
    embodiment: str,
    views: list[str] | None = None,
    image_size: int | None = 64,
    modality_path: str | Path | None = None,
    tolerance_s: float | None = None,
) -> tuple[Iterator[Episode], ConversionReport]:
    """Read a LeRobot dataset (v2.0, v2.1 or v3.0) as a stream of ``Episode``: a local folder, or a Hub ``repo_id``
    fetched through LeRobot's own dataset class (``lerobot_root``).

    ``views`` picks and orders cameras by our names (``observation.images.top`` -> ``top``, or the GR00T
    ``modality.json`` ``video`` names); ``image_size`` resizes every frame to a square (None keeps the native size);
    ``modality_path`` defaults to ``root/meta/modality.json`` when that exists; ``tolerance_s`` defaults to
    0.25 / fps. The metadata is validated now (``LeRobotFormatError`` on a malformed dataset); episodes are decoded
    lazily, and the report's ``converted`` / ``dropped`` lists are final once the iterator is exhausted.
    """
    root = lerobot_root(root)
    info_path = root / "meta/info.json"
    info = _read_json(info_path, "; a LeRobot dataset folder holds meta/info.json")
    version = _require(info, "codebase_version", info_path)
    if version not in SUPPORTED_VERSIONS:
        raise _fail(info_path, "codebase_version", f"{version!r} is not supported (supported: {SUPPORTED_VERSIONS})")
    fps = float(_require(info, "fps", info_path))
    features = _require(info, "features", info_path)
    for key in INDEX_COLUMNS:
        if key not in features:
            raise _fail(info_path, f"features.{key}", "missing")

    if modality_path is None and (root / "meta/modality.json").is_file():
        modality_path = root / "meta/modality.json"
    modality_path = Path(modality_path) if modality_path is not None else None
    modality_json = _read_json(modality_path) if modality_path is not None else None
    columns, modality = _columns_and_modality(info, info_path, modality_json, modality_path)
    view_keys = _camera_views(info, modality_json, modality_path, views)
    video_keys = [k for k in dict.fromkeys(view_keys.values()) if features[k].get("dtype") == "video"]

    tasks = _load_tasks(root, version)
    sources = (_v2_sources if version.startswith("v2") else _v3_sources)(root, info, video_keys)
    required = list(INDEX_COLUMNS) + [k for k, _, _ in columns.state + columns.action]
    required += [columns.task] if columns.task else []
    _check_data_files(sources, list(dict.fromkeys(required)), video_keys)

    report = ConversionReport(str(root), version, fps, view_keys, modality, len(sources))
    tol = 0.25 / fps if tolerance_s is None else float(tolerance_s)
    cache = _TableCache(list(dict.fromkeys(required + [k for k in view_keys.values() if k not in video_keys])))

    def episodes() -> Iterator[Episode]:
        for src in sources:
            try:
                episode = _load_episode(
                    src, cache.rows(src), root=root, fps=fps, tol=tol, views=view_keys, video_keys=set(video_keys),
                    columns=columns, tasks=tasks, embodiment=embodiment, image_size=image_size)
            except _Inconsistent as e:
                report.dropped.append({"episode_index": src.index, "reason": str(e)})
                continue
            report.converted.append(src.index)
            yield episode
        report.complete = True

    return episodes(), report


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _lerobot_dataset_class() -> Any:
    """LeRobot's ``LeRobotDataset`` (its module moved between releases), or None without the ``lerobot`` extra."""
    for module in ("lerobot.datasets.lerobot_dataset", "lerobot.common.datasets.lerobot_dataset"):
        try:
            return importlib.import_module(module).LeRobotDataset
        except ImportError:
            continue
    return None


def lerobot_root(root_or_repo_id: str | Path) -> Path:
    """The local folder of a LeRobot dataset: ``root_or_repo_id`` itself, or for a Hub ``repo_id`` (``user/name``,
    not a local folder) the folder that LeRobot's own ``LeRobotDataset`` downloads it into (its cache). Needs the
    ``lerobot`` extra and the network (or LeRobot's cache); everything after the download is our reader."""
    path = Path(root_or_repo_id)
    if path.is_dir() or not _REPO_ID.fullmatch(str(root_or_repo_id)):
        return path
    dataset_class = _lerobot_dataset_class()
    if dataset_class is None:
        raise LeRobotFormatError(
            f"{root_or_repo_id}: not a local folder; to read a Hub dataset by repo_id install LeRobot "
            "(pip install -e '.[lerobot]'), or give the folder of a downloaded dataset")
    return Path(dataset_class(str(root_or_repo_id)).root)


def convert_lerobot(
    root: str | Path,
    out_dir: str | Path,
    *,
    source: str | None = None,
    embodiment: str,
    horizon: int = 16,
    views: list[str] | None = None,
    image_size: int | None = 64,
    modality_path: str | Path | None = None,
    tolerance_s: float | None = None,
    jpeg_quality: int = 90,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert a LeRobot dataset folder into our shards with statistics; returns ``{"source", "report"}``.

    ``source`` (the shard source's name) defaults to the folder name. Dropped episodes are listed in the returned
    report and in ``source.json`` (under ``lerobot``). ``progress`` draws a bar over the episodes.
    """
    root = Path(root)
    episodes, report = load_lerobot_episodes(root, embodiment=embodiment, views=views, image_size=image_size,
                                             modality_path=modality_path, tolerance_s=tolerance_s)
    from datamodules.progress import track
    from datamodules.shards import write_source  # the shard writer pulls in webdataset; keep `load_*` light

    episodes = track(episodes, f"convert {root.name}", total=report.episodes_total, unit="episode",
                     disable=not progress)
    stream = _nonempty(episodes, report)
    source_json = write_source(
        stream, out_dir, source=source or root.name, horizon=horizon, modality=report.modality,
        jpeg_quality=jpeg_quality, samples_per_shard=samples_per_shard,
        extra_metadata={"lerobot": {"root": str(root.resolve()), "codebase_version": report.codebase_version,
                                    "dropped": report.dropped}})
    return {"source": source_json, "report": report.to_dict()}


def _nonempty(episodes: Iterator[Episode], report: ConversionReport) -> Iterator[Episode]:
    yield from episodes
    if not report.converted:
        raise LeRobotFormatError(f"{report.root}: all {report.episodes_total} episodes were dropped as inconsistent: "
                                 f"{report.dropped}")


# --------------------------------------------------------------------------------------------------------------
# Export: our shards -> a LeRobot v3.0 folder

EXPORT_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def export_lerobot(
    source_dir: str | Path, out_root: str | Path, *, frames_per_file: int = 50_000, chunks_size: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a shard source (``datamodules.shards``) as a LeRobot v3.0 dataset folder; returns its ``info.json``.

    Episodes are rebuilt from the shards (``read_episodes``); cameras become ``image`` features (PNG in the parquet,
    so frames keep the values our shards decode to), state and actions ``observation.state`` / ``action`` with the
    modality's names, the instruction a task. Consecutive episodes share a data file up to ``frames_per_file`` rows,
    as LeRobot packs them. ``load_lerobot_episodes`` reads the folder back to the same arrays.
    """
    from datamodules.progress import track
    from datamodules.shards import load_sidecars, read_episodes

    side = load_sidecars(source_dir)
    meta, modality = side["source"], Modality.from_dict(side["modality"])
    fps, views = float(meta["fps"]), list(meta["views"])
    out = Path(out_root)
    if (out / "meta/info.json").exists():
        raise FileExistsError(f"{out} already holds a LeRobot dataset (meta/info.json); export into a new folder")
    height, width = meta["image_size"]
    features: dict[str, Any] = {
        f"{CAMERA_PREFIX}{v}": {"dtype": "image", "shape": [height, width, 3], "names": ["height", "width", "channels"]}
        for v in views
    }
    if meta["has_action"]:
        features[STATE_KEY] = {"dtype": "float32", "shape": [modality.state_dim], "names": modality.state_names}
        features[ACTION_KEY] = {"dtype": "float32", "shape": [modality.action_dim], "names": modality.action_names}
    for key in ("timestamp",):
        features[key] = {"dtype": "float32", "shape": [1], "names": None}
    for key in ("frame_index", "episode_index", "index", "task_index"):
        features[key] = {"dtype": "int64", "shape": [1], "names": None}

    tasks: dict[str, int] = {}
    episodes_meta: list[dict[str, Any]] = []
    pending: list[pa.Table] = []
    files = total = 0

    def flush() -> None:
        nonlocal files, pending
        if pending:
            path = out / EXPORT_DATA_PATH.format(chunk_index=files // chunks_size, file_index=files % chunks_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.concat_tables(pending), path)
            files, pending = files + 1, []

    episodes = track(read_episodes(source_dir), f"export {Path(source_dir).name}", total=meta["episodes"],
                     unit="episode", disable=not progress)
    for index, episode in enumerate(episodes):
        T = episode.length
        task = tasks.setdefault(episode.instruction, len(tasks))
        columns: dict[str, pa.Array] = {
            f"{CAMERA_PREFIX}{v}": pa.array([{"bytes": _png(f), "path": None} for f in episode.frames[v]],
                                            type=_IMAGE_STRUCT)
            for v in views
        }
        if meta["has_action"]:
            columns[STATE_KEY] = pa.array(list(episode.state.astype(np.float32)), type=pa.list_(pa.float32()))
            columns[ACTION_KEY] = pa.array(list(episode.actions.astype(np.float32)), type=pa.list_(pa.float32()))
        columns["timestamp"] = pa.array(np.arange(T, dtype=np.float32) / np.float32(fps))
        columns["frame_index"] = pa.array(np.arange(T, dtype=np.int64))
        columns["episode_index"] = pa.array(np.full(T, index, np.int64))
        columns["index"] = pa.array(np.arange(total, total + T, dtype=np.int64))
        columns["task_index"] = pa.array(np.full(T, task, np.int64))
        pending.append(pa.table(columns))
        episodes_meta.append({
            "episode_index": index, "tasks": [episode.instruction], "length": T,
            "data/chunk_index": files // chunks_size, "data/file_index": files % chunks_size,
            "dataset_from_index": total, "dataset_to_index": total + T,
        })
        total += T
        if sum(t.num_rows for t in pending) >= frames_per_file:
            flush()
    flush()
    if not episodes_meta:
        raise ValueError(f"{source_dir}: no episodes to export")

    (out / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episodes_meta), out / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task_index": list(tasks.values()), "task": list(tasks)}), out / "meta/tasks.parquet")
    stats = {key: {k: side["stats"][ours][k] for k in ("mean", "std", "min", "max")}
             for ours, key in (("state", STATE_KEY), ("actions", ACTION_KEY))
             if meta["has_action"] and side["stats"].get(ours)}
    (out / "meta/stats.json").write_text(json.dumps(stats, indent=1))
    info = {
        "codebase_version": "v3.0", "robot_type": meta["embodiment"], "fps": fps,
        "total_episodes": len(episodes_meta), "total_frames": total, "total_tasks": len(tasks),
        "chunks_size": chunks_size, "data_files_size_in_mb": 100, "video_files_size_in_mb": 500,
        "splits": {"train": f"0:{len(episodes_meta)}"}, "data_path": EXPORT_DATA_PATH, "video_path": None,
        "features": features,
    }
    (out / "meta/info.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.lerobot",
        description="Convert a LeRobot dataset folder (v2.0/v2.1/v3.0, optional GR00T meta/modality.json) into "
                    "vla-zoo shards; prints a JSON summary including dropped episodes.")
    parser.add_argument("src", help="LeRobot dataset folder (holds meta/info.json) or Hub repo_id (lerobot extra); "
                                    "with --export, a shard source")
    parser.add_argument("out", help="output folder for the shards (with --export, for the LeRobot v3.0 dataset)")
    parser.add_argument("--export", action="store_true", help="the other way: write shards SRC as LeRobot v3.0")
    parser.add_argument("--embodiment", help="embodiment name of the converted shards (required unless --export)")
    parser.add_argument("--source", default=None, help="source name (default: the SRC folder name)")
    parser.add_argument("--views", default=None, help="comma-separated views, e.g. top,wrist (default: all)")
    parser.add_argument("--image-size", type=int, default=64, help="square frame size; 0 keeps the native size")
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--modality", default=None, help="GR00T modality.json (default: SRC/meta/modality.json)")
    parser.add_argument("--tolerance-s", type=float, default=None, help="timestamp tolerance (default 0.25/fps)")
    args = parser.parse_args(argv)
    if not args.export and not args.embodiment:
        parser.error("--embodiment is required (the name the converted robot trains under)")
    try:
        if args.export:
            print(json.dumps(export_lerobot(args.src, args.out), indent=2))
            return 0
        result = convert_lerobot(
            args.src, args.out, source=args.source, embodiment=args.embodiment, horizon=args.horizon,
            views=args.views.split(",") if args.views else None, image_size=args.image_size or None,
            modality_path=args.modality, tolerance_s=args.tolerance_s)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # bad datasets and arguments: a message
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
