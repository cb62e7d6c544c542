"""WebDataset shards: one sample per anchor step, the same members for every source, plus per-source sidecars.

A source directory holds ``shard-000000.tar``, ... and four sidecars:

- ``index.json``: per shard its sample count, size in bytes and sha256;
- ``stats.json``: raw-unit statistics of state and actions per dimension (``normalization.compute_stats``);
- ``modality.json``: the embodiment's named state/action dimensions (``Modality.to_dict``);
- ``source.json``: name, embodiment, has_action, fps, views, horizon, image size, episode and sample counts.

Sample ``ep000012_t0034`` (keys contain no dots) of a source with views ``scene`` and ``wrist`` has the members::

    scene_t.jpg  scene_th.jpg  wrist_t.jpg  wrist_th.jpg   frames at t and at min(t + H, T - 1), JPEG
    state.npy        float32 [S]     raw state at t (zeros for actionless sources)
    actions.npy      float32 [H, A]  raw actions a_t .. a_{t+H-1}, zeros past the episode end (and if actionless)
    action_pad.npy   bool [H]        True on steps past the episode end
    privileged.npy   float32 [P]     (only in sources written with ``Episode.privileged``) simulator-only state at t,
                     e.g. object and goal positions: an auxiliary training target, never a policy input
    instruction.txt  the task instruction
    meta.json        source, embodiment, episode, t, t_future, length, fps, has_action, has_state,
                     episode_metadata

Member names are lower case because WebDataset lower-cases suffixes when it groups a sample's members.

Every step of every episode is an anchor, so ``read_episodes`` can rebuild the episodes (frames up to JPEG loss).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from datamodules.episode import Episode, Modality
from datamodules.normalization import compute_stats

SHARD_PATTERN = "shard-%06d.tar"
SIDECARS = ("index.json", "stats.json", "modality.json", "source.json")
ERROR_KINDS = (
    "truncated_tar", "undecodable_image", "missing_member", "wrong_shape", "non_finite", "duplicate_key",
    "duplicate_member",
)
_NAME = re.compile(r"^[a-z0-9_\-]+$")


class SampleError(Exception):
    """A sample that cannot be used; ``kind`` is one of ``ERROR_KINDS``."""

    def __init__(self, kind: str, message: str, key: str | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.key, self.url = kind, key, url

    def __str__(self) -> str:
        where = ":".join(x for x in (self.url, self.key) if x)
        return f"{where}: {self.kind}: {self.args[0]}" if where else f"{self.kind}: {self.args[0]}"


def sample_key(episode: int, t: int) -> str:
    return f"ep{episode:06d}_t{t:04d}"


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"episode metadata value of type {type(x).__name__} is not JSON-serialisable")


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{kind} name {name!r} may only contain lower-case letters, digits, '_' and '-' (no dots: WebDataset "
                         "splits member names at the first dot)")


def encode_episode(
    episode: Episode, index: int, *, source: str, horizon: int, views: list[str], state_dim: int, action_dim: int,
    jpeg_quality: int,
) -> Iterator[dict[str, Any]]:
    """The WebDataset samples (member name -> bytes) of one episode, one per anchor step."""
    T = episode.length
    jpegs = {v: [encode_jpeg(f, jpeg_quality) for f in episode.frames[v]] for v in views}
    state = episode.state.astype(np.float32) if episode.state is not None else np.zeros((T, state_dim), np.float32)
    actions = episode.actions.astype(np.float32) if episode.has_action else np.zeros((T, action_dim), np.float32)
    padded = np.concatenate([actions, np.zeros((horizon, action_dim), np.float32)])  # [T + H, A]
    for t in range(T):
        t_future = min(t + horizon, T - 1)
        sample: dict[str, Any] = {"__key__": sample_key(index, t)}
        for v in views:
            sample[f"{v}_t.jpg"] = jpegs[v][t]
            sample[f"{v}_th.jpg"] = jpegs[v][t_future]
        sample["state.npy"] = _npy(state[t])
        sample["actions.npy"] = _npy(padded[t : t + horizon])
        sample["action_pad.npy"] = _npy(np.arange(t, t + horizon) >= T)
        if episode.privileged is not None:
            sample["privileged.npy"] = _npy(episode.privileged[t].astype(np.float32))
        sample["instruction.txt"] = episode.instruction.encode("utf-8")
        meta = {
            "source": source, "embodiment": episode.embodiment, "episode": index, "t": t, "t_future": t_future,
            "length": T, "fps": episode.fps, "has_action": episode.has_action,
            "has_state": episode.state is not None, "episode_metadata": episode.metadata,
        }
        sample["meta.json"] = json.dumps(meta, default=_json_default).encode("utf-8")
        yield sample


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class EncodedEpisode:
    """One episode already turned into its samples (``encode_for_source``), without its frames: what
    ``write_source`` needs of it. Worker processes encode episodes in parallel and hand these to one writer."""

    index: int  # the episode's number in its source (sample keys and ``meta.json`` carry it)
    props: dict[str, Any]  # embodiment, views, image_size, fps, has_action, privileged_dim: equal across a source
    samples: list[dict[str, Any]]  # member name -> bytes, one per anchor step
    state: np.ndarray | None
    actions: np.ndarray | None
    privileged: np.ndarray | None


def default_modality(episode: Episode) -> Modality:
    """Made-up names ``state_0``, ``action_0``, ... for an episode's dims (none at all for actionless video)."""
    s_dim = episode.state.shape[1] if episode.state is not None else 0
    a_dim = episode.actions.shape[1] if episode.actions is not None else 0
    return Modality([f"state_{i}" for i in range(s_dim)], [f"action_{i}" for i in range(a_dim)])


