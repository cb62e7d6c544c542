"""Small synthetic episodes and sources for the datamodule tests (the tabletop world is not needed here)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds

from datamodules.episode import Episode, Modality
from datamodules.shards import iter_raw_samples, write_source


def smooth_frames(rng: np.random.Generator, length: int, size: int) -> np.ndarray:
    """uint8 [T, size, size, 3] colour gradients that drift over time: JPEG keeps them within a few grey levels."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, 3)
    t = np.arange(length)[:, None, None, None] / max(length, 1)
    img = 127 + 100 * np.sin(np.pi * (xx[None, ..., None] + yy[None, ..., None]) / 2 + 2 * np.pi * t + phase)
    return img.astype(np.uint8)


def make_episodes(
    num: int, *, seed: int = 0, state_dim: int = 3, action_dim: int = 2, length: tuple[int, int] = (6, 14),
    views: tuple[str, ...] = ("scene", "wrist"), size: int = 16, embodiment: str = "arm", has_action: bool = True,
    action_offset: float = 0.0, action_scale: float = 1.0,
) -> list[Episode]:
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(num):
        T = int(rng.integers(length[0], length[1] + 1))
        episodes.append(Episode(
            frames={v: smooth_frames(rng, T, size) for v in views},
            instruction=f"task {i % 3}",
            embodiment=embodiment,
            fps=10.0,
            state=rng.normal(size=(T, state_dim)).astype(np.float32) if has_action else None,
            actions=(action_offset + action_scale * rng.normal(size=(T, action_dim))).astype(np.float32)
            if has_action else None,
            metadata={"index": i, "seed": seed},
        ))
    return episodes


def make_source(
    out_dir: Path, name: str, num_episodes: int = 6, *, horizon: int = 4, samples_per_shard: int = 20,
    modality: Modality | None = None, **episode_kwargs,
) -> Path:
    write_source(make_episodes(num_episodes, **episode_kwargs), out_dir, source=name, horizon=horizon,
                 modality=modality, samples_per_shard=samples_per_shard)
    return Path(out_dir)


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


FAULTS = ("truncated_tar", "undecodable_image", "missing_member", "wrong_shape", "non_finite", "duplicate_key",
          "duplicate_member")


def _write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of ``(name, data)`` members in order, repeats included (``TarWriter`` takes one dict per sample)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def corrupt_shard(path: Path, fault: str, every: bool = False) -> str | None:
    """Inject ``fault`` into the middle sample of a shard (or into every sample); returns the damaged key.

    ``duplicate_key`` writes a copy of the sample over the shard's last sample (so the count still matches
    index.json; with ``every``, a copy of each at the end); ``duplicate_member`` adds a second, different
    ``state.npy`` to it."""
    path = Path(path)
    if fault == "truncated_tar":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
        return None
    samples = list(iter_raw_samples(str(path)))
    if fault in ("duplicate_key", "duplicate_member"):
        targets = range(len(samples)) if every else [len(samples) // 2]
        members = [[(f"{s['__key__']}.{k}", v) for k, v in s.items() if not k.startswith("__")] for s in samples]
        for i in targets:
            if fault == "duplicate_key" and not every:
                members[-1] = list(members[i])
            elif fault == "duplicate_key":
                members.append(list(members[i]))
            else:
                members[i].append((f"{samples[i]['__key__']}.state.npy", _npy(np.zeros(3, np.float32))))
        _write_members(path, [m for sample in members for m in sample])
        return samples[targets[0]]["__key__"]
    targets = range(len(samples)) if every else [len(samples) // 2]
    for i in targets:
        s = samples[i]
        if fault == "undecodable_image":
            s["scene_t.jpg"] = b"\xff\xd8 not a jpeg"
        elif fault == "missing_member":
            del s["state.npy"]
        elif fault == "wrong_shape":
            s["state.npy"] = _npy(np.zeros(7, np.float32))
        elif fault == "non_finite":
            a = np.load(io.BytesIO(s["actions.npy"]))
            a[0, 0] = np.nan
            s["actions.npy"] = _npy(a)
        else:
            raise ValueError(fault)
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
    return samples[targets[0]]["__key__"]
