"""The default data pyramid: every tier of the tabletop world written as a WebDataset source, cached on disk.

``TabletopPyramid(...).prepare()`` writes ``root/<tier>/`` (shards and sidecars, through
``datamodules.shards.write_source``) plus a ``READY.json`` marker holding the tier's config. A later ``prepare()``
skips every tier whose marker matches and regenerates the ones whose config (episode count, seed, image size,
wrist window, horizon, generator version) changed. A tier is written into a temporary folder, validated
(``datamodules.validate``, in a worker while the next tier is written) and renamed into place, so an interrupted run never leaves a half-written source behind a
marker. ``heldout`` adds held-out splits, ``root/heldout/<tier>/``: the same tier from a seed derived from the
pyramid's, so their scenes are new ones. ``preset`` picks the tier sizes (``PRESETS``): ``default`` for the main
recipe, ``large`` for the tier study (``benchmarks/pyramid_study.py``).

Generation is split into chunks of ``chunk_episodes`` episodes that worker processes render and encode; one writer
stores them in episode order. Episode ``i`` depends only on ``(seed, tier, i)`` (``tiers.generate_episodes``), so
the shards are the same bytes for any number of workers and any chunk size.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .embodiments import MODALITIES
from .tiers import TIERS, generate_episodes
from .world import WRIST_WINDOW

log = logging.getLogger(__name__)

# Bump when generation changes what a given config produces, so stale caches are rebuilt.
GENERATOR_VERSION = 1

DEFAULT_EPISODES: dict[str, int] = {"robot": 50, "robot_b": 50, "sim": 200, "human": 80, "neural": 80}
# preset -> (episodes per tier, held-out episodes per tier). `large` is the tier study's pyramid: the cheap tiers in
# the thousands, the `robot` tier kept at the scarce 50 demonstrations, held-out robot and sim scenes for validation.
PRESETS: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "default": (DEFAULT_EPISODES, {}),
    "large": ({"robot": 50, "robot_b": 500, "sim": 3000, "human": 1000, "neural": 1000}, {"robot": 20, "sim": 50}),
}
MARKER = "READY.json"
HELDOUT = "heldout"  # sub-folder of the held-out splits
HELDOUT_KEY = 0x48454C44  # mixed into the seed of held-out splits
CHUNK_EPISODES = 50  # episodes per worker task: small enough for steady progress, large enough to amortise a task
DECODE_EVERY = 25  # the check after writing decodes every 25th sample (reads all of them, checks all checksums)


def heldout_seed(seed: int) -> int:
    """Seed of a pyramid's held-out splits: hashed from its seed, so it is no other pyramid's plain seed either."""
    return int(np.random.SeedSequence([seed, HELDOUT_KEY]).generate_state(1, np.uint32)[0])


def _modality(tier: str):
    from datamodules.episode import Modality  # the data layer, imported where it is used (spawned workers too)

    spec = TIERS[tier]
    return Modality([], []) if spec.actionless else MODALITIES[spec.embodiment]


def _encode_chunk(tier: str, config: dict[str, Any], start: int, count: int) -> list:
    """Episodes ``start .. start + count - 1`` of a tier, rendered and encoded (``shards.EncodedEpisode``)."""
    from datamodules.shards import encode_for_source

    episodes = generate_episodes(tier, count, config["seed"], config["image_size"], start=start,
                                 wrist_window=config["wrist_window"])
    return [encode_for_source(ep, start + i, source=tier, horizon=config["horizon"], modality=_modality(tier))
            for i, ep in enumerate(episodes)]


class _Inline(Executor):
    """A one-process stand-in for the pool: each chunk is computed when submitted."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class _Chunks:
    """All chunk tasks of all tiers to build, in order, with at most ``window`` of them submitted ahead of the
    writer: workers go on to the next tier while the writer finishes one, and memory stays bounded."""

    def __init__(self, executor: Executor, jobs: list[tuple[str, dict[str, Any]]], chunk: int, window: int):
        self.executor, self.window = executor, window
        self.todo = deque((tier, config, start, min(chunk, config["episodes"] - start))
                          for tier, config in jobs for start in range(0, config["episodes"], chunk))
        self.running: deque[Future] = deque()

    def _fill(self) -> None:
        while self.todo and len(self.running) < self.window:
            self.running.append(self.executor.submit(_encode_chunk, *self.todo.popleft()))

    def next_chunk(self) -> list:
        self._fill()
        chunk = self.running.popleft().result()
        self._fill()
        return chunk