def encode_for_source(
    episode: Episode, index: int, *, source: str, horizon: int, modality: Modality, jpeg_quality: int = 90
) -> EncodedEpisode:
    """Check one episode against ``modality`` and encode its samples (the part of ``write_source`` that depends on
    this episode alone, so it can run in any process)."""
    views = list(episode.frames)
    for v in views:
        _check_name("view", v)
    props = {
        "embodiment": episode.embodiment, "views": views, "image_size": list(episode.frames[views[0]].shape[1:3]),
        "fps": float(episode.fps), "has_action": episode.has_action,
        "privileged_dim": 0 if episode.privileged is None else int(episode.privileged.shape[1]),
    }
    if any(f.shape[1:3] != tuple(props["image_size"]) for f in episode.frames.values()):
        raise ValueError(f"source {source!r}: episode {index} views differ in image size; resize them first")
    for key, arr, dim in (("state", episode.state, modality.state_dim),
                          ("actions", episode.actions, modality.action_dim)):
        if arr is not None and arr.shape[1] != dim:
            raise ValueError(f"source {source!r}: episode {index} {key} has {arr.shape[1]} dims but the modality "
                             f"names {dim}")
        if arr is not None and not np.isfinite(arr).all():
            raise ValueError(f"source {source!r}: episode {index} {key} contains NaN or inf")
    if episode.privileged is not None and not np.isfinite(episode.privileged).all():
        raise ValueError(f"source {source!r}: episode {index} privileged contains NaN or inf")
    samples = list(encode_episode(episode, index, source=source, horizon=horizon, views=views,
                                  state_dim=modality.state_dim, action_dim=modality.action_dim,
                                  jpeg_quality=jpeg_quality))
    return EncodedEpisode(index, props, samples, episode.state, episode.actions, episode.privileged)


def write_source(
    episodes: Iterable[Episode | EncodedEpisode],
    out_dir: str | os.PathLike,
    *,
    source: str,
    horizon: int = 16,
    modality: Modality | None = None,
    jpeg_quality: int = 90,
    samples_per_shard: int = 1000,
    extra_metadata: dict | None = None,
) -> dict:
    """Write ``episodes`` as shards plus sidecars into ``out_dir`` (created; existing shards are replaced).

    All episodes must share embodiment, views, image size, fps and whether they have actions. ``modality`` names
    the state/action dimensions; without it names ``state_0``, ``action_0``, ... are made up (or no dims at all for
    actionless video). Episodes may come already encoded (``encode_for_source`` with the same ``source``,
    ``horizon``, ``modality`` and ``jpeg_quality``, numbered 0, 1, ... in order): the shards are the same bytes.
    Returns the ``source.json`` dict.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()

    first: dict[str, Any] | None = None
    states, actions, privileged, shards = [], [], [], []
    writer: wds.TarWriter | None = None
    shard_path: Path | None = None
    in_shard = num_samples = num_episodes = 0

    def close_shard() -> None:
        writer.close()
        shards.append({"file": shard_path.name, "samples": in_shard, "bytes": shard_path.stat().st_size,
                       "sha256": _sha256(shard_path)})

    for index, ep in enumerate(episodes):
        if modality is None:
            if isinstance(ep, EncodedEpisode):
                raise ValueError(f"source {source!r}: encoded episodes need the `modality` they were encoded with")
            modality = default_modality(ep)
        if isinstance(ep, EncodedEpisode):
            if ep.index != index:
                raise ValueError(f"source {source!r}: encoded episode {ep.index} arrived at position {index}; "
                                 "hand encoded episodes over in order")
        else:
            ep = encode_for_source(ep, index, source=source, horizon=horizon, modality=modality,
                                   jpeg_quality=jpeg_quality)
        if first is None:
            first = ep.props
        for name, value in ep.props.items():
            if value != first[name]:
                raise ValueError(f"source {source!r}: episode {index} has {name}={value!r} but episode 0 has "
                                 f"{first[name]!r}; write episodes that differ into separate sources")
        if ep.state is not None:
            states.append(ep.state)
        if ep.privileged is not None:
            privileged.append(ep.privileged)
        if ep.actions is not None:
            actions.append(ep.actions)
        for sample in ep.samples:
            if writer is None or in_shard >= samples_per_shard:
                if writer is not None:
                    close_shard()
                shard_path = out / (SHARD_PATTERN % len(shards))
                # Fixed mtime so that identical data gives byte-identical shards (and checksums).
                writer, in_shard = wds.TarWriter(str(shard_path), encoder=False, mtime=0), 0
            writer.write(sample)
            in_shard += 1
            num_samples += 1
        num_episodes += 1
    if first is None:
        raise ValueError(f"source {source!r}: no episodes to write")
    close_shard()

    stats = {
        "state": compute_stats(np.concatenate(states)) if states and modality.state_dim else None,
        "actions": compute_stats(np.concatenate(actions)) if actions and modality.action_dim else None,
        **({"privileged": compute_stats(np.concatenate(privileged))} if privileged else {}),
    }
    meta = {
        "name": source, **first, "horizon": horizon, "state_dim": modality.state_dim,
        "action_dim": modality.action_dim, "episodes": num_episodes, "samples": num_samples,
        "jpeg_quality": jpeg_quality, "shard_pattern": SHARD_PATTERN, **(extra_metadata or {}),
    }
    sidecars = {"index.json": {"shards": shards}, "stats.json": stats, "modality.json": modality.to_dict(),
                "source.json": meta}
    for name, content in sidecars.items():
        (out / name).write_text(json.dumps(content, indent=1, default=_json_default))
    return meta


# --------------------------------------------------------------------------------------------------------------
# Reading


# Where shards can live: a local directory or glob, or anything webdataset's opener (``gopen``) reads by scheme:
# ``file:``, ``pipe:CMD``, ``http(s)://``, ``gs://``, ... A URL ending in "/" is a source directory (its shards are
# the files listed in its index.json); any other URL is a shard URL or brace pattern
# (``http://host/robot/shard-{000000..000009}.tar``) whose sidecars lie beside its shards: the same URL with its
# last ``*.tar`` name replaced by the sidecar's (for ``pipe:curl -s URL/shard-...tar`` the command reads
# ``URL/index.json``).
_URL = re.compile(r"^[a-z][a-z0-9+.-]+:")
_TAR_NAME = re.compile(r"[^/\s]+\.tar(?!.*\.tar)")
_SAFE_FILE = re.compile(r"[A-Za-z0-9_.-]+\.tar")


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` is read through webdataset's opener (a scheme such as ``http:``, ``file:``, ``pipe:``)."""
    return isinstance(location, str) and _URL.match(location) is not None and not os.path.exists(location)