def _progress(tier: str, total: int, enabled: bool):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=f"tabletop {tier}", unit="ep", file=sys.stderr, disable=not enabled,
                mininterval=0.5 if tty else 60.0, dynamic_ncols=tty, ascii=not tty)


def _validate(tmp: str) -> tuple[list[str], int]:
    from datamodules.validate import validate_source

    return validate_source(tmp, checksums=True, decode_every=DECODE_EVERY)


def _write_tier(root: Path, tier: str, config: dict[str, Any], chunks: _Chunks, progress: bool) -> tuple[Path, dict]:
    """Write one tier into a temporary folder next to its final place; returns the folder and its ``source.json``."""
    from datamodules.shards import write_source  # the writer belongs to the data layer, imported where it is used

    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{tier}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{tier}.tmp-{os.getpid()}"
    bar = _progress(f"{tier} ({root.name})" if root.name == HELDOUT else tier, config["episodes"], progress)

    def episodes() -> Iterator:
        done = 0
        while done < config["episodes"]:
            chunk = chunks.next_chunk()
            yield from chunk
            done += len(chunk)
            bar.update(len(chunk))

    try:
        source = write_source(episodes(), tmp, source=tier, horizon=config["horizon"], modality=_modality(tier),
                              extra_metadata={"generator": "envs.tabletop", "config": config})
    finally:
        bar.close()
    return tmp, source