def tar_name(url: str) -> str:
    """The shard file name inside a shard URL or pipe command (``shard-000003.tar``)."""
    match = _TAR_NAME.search(url)
    if match is None:
        raise ValueError(f"{url!r} names no *.tar shard; give shard URLs (a brace pattern is fine) or a directory "
                         "URL ending in '/'")
    return match.group(0)


def sidecar_location(location: str | os.PathLike, name: str) -> str:
    """Where the sidecar ``name`` of the source at ``location`` (directory, directory URL or shard URL) lies."""
    location = os.fspath(location)
    if not is_url(location):
        return str(Path(location) / name)
    if location.endswith("/"):
        return location + name
    match = _TAR_NAME.search(location)
    return location[: match.start()] + name + location[match.end():] if match else location.rstrip("/") + "/" + name


def open_stream(url: str):
    """A binary stream of a local file or of any URL webdataset reads (``webdataset.gopen``)."""
    return wds.gopen(url, "rb") if is_url(url) else open(url, "rb")


def _read_text(location: str) -> str:
    if not is_url(location):
        return Path(location).read_text()
    try:
        with open_stream(location) as stream:
            return stream.read().decode("utf-8")
    except Exception as e:  # curl's or the pipe's non-zero exit surfaces as an exception on read or close
        raise FileNotFoundError(f"{location} could not be read ({type(e).__name__}: {e})") from None


def load_sidecars(source: str | os.PathLike) -> dict[str, Any]:
    """The four sidecars of a source, keyed by name without ``.json``; names the missing file. ``source`` is a
    local directory, a directory URL ending in "/", or one of its shard URLs (see ``is_url``)."""
    out = {}
    for name in SIDECARS:
        location = sidecar_location(source, name)
        if not is_url(location) and not Path(location).is_file():
            raise FileNotFoundError(f"{location} is missing: {source} is not a source written by "
                                    "datamodules.shards.write_source")
        out[name[:-5]] = json.loads(_read_text(location))
    return out


def source_shards(source: str | os.PathLike, pattern: str | None = None) -> list[tuple[str, int]]:
    """``(url, samples in index.json)`` of a source's shards, in order: all of them (a local directory or a
    directory URL) or those of ``pattern`` (a local glob, a shard URL or brace pattern) that index.json lists.
    Raises naming the shards that index.json does not list."""
    source = os.fspath(source)
    by_file = {entry["file"]: entry["samples"] for entry in load_sidecars(source)["index"]["shards"]}
    if pattern is None:
        unsafe = [f for f in by_file if not _SAFE_FILE.fullmatch(f)]
        if unsafe:  # the names become parts of URLs (and of pipe commands): nothing read may inject into them
            raise ValueError(f"{sidecar_location(source, 'index.json')}: shard names {unsafe} are not plain file names")
        urls = [sidecar_location(source, f) for f in by_file]
    elif is_url(pattern):
        urls = wds.shardlists.expand_urls(pattern)
    else:
        urls = sorted(glob.glob(pattern))
    names = [tar_name(u) if is_url(u) else Path(u).name for u in urls]
    unlisted = [u for u, n in zip(urls, names) if n not in by_file]
    if unlisted:
        raise ValueError(f"shards {unlisted} are not listed in {sidecar_location(source, 'index.json')}; rewrite the "
                         "source")
    return [(u, by_file[n]) for u, n in zip(urls, names)]


def decode_image(data: bytes, shape: tuple[int, int] | None, member: str, key: str | None = None) -> np.ndarray:
    """JPEG bytes -> uint8 [3, h, w]; raises ``SampleError`` on undecodable data or a wrong size.

    torchvision's libjpeg-turbo decoder is 2.5-4x faster than PIL on our 16-64 px frames (PIL spends most of its
    time opening the file), and returns channels-first, the layout of the batch.
    """
    try:
        arr = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB).numpy()
    except Exception as e:  # RuntimeError from libjpeg, ValueError on empty data
        raise SampleError("undecodable_image", f"{member}: {type(e).__name__}: {e}", key) from None
    if shape is not None and arr.shape[1:] != tuple(shape):
        raise SampleError("wrong_shape", f"{member}: image is {arr.shape[1:]}, expected {tuple(shape)}", key)
    return arr


def _load_npy(sample: dict[str, Any], member: str, shape: tuple[int, ...], key: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(sample[member]), allow_pickle=False)
    except Exception as e:
        raise SampleError("wrong_shape", f"{member}: not a readable .npy ({e})", key) from None
    if arr.shape != shape:
        raise SampleError("wrong_shape", f"{member}: shape {arr.shape}, expected {shape}", key)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise SampleError("non_finite", f"{member}: contains NaN or inf", key)
    return arr