def _publish(tmp: Path, final: Path, config: dict[str, Any], source: dict, checked: tuple[list[str], int]) -> None:
    """Marker and rename into place, once the written tier passed validation."""
    problems, samples = checked
    if problems or samples != source["samples"]:
        raise RuntimeError(f"tabletop pyramid: {tmp} failed validation after writing ({samples} of "
                           f"{source['samples']} samples read): " + "; ".join(problems[:5]))
    (tmp / MARKER).write_text(json.dumps(config, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log.info("tabletop pyramid: wrote %s (%d episodes, %d samples)", final, config["episodes"], source["samples"])


class TabletopPyramid:
    """Preparer of the embedded world's data (``prepare() -> None``, see ``MixtureDataModule(prepare=...)``).

    ``preset`` (``PRESETS``: ``default`` or ``large``) gives every tier's episode count and the held-out splits;
    ``episodes`` overrides counts per tier (0 leaves a tier out) and ``heldout`` the held-out counts per tier
    (written to ``root/heldout/<tier>`` from ``heldout_seed(seed)``: validation sources of scenes the training
    tiers do not contain). ``wrist_window`` is the side, in table units, of the square the wrist camera sees
    (``Renderer``). ``num_workers`` processes render chunks of ``chunk_episodes`` episodes; the data depends on
    neither. ``progress`` shows a bar per tier (episodes, rate, ETA) on stderr. The workers are spawned (they
    re-import the main module), so a script calling ``prepare()`` needs the usual ``if __name__ == "__main__":``
    guard when ``num_workers > 1``.
    """

    def __init__(
        self,
        root: str = ".cache/vla_zoo/tabletop",
        seed: int = 0,
        image_size: int = 64,
        horizon: int = 16,
        episodes: dict[str, int] | None = None,
        num_workers: int = 2,
        heldout: dict[str, int] | None = None,
        wrist_window: float = WRIST_WINDOW,
        preset: str = "default",
        chunk_episodes: int = CHUNK_EPISODES,
        progress: bool = True,
    ):
        if preset not in PRESETS:
            raise ValueError(f"TabletopPyramid(preset={preset!r}): unknown preset; choose one of {list(PRESETS)}")
        if chunk_episodes < 1:
            raise ValueError(f"TabletopPyramid(chunk_episodes=...) must be >= 1, got {chunk_episodes}")
        for key, given in (("episodes", episodes), ("heldout", heldout)):
            unknown = set(given or {}) - set(TIERS)
            if unknown:
                raise ValueError(f"TabletopPyramid({key}=...): unknown tiers {sorted(unknown)}; valid: {list(TIERS)}")
            for tier, n in (given or {}).items():
                if not isinstance(n, int) or n < 0:
                    raise ValueError(f"TabletopPyramid({key}=...): {tier!r} needs a count >= 0, got {n!r}")
        preset_episodes, preset_heldout = PRESETS[preset]
        counts = {**preset_episodes, **(episodes or {})}
        held = {**preset_heldout, **(heldout or {})}
        self.root = Path(root)
        self.seed = seed
        self.image_size = image_size
        self.wrist_window = float(wrist_window)
        self.horizon = horizon
        self.preset = preset
        self.episodes = {tier: counts[tier] for tier in TIERS if counts.get(tier, 0) > 0}
        self.heldout = {tier: held[tier] for tier in TIERS if held.get(tier, 0) > 0}
        self.num_workers = num_workers
        self.chunk_episodes = chunk_episodes
        self.progress = progress

    def config(self, tier: str, heldout: bool = False) -> dict[str, Any]:
        return {
            "generator_version": GENERATOR_VERSION,
            "tier": tier,
            "seed": heldout_seed(self.seed) if heldout else self.seed,
            "image_size": self.image_size,
            "wrist_window": self.wrist_window,
            "horizon": self.horizon,
            "episodes": (self.heldout if heldout else self.episodes)[tier],
        }

    def _root(self, heldout: bool) -> Path:
        return self.root / HELDOUT if heldout else self.root

    @property
    def sources(self) -> dict[str, str]:
        """Tier name -> source folder, for every tier of this pyramid."""
        return {tier: str(self.root / tier) for tier in self.episodes}

    @property
    def heldout_sources(self) -> dict[str, str]:
        """Tier name -> source folder of its held-out split."""
        return {tier: str(self._root(True) / tier) for tier in self.heldout}

    def scene_seeds(self, max_attempts: int | None = None) -> set[int]:
        """Every world seed this pyramid's episodes may have been rendered from: each episode index of every tier
        and held-out split, with every retry attempt (``tiers.episode_seed``). A scene outside this set is new to
        the pyramid (``TabletopEnv.reset(seed=s)`` builds the scene of world seed ``s``)."""
        from .tiers import MAX_ATTEMPTS, episode_seed

        attempts = range(MAX_ATTEMPTS if max_attempts is None else max_attempts)
        splits = [(tier, n, self.seed) for tier, n in self.episodes.items()]
        splits += [(tier, n, heldout_seed(self.seed)) for tier, n in self.heldout.items()]
        return {episode_seed(seed, tier, i, a) for tier, n, seed in splits for i in range(n) for a in attempts}

    def is_ready(self, tier: str, heldout: bool = False) -> bool:
        marker = self._root(heldout) / tier / MARKER
        try:
            return json.loads(marker.read_text()) == self.config(tier, heldout)
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    def prepare(self) -> None:
        todo = [(tier, False) for tier in self.episodes if not self.is_ready(tier)]
        todo += [(tier, True) for tier in self.heldout if not self.is_ready(tier, heldout=True)]
        if not todo:
            return
        jobs = [(self._root(heldout), tier, self.config(tier, heldout)) for tier, heldout in todo]
        jobs.sort(key=lambda job: -job[2]["episodes"])  # biggest first: the ETA of the long tier shows at once
        total_chunks = sum(-(-config["episodes"] // self.chunk_episodes) for _, _, config in jobs)
        workers = min(self.num_workers, total_chunks)
        start = time.perf_counter()
        if workers <= 1:
            executor: Executor = _Inline()
        else:
            # spawn, not fork: prepare() may run inside a process that already has threads (Lightning, torch)
            executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        with executor:
            chunks = _Chunks(executor, [(tier, config) for _, tier, config in jobs], self.chunk_episodes,
                             window=2 * max(workers, 1))
            written: deque = deque()
            for root, tier, config in jobs:
                tmp, source = _write_tier(root, tier, config, chunks, self.progress)
                # validated by a worker while the writer goes on; published as soon as that is done, so an
                # interrupted run keeps its finished tiers
                written.append((tmp, root / tier, config, source, executor.submit(_validate, str(tmp))))
                while written and written[0][-1].done():
                    *args, checked = written.popleft()
                    _publish(*args, checked.result())
            while written:
                *args, checked = written.popleft()
                _publish(*args, checked.result())
        log.info("tabletop pyramid: %s ready in %.1f s", self.root, time.perf_counter() - start)