def decode_sample(sample: dict[str, Any], source_meta: dict[str, Any], decode_images: bool = True) -> dict[str, Any]:
    """A raw WebDataset sample (member -> bytes) -> arrays, checked against the source's ``source.json``.

    Returns ``images`` uint8 [2, V, 3, h, w] (views in ``source_meta["views"]`` order; omitted when
    ``decode_images`` is False), ``state`` [S], ``actions`` [H, A], ``action_pad`` [H], ``instruction``, ``meta``,
    and ``privileged`` [P] where the source has it.
    Raises ``SampleError`` naming the member and what is wrong.
    """
    key = sample.get("__key__")
    views, H = source_meta["views"], source_meta["horizon"]
    members = [f"{v}_{s}.jpg" for v in views for s in ("t", "th")]  # group_by_keys lower-cases the suffixes
    members += ["state.npy", "actions.npy", "action_pad.npy", "instruction.txt", "meta.json"]
    privileged_dim = source_meta.get("privileged_dim", 0)  # sources written before the field have none
    if privileged_dim:
        members.append("privileged.npy")
    missing = [m for m in members if m not in sample]
    if missing:
        raise SampleError("missing_member", f"missing {', '.join(missing)}", key)
    out: dict[str, Any] = {}
    if decode_images:
        size = source_meta["image_size"]
        out["images"] = np.stack([
            np.stack([decode_image(sample[f"{v}_{s}.jpg"], size, f"{v}_{s}.jpg", key) for v in views])
            for s in ("t", "th")
        ])
    out["state"] = _load_npy(sample, "state.npy", (source_meta["state_dim"],), key)
    out["actions"] = _load_npy(sample, "actions.npy", (H, source_meta["action_dim"]), key)
    out["action_pad"] = _load_npy(sample, "action_pad.npy", (H,), key).astype(bool)
    if privileged_dim:
        out["privileged"] = _load_npy(sample, "privileged.npy", (privileged_dim,), key)
    try:
        out["instruction"] = sample["instruction.txt"].decode("utf-8")
        out["meta"] = json.loads(sample["meta.json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError("wrong_shape", f"instruction.txt/meta.json unreadable: {e}", key) from None
    return out


def _members_once(files: Iterator[dict[str, Any]], repeated: set[str]) -> Iterator[dict[str, Any]]:
    """Tar members minus the repeats of a member within one sample, whose keys go into ``repeated``.

    ``group_by_keys`` raises on a repeated member and then keeps the first copy in the sample; which copy is right is
    unknown, so the reader drops the whole sample instead, under its own error kind.
    """
    key, members = None, set()
    for f in files:
        prefix, suffix = wds.tariterators.base_plus_ext(f["fname"]) if "fname" in f else (None, None)
        if prefix is not None:
            if prefix != key:
                key, members = prefix, set()
            if suffix.lower() in members:  # lower case, as group_by_keys groups them
                repeated.add(prefix)
                continue
            members.add(suffix.lower())
        yield f


def iter_raw_samples(url: str, handler=None, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard file in order; errors while reading the tar go to ``handler(exn) -> bool``
    (continue?) or are raised as ``SampleError`` when no handler is given.

    Python's tarfile ends a stream cut inside a header without complaint, so a shard that yields fewer than the
    ``expected`` samples (its count in ``index.json``) is reported as truncated too. A sample whose key came earlier
    in the shard (``duplicate_key``) or that holds a member twice (``duplicate_member``) is reported and skipped, so
    no sample is read twice in one pass over a shard.
    """

    def wrap(exn: Exception) -> bool:
        err = exn if isinstance(exn, SampleError) else SampleError("truncated_tar", f"{type(exn).__name__}: {exn}", url=url)
        if handler is None:
            raise err from None
        return handler(err)

    count = 0
    seen: set[str] = set()
    repeated: set[str] = set()
    try:
        with open_stream(url) as stream:
            files = wds.tariterators.tar_file_iterator(stream, handler=wrap)
            files = _members_once(({**f, "__url__": url} for f in files), repeated)
            for sample in wds.tariterators.group_by_keys(files, handler=wrap):
                count += 1
                key = sample["__key__"]
                err = None
                if key in seen:
                    err = SampleError("duplicate_key", "the key came earlier in this shard; the repeat is skipped",
                                      key, url)
                elif key in repeated:
                    err = SampleError("duplicate_member", "a member appears twice in the sample; the sample is "
                                      "skipped (which copy is right is unknown)", key, url)
                seen.add(key)
                repeated.discard(key)
                if err is None:
                    yield sample
                elif not wrap(err):
                    return
    except SampleError:
        raise
    except Exception as exn:  # tarfile raises outside webdataset's per-member try (e.g. a cut header); the shard ends
        wrap(exn)
        return
    if expected is not None and count < expected:
        wrap(SampleError("truncated_tar", f"shard ended after {count} of the {expected} samples in index.json", url=url))


def shard_files(source_dir: str | os.PathLike) -> dict[str, int]:
    """Shard path (or URL) -> sample count, from ``index.json``."""
    return dict(source_shards(source_dir))


def read_episodes(source_dir: str | os.PathLike) -> Iterator[Episode]:
    """Rebuild the episodes of a source from its shards, in writing order (frames are JPEG-decoded)."""
    side = load_sidecars(source_dir)
    meta_src = side["source"]
    views = meta_src["views"]
    current: list[dict[str, Any]] = []

    def build(samples: list[dict[str, Any]]) -> Episode:
        m = samples[0]["meta"]
        if [s["meta"]["t"] for s in samples] != list(range(m["length"])):
            raise ValueError(f"{source_dir}: episode {m['episode']} is incomplete or out of order in the shards")
        has_action = m["has_action"]
        return Episode(
            frames={v: np.stack([s["images"][0, i].transpose(1, 2, 0) for s in samples]) for i, v in enumerate(views)},
            instruction=samples[0]["instruction"],
            embodiment=m["embodiment"],
            fps=m["fps"],
            state=np.stack([s["state"] for s in samples]) if m["has_state"] else None,
            actions=np.stack([s["actions"][0] for s in samples]) if has_action else None,
            metadata=m["episode_metadata"],
            privileged=np.stack([s["privileged"] for s in samples]) if "privileged" in samples[0] else None,
        )

    for url, expected in shard_files(source_dir).items():
        for raw in iter_raw_samples(url, expected=expected):
            s = decode_sample(raw, meta_src)
            if current and s["meta"]["episode"] != current[0]["meta"]["episode"]:
                yield build(current)
                current = []
            current.append(s)
    if current:
        yield build(current)
