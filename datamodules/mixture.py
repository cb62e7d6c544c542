"""The mixture DataModule: weighted, seeded, infinite streams over WebDataset sources, in the zoo's batch schema.

Why not ``webdataset.RandomMix`` / ``resampled=True``: RandomMix draws from the global ``random`` module and its
ratios break when a source ends, and ``resampled`` seeds from time and urandom, so neither is reproducible. Here
every (rank, worker, source) reads its own infinite stream of shards drawn with replacement from a private RNG,
a private mixer RNG picks the source of each sample, and every RNG derives from ``(seed, epoch, rank, worker)``.

Batches are assembled inside the workers, and worker w yields batches w, w + W, ... of ``batches_per_epoch``, so
every rank yields exactly ``batches_per_epoch`` batches whatever the number of workers: DDP never waits on a rank
that ran dry. Rank and world size are read in the main process (spawned workers see no process group).

Corrupt samples are skipped and counted per source and error kind; the counts, and the shard and key of the first
few skipped samples, travel with the batch under ``"_errors"`` (a key that ``on_after_batch_transfer`` removes before
the model sees the batch, logging a warning that names them) and accumulate in ``MixtureDataModule.error_counts``.
A source that fails ``max_consecutive_errors`` times in a row raises.

Example recipe::

    data:
      class_path: datamodules.mixture.MixtureDataModule
      init_args:
        embodiments: {point_gripper: 0, two_link_arm: 1, human: 2}
        sources:
          - {name: robot, shards: data/robot/shard-*.tar, embodiment: point_gripper, weight: 0.5}
          - {name: human, shards: data/human, embodiment: human, weight: 0.2, has_action: false}
"""

from __future__ import annotations

import glob
import logging
import math
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules import schema
from datamodules.normalization import MODES, Normalizer, combine_stats, non_finite_stats
from datamodules.shards import (
    SampleError, decode_sample, is_url, iter_raw_samples, load_sidecars, sidecar_location, source_shards,
)
from datamodules.spec import DataSpec, EmbodimentSpec
from datamodules.worker_signals import leave_stop_signals_to_the_trainer

log = logging.getLogger(__name__)

ERRORS_KEY = "_errors"
#: Skipped samples named (shard and key) per batch; the counts cover the rest.
NAMED_ERRORS_PER_BATCH = 8


@runtime_checkable
class Preparer(Protocol):
    """Anything that writes the shards a mixture reads (e.g. ``envs.tabletop.pyramid.TabletopPyramid``)."""

    def prepare(self): ...  # no return annotation: jsonargparse would compare "None" and None literally


@dataclass
class SourceConfig:
    """One source of a mixture.

    ``shards``: a glob of tar files or a source directory (all shards in it); relative paths are relative to the
    working directory. All matched shards must lie in one source directory (the one holding the sidecars). Or a URL
    that webdataset opens (``http(s)://``, ``file:``, ``pipe:CMD``, ...): a shard URL or brace pattern
    (``http://host/robot/shard-{000000..000009}.tar``, sidecars beside the shards) or a directory URL ending in "/"
    (every shard its index.json lists); see ``datamodules.shards.source_shards``.
    ``views``: camera views in the order they are stacked in ``images`` (default: the order in ``source.json``).
    ``normalization``: overrides the mixture's mode for this source's embodiment.
    ``targets``: what this source trains the action head on: ``action`` (its real actions) and/or the kinds of
    pseudo-labels (``latent``, ``idm``, ...) that the model's pseudo-labelers produce. Default: ``[action]`` for
    sources with actions, nothing for actionless ones (which then only feed labelers that train themselves).
    ``cache``: decode the whole source into memory once, when its first loader is made, and stream from there
    instead of re-reading and re-decoding its tars every pass, for a source that fits in RAM (decoded frames take
    far more memory than their JPEGs). The workers share it copy-on-write, which needs the
    ``fork`` start method (Linux's default), and every DDP rank holds its own copy. A cached source is drawn as an
    in-memory dataset is: every pass is a fresh permutation of all its samples, whatever shard they came from. A
    streamed source reads one shard at a time through the shuffle buffer, so a batch holds neighbours within a shard;
    for shards written in task order a batch then holds one task. Unset (``None``), a
    training source takes the mixture's ``cache`` (so one line caches them all without repeating the ``sources``
    list) and a validation source is streamed.
    """

    name: str
    shards: str
    embodiment: str
    weight: float = 1.0
    has_action: bool = True
    normalization: Optional[str] = None
    views: Optional[list[str]] = None
    targets: Optional[list[str]] = None
    cache: Optional[bool] = None


@dataclass
class ResolvedSource:
    """A source after ``setup()``: its shard files and sidecars, picklable for worker processes."""

    config: SourceConfig
    index: int
    urls: list[str]
    expected: list[int]  # samples per shard according to index.json
    meta: dict[str, Any]
    modality: dict[str, Any]
    stats: dict[str, Any]
    samples: int
    views: list[str] = field(default_factory=list)
    # With SourceConfig.cache: per shard, what one read of it gives: decoded samples and the errors met on the way.
    decoded: Optional[list[list[Any]]] = None


class ErrorCounter:
    """Counts skipped samples per (source, kind), names the first few of each batch (``shard:key: kind: what``) and
    raises once a source fails too often in a row."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.pending: Counter[str] = Counter()
        self.named: list[str] = []
        self.consecutive: Counter[str] = Counter()

    def failure(self, source: str, err: SampleError) -> None:
        self.pending[f"{source}/{err.kind}"] += 1
        if len(self.named) < NAMED_ERRORS_PER_BATCH:
            self.named.append(f"source {source!r}: {err}")
        self.consecutive[source] += 1
        if self.consecutive[source] >= self.max_consecutive:
            raise RuntimeError(
                f"source {source!r} failed {self.consecutive[source]} times in a row without yielding a sample "
                f"(last: {err}); check its shards with `python -m datamodules.validate <source dir>`"
            )

    def success(self, source: str) -> None:
        self.consecutive[source] = 0

    def pop(self) -> dict[str, Any]:
        """``{"counts": {"source/kind": n}, "named": [what was skipped, shard and key]}`` since the last pop."""
        out = {"counts": dict(self.pending), "named": self.named}
        self.pending, self.named = Counter(), []
        return out


def shard_items(url: str, expected: int) -> Iterator[dict | SampleError]:
    """One read of one shard: its raw samples, and the errors met while reading it, in order."""
    pending: list[SampleError] = []

    def on_tar_error(err: SampleError) -> bool:
        pending.append(err)
        return True

    empty = True
    for raw in iter_raw_samples(url, handler=on_tar_error, expected=expected):
        yield from pending
        pending.clear()
        empty = False
        yield raw
    yield from pending
    if empty:  # an unreadable or empty shard is a failure too, or an all-bad source would spin forever
        yield SampleError("truncated_tar", "shard yielded no samples", url=url)


def decode_item(raw: dict, meta: dict[str, Any]) -> dict | SampleError:
    """A raw sample -> its decoded sample, or the ``SampleError`` that says why it cannot be decoded."""
    try:
        return decode_sample(raw, meta)
    except SampleError as err:
        err.url = raw.get("__url__")
        return err


@dataclass
class Undecodable:
    """A sample of a cached source that could not be decoded. It takes its place in the shuffle buffer, as the raw
    sample does when the source is streamed, and counts as an error when it leaves: the cache changes no data."""

    error: SampleError


def decode_source(src: ResolvedSource) -> list[list[dict | SampleError | Undecodable]]:
    """Every shard of a source read and decoded once (``SourceConfig.cache``)."""

    def decoded(item: dict | SampleError) -> dict | SampleError | Undecodable:
        if isinstance(item, SampleError):  # the tar itself: counted where the stream meets it
            return item
        sample = decode_item(item, src.meta)
        return Undecodable(sample) if isinstance(sample, SampleError) else sample

    return [[decoded(item) for item in shard_items(url, n)] for url, n in zip(src.urls, src.expected)]


# Default raw samples buffered per source and worker (MixtureDataModule's docstring says why 1,000).
SHUFFLE_BUFFER = 1000


def source_stream(src: ResolvedSource, rng: random.Random, errors: ErrorCounter, shuffle_buffer: int) -> Iterator[dict]:
    """Infinite stream of decoded samples of one source. Streamed: shards drawn with replacement, samples shuffled
    in a buffer so that consecutive steps of one episode do not share a batch; the buffer holds raw (still encoded)
    samples, decoded as they leave it. Held decoded in memory (``src.decoded``): passes over a fresh permutation of
    all samples of every shard, so a batch is a uniform draw from the whole source."""
    name = src.config.name

    def items() -> Iterator[dict | SampleError]:
        if src.decoded is not None:
            pool = [item for shard in src.decoded for item in shard]  # references: no copy of the frames
            while True:
                yield from (pool[i] for i in rng.sample(range(len(pool)), len(pool)))
        while True:
            i = rng.randrange(len(src.urls))
            yield from shard_items(src.urls[i], src.expected[i])

    buffer: list[dict] = []
    for item in items():
        if isinstance(item, SampleError):  # a tar that cannot be read
            errors.failure(name, item)
            continue
        if len(buffer) < shuffle_buffer:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        item, buffer[i] = buffer[i], item
        sample = item if src.decoded is not None else decode_item(item, src.meta)
        if isinstance(sample, Undecodable):
            sample = sample.error
        if isinstance(sample, SampleError):
            errors.failure(name, sample)
            continue
        errors.success(name)
        yield sample


class MixtureStream(IterableDataset):
    """Yields ``batches_per_epoch`` collated batches per rank, split over the DataLoader's workers."""

    def __init__(
        self,
        sources: list[ResolvedSource],
        weights: list[float],
        normalizers: dict[str, Normalizer],
        embodiments: dict[str, int],
        *,
        horizon: int,
        max_state_dim: int,
        max_action_dim: int,
        batch_size: int,
        batches_per_epoch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        image_size: Optional[int] = None,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        max_consecutive_errors: int = 100,
        max_privileged_dim: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sources, self.weights, self.normalizers, self.embodiments = sources, weights, normalizers, embodiments
        self.horizon, self.max_state_dim, self.max_action_dim = horizon, max_state_dim, max_action_dim
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, epoch
        self.image_size, self.shuffle_buffer, self.max_consecutive_errors = image_size, shuffle_buffer, max_consecutive_errors
        self.max_privileged_dim = max_privileged_dim

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _rngs(self, worker: int) -> tuple[random.Random, list[random.Random]]:
        seq = np.random.SeedSequence([self.seed, self.epoch, self.rank, worker])
        states = seq.generate_state(len(self.sources) + 1, dtype=np.uint64)
        return random.Random(int(states[0])), [random.Random(int(s)) for s in states[1:]]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mixer, source_rngs = self._rngs(worker)
        errors = ErrorCounter(self.max_consecutive_errors)
        streams: dict[int, Iterator[dict]] = {}  # opened lazily: a zero-weight source is never read
        population = range(len(self.sources))
        for _ in range(worker, self.batches_per_epoch, num_workers):
            samples = []
            for i in mixer.choices(population, weights=self.weights, k=self.batch_size):
                if i not in streams:
                    streams[i] = source_stream(self.sources[i], source_rngs[i], errors, self.shuffle_buffer)
                samples.append(self.to_schema(next(streams[i]), self.sources[i]))
            batch = collate(samples)
            batch[ERRORS_KEY] = errors.pop()
            yield batch

    def to_schema(self, s: dict[str, Any], src: ResolvedSource) -> dict[str, Any]:
        """A decoded sample -> one sample of ``datamodules/schema.py`` as numpy (normalised, padded, masked)."""
        cfg, H = src.config, self.horizon
        images = s["images"]  # [2, V, 3, h, w] in source.json view order
        if src.views != src.meta["views"]:
            images = images[:, [src.meta["views"].index(v) for v in src.views]]
        if self.image_size is not None and images.shape[-2:] != (self.image_size, self.image_size):
            frames = torch.from_numpy(images).flatten(0, 1).float()
            resized = F.interpolate(frames, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
            images = resized.round().clamp(0, 255).to(torch.uint8).view(*images.shape[:3], *resized.shape[-2:]).numpy()
        norm = self.normalizers[cfg.embodiment]
        state = np.zeros(self.max_state_dim, np.float32)
        state_mask = np.zeros(self.max_state_dim, bool)
        actions = np.zeros((H, self.max_action_dim), np.float32)
        action_mask = np.zeros((H, self.max_action_dim), bool)
        if cfg.has_action:
            S, A = len(s["state"]), s["actions"].shape[1]
            state[:S], state_mask[:S] = norm.normalize(s["state"], "state"), True
            real = ~s["action_pad"][:H]  # [H]
            actions[:, :A] = norm.normalize(s["actions"][:H], "actions") * real[:, None]
            action_mask[:, :A] = real[:, None]
        meta = s["meta"]
        out = {
            schema.IMAGES: images,
            schema.STATE: state,
            schema.STATE_MASK: state_mask,
            schema.ACTIONS: actions,
            schema.ACTION_MASK: action_mask,
            schema.HAS_ACTION: np.bool_(cfg.has_action),
            schema.EMBODIMENT_ID: np.int64(self.embodiments[cfg.embodiment]),
            schema.SOURCE_ID: np.int64(src.index),
            schema.INSTRUCTION: s["instruction"],
            schema.EPISODE: np.int64(meta["episode"]),
            schema.STEP: np.int64(meta["t"]),
        }
        if self.max_privileged_dim:
            privileged = np.zeros(self.max_privileged_dim, np.float32)
            privileged_mask = np.zeros(self.max_privileged_dim, bool)
            if "privileged" in s:
                # Standardised with the source's own statistics: the auxiliary loss then weighs every dim alike.
                stats = src.stats["privileged"]
                P = len(s["privileged"])
                std = np.maximum(np.asarray(stats["std"], np.float32), 1e-6)
                privileged[:P] = (s["privileged"] - np.asarray(stats["mean"], np.float32)) / std
                privileged_mask[:P] = True
            out[schema.PRIVILEGED], out[schema.PRIVILEGED_MASK] = privileged, privileged_mask
        return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``to_schema`` samples into a batch. Stacking in numpy rather than with ``torch.stack`` keeps the
    loading process out of torch's intra-op thread pool, whose spinning threads starve a 0-worker loader on busy
    cores."""
    keys = schema.TENSOR_KEYS + tuple(k for k in schema.OPTIONAL_TENSOR_KEYS if k in samples[0])
    batch: dict[str, Any] = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in keys}
    batch[schema.INSTRUCTION] = [s[schema.INSTRUCTION] for s in samples]
    return batch


class _EpochLoader(DataLoader):
    """A DataLoader that gives its dataset a fresh epoch number (hence fresh streams) each time it is iterated."""

    def __init__(self, dataset: MixtureStream, next_epoch, **kwargs) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._next_epoch = next_epoch

    def __iter__(self):
        self.dataset.epoch = self._next_epoch()  # set in the main process, before workers copy the dataset
        return super().__iter__()


def _as_config(s: SourceConfig | dict) -> SourceConfig:
    return s if isinstance(s, SourceConfig) else SourceConfig(**s)


def _with_cache_default(s: SourceConfig, cache: bool) -> SourceConfig:
    return s if s.cache is not None else replace(s, cache=cache)


def normalizers_from_state(state: dict[str, Any]) -> dict[str, Normalizer]:
    """Per-embodiment normalisers from ``MixtureDataModule.state_dict()`` or from a whole Lightning checkpoint."""
    if "normalizers" not in state:
        if MixtureDataModule.__qualname__ not in state:
            raise KeyError("no mixture data state found: expected a MixtureDataModule.state_dict() or a checkpoint "
                           f"with a '{MixtureDataModule.__qualname__}' entry")
        state = state[MixtureDataModule.__qualname__]
    return {name: Normalizer.from_dict(d) for name, d in state["normalizers"].items()}


class MixtureDataModule(LightningDataModule):
    """Weighted mixture of shard sources, yielding batches in ``datamodules/schema.py`` format.

    Args:
        sources: ``SourceConfig``s (or dicts with the same fields) of the training mixture.
        embodiments: embodiment name -> slot in the action head's per-embodiment tables (``embodiment_id``).
        horizon: action chunk length H (shards must have been written with at least this horizon).
        max_state_dim / max_action_dim: padded widths of ``state`` / ``actions``.
        batch_size: samples per batch (per rank).
        batches_per_epoch: batches each rank yields per epoch (streams are infinite; this only sets the epoch).
        num_workers: DataLoader workers per rank.
        normalization: ``min_max`` (to [-1, 1]), ``q01_q99`` (clipped) or ``mean_std``; sources may override it
            for their embodiment.
        balance_by_size: sample sources in proportion to ``weight x number of samples``.
        seed: data seed; streams derive from (seed, epoch, rank, worker).
        image_size: resize frames to this square size (needed when sources differ in image size).
        prepare: an object whose ``prepare()`` writes the shards, called in ``prepare_data``.
        val_sources / val_batches: optional held-out sources read with a fixed seed for ``val_batches`` batches,
            normalised with the training statistics (no validation without them).
        shuffle_buffer: raw samples buffered per source and worker for shuffling. Shards hold whole episodes in
            order, so the buffer sets how many episodes a batch mixes; the default of 1,000 comes close to uniform
            draws (tests/datamodules/test_mixture.py). The cost is the memory of the buffered encoded samples.
        cache: the default of ``SourceConfig.cache`` for the training sources that leave it unset.
            YAML lists replace rather than merge, so without it an overlay that caches every source has to repeat the
            whole ``sources`` list.
        max_consecutive_errors: consecutive failures after which a source raises.
    """

    def __init__(
        self,
        sources: list[SourceConfig],
        embodiments: dict[str, int],
        horizon: int = 16,
        max_state_dim: int = 16,
        max_action_dim: int = 16,
        batch_size: int = 32,
        batches_per_epoch: int = 1000,
        num_workers: int = 0,
        normalization: str = "min_max",
        balance_by_size: bool = False,
        seed: int = 0,
        image_size: Optional[int] = None,
        prepare: Optional[Preparer] = None,
        val_sources: Optional[list[SourceConfig]] = None,
        val_batches: int = 8,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        max_consecutive_errors: int = 100,
        cache: bool = False,
    ) -> None:
        super().__init__()
        self.cache = cache
        self.sources = [_with_cache_default(_as_config(s), cache) for s in sources]
        # Not the validation sources: they yield `val_batches` batches, and decoding a whole source for those costs
        # more time and memory than it saves.
        self.val_sources = [_with_cache_default(_as_config(s), False) for s in val_sources or []]
        self.embodiments = dict(embodiments)
        self.horizon, self.max_state_dim, self.max_action_dim = horizon, max_state_dim, max_action_dim
        self.batch_size, self.batches_per_epoch, self.num_workers = batch_size, batches_per_epoch, num_workers
        self.normalization, self.balance_by_size, self.seed = normalization, balance_by_size, seed
        self.image_size, self.prepare, self.val_batches = image_size, prepare, val_batches
        self.shuffle_buffer, self.max_consecutive_errors = shuffle_buffer, max_consecutive_errors
        self._check_config()
        if not self.val_sources:
            # Lightning validates only a datamodule whose val_dataloader is defined. Without held-out sources there
            # is nothing to validate on, and an empty loader list made it warn "Total length ... is zero" every run.
            self.val_dataloader = None
        self.epochs_started = 0
        self.normalizers: dict[str, Normalizer] = {}
        self.modalities: dict[str, dict] = {}
        self.resolved: list[ResolvedSource] = []
        self.resolved_val: list[ResolvedSource] = []
        self.error_counts: Counter[str] = Counter()  # "source/kind" -> skipped samples, over the whole run
        self.drawn_counts: Counter[int] = Counter()  # source index -> samples drawn for training

    # ---------------------------------------------------------------- configuration

    def _check_config(self) -> None:
        if self.normalization not in MODES:
            raise ValueError(f"normalization {self.normalization!r} is not one of {MODES}")
        if not self.sources:
            raise ValueError("MixtureDataModule needs at least one source")
        slots: dict[int, list[str]] = defaultdict(list)
        for name, slot in self.embodiments.items():
            if isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
                raise ValueError(f"embodiments: {name!r} has slot {slot!r}; a slot is an int >= 0 (a row of the "
                                 "action head's per-embodiment tables)")
            slots[slot].append(name)
        for slot, names in slots.items():
            if len(names) > 1:  # they would share state/action encoders and decoder: one robot's units for both
                raise ValueError(f"embodiments: {names} share slot {slot}; give each embodiment its own slot")
        for group in (self.sources, self.val_sources):
            names = [s.name for s in group]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"duplicate source name(s) {dup}: every source needs its own name")
            for s in group:
                if s.embodiment not in self.embodiments:
                    raise ValueError(f"source {s.name!r}: unknown embodiment {s.embodiment!r}; add it to "
                                     f"`embodiments` (known: {sorted(self.embodiments)})")
                if not (s.weight >= 0 and math.isfinite(s.weight)):  # NaN fails both comparisons
                    raise ValueError(f"source {s.name!r}: weight must be >= 0 and finite, got {s.weight}")
                if s.normalization is not None and s.normalization not in MODES:
                    raise ValueError(f"source {s.name!r}: normalization {s.normalization!r} is not one of {MODES}")
                if s.targets is not None and "action" in s.targets and not s.has_action:
                    raise ValueError(f"source {s.name!r}: targets include 'action' but has_action is false; "
                                     "an actionless source can only train pseudo-label targets (latent, idm)")
        total = sum(s.weight for s in self.sources)
        if total <= 0:
            raise ValueError("all source weights are zero: give at least one source a positive weight")
        if not math.isfinite(total):
            raise ValueError(f"source weights sum to {total}: scale them down (only their ratios matter)")

    def _resolve(self, cfg: SourceConfig, index: int) -> ResolvedSource:
        try:
            if is_url(cfg.shards):  # a directory URL ("/" at the end): every shard; else shard URLs / a brace pattern
                listed = source_shards(cfg.shards, None if cfg.shards.endswith("/") else cfg.shards)
                side = load_sidecars(cfg.shards)
            else:
                listed, side = self._resolve_local(cfg)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"source {cfg.name!r}: {e}") from None
        urls, expected = [u for u, _ in listed], [n for _, n in listed]
        meta = side["source"]
        bad_stats = non_finite_stats(side["stats"])
        if bad_stats:
            shown = "; ".join(bad_stats[:4]) + (f"; and {len(bad_stats) - 4} more" if len(bad_stats) > 4 else "")
            stats_file = sidecar_location(urls[0], "stats.json") if is_url(urls[0]) else Path(urls[0]).parent / "stats.json"
            raise ValueError(f"source {cfg.name!r}: {stats_file} holds non-finite statistics "
                             f"({shown}): normalising with them would make every loss NaN. Run `python -m "
                             "datamodules.validate` on the source to find the non-finite samples, and rewrite it")
        if cfg.has_action and not meta["has_action"]:
            raise ValueError(f"source {cfg.name!r}: declared has_action: true but its shards have no actions")
        if cfg.has_action and (side["stats"].get("actions") is None or
                               (meta["state_dim"] and side["stats"].get("state") is None)):
            raise ValueError(f"source {cfg.name!r}: stats.json has no state/action statistics to normalise with")
        if meta["horizon"] < self.horizon:
            raise ValueError(f"source {cfg.name!r}: shards hold action chunks of {meta['horizon']} steps, fewer than "
                             f"horizon={self.horizon}; rewrite them with a longer horizon")
        views = cfg.views or meta["views"]
        unknown = [v for v in views if v not in meta["views"]]
        if unknown:
            raise ValueError(f"source {cfg.name!r}: views {unknown} not in its shards (has {meta['views']})")
        if cfg.has_action and (meta["state_dim"] > self.max_state_dim or meta["action_dim"] > self.max_action_dim):
            raise ValueError(f"source {cfg.name!r}: state/action dims {meta['state_dim']}/{meta['action_dim']} exceed "
                             f"max_state_dim/max_action_dim {self.max_state_dim}/{self.max_action_dim}")
        return ResolvedSource(cfg, index, urls, expected, meta, side["modality"], side["stats"], sum(expected),
                              list(views))

    @staticmethod
    def _resolve_local(cfg: SourceConfig) -> tuple[list[tuple[str, int]], dict[str, Any]]:
        """The shards (path, samples) of a local directory or glob, and the sidecars of the directory holding them."""
        pattern = cfg.shards
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "shard-*.tar")
        urls = sorted(glob.glob(pattern))
        if not urls:
            raise FileNotFoundError(f"shard pattern {cfg.shards!r} matches no files (relative to {os.getcwd()})")
        dirs = {str(Path(u).parent) for u in urls}
        if len(dirs) != 1:
            raise ValueError(f"shards {cfg.shards!r} span several directories {sorted(dirs)}; declare one source per "
                             "directory")
        directory = dirs.pop()
        return source_shards(directory, pattern), load_sidecars(directory)

    def _check_images(self, resolved: list[ResolvedSource]) -> None:
        counts = {r.config.name: len(r.views) for r in resolved}
        if len(set(counts.values())) != 1:
            raise ValueError(f"sources have different numbers of views {counts}: select the same number with `views`")
        sizes = {r.config.name: tuple(r.meta["image_size"]) for r in resolved}
        if self.image_size is None and len(set(sizes.values())) != 1:
            raise ValueError(f"sources have different image sizes {sizes}: set `image_size` to resize them")

    def _build_normalizers(self) -> None:
        by_embodiment: dict[str, list[ResolvedSource]] = defaultdict(list)
        for r in self.resolved:
            by_embodiment[r.config.embodiment].append(r)
        for emb, group in by_embodiment.items():
            modes = {r.config.normalization or self.normalization for r in group if r.config.has_action}
            if len(modes) > 1:
                raise ValueError(f"embodiment {emb!r}: its sources ask for different normalisations {sorted(modes)}")
            acting = [r for r in group if r.config.has_action]
            dims = {(r.meta["state_dim"], r.meta["action_dim"]) for r in acting}
            if len(dims) > 1:
                detail = {r.config.name: (r.meta["state_dim"], r.meta["action_dim"]) for r in acting}
                raise ValueError(f"embodiment {emb!r}: sources disagree on (state_dim, action_dim): {detail}")
            stats = {
                key: combine_stats([r.stats[key] for r in acting]) if acting and acting[0].stats.get(key) else None
                for key in ("state", "actions")
            }
            self.normalizers[emb] = Normalizer(stats, mode=modes.pop() if modes else self.normalization)
            self.modalities[emb] = (acting or group)[0].modality

    # ---------------------------------------------------------------- Lightning hooks

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare.prepare()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.resolved:
            return
        self.resolved = [self._resolve(cfg, i) for i, cfg in enumerate(self.sources)]
        self.resolved_val = [self._resolve(cfg, i) for i, cfg in enumerate(self.val_sources)]
        self._check_images(self.resolved + self.resolved_val)
        restored = self.normalizers  # a checkpoint loaded before setup keeps its statistics
        self._build_normalizers()
        self.normalizers.update(restored)
        for r in self.resolved_val:
            if r.config.embodiment not in self.normalizers:
                raise ValueError(f"validation source {r.config.name!r}: embodiment {r.config.embodiment!r} has no "
                                 "training source to take normalisation statistics from")

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def mixture_weights(self) -> list[float]:
        """Sampling probability of each source (normalised; ``weight x samples`` with ``balance_by_size``)."""
        w = [r.config.weight * (r.samples if self.balance_by_size else 1) for r in self.resolved]
        return [x / sum(w) for x in w]

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def make_dataset(self, rank: Optional[int] = None, world_size: Optional[int] = None, *, val: bool = False,
                     epoch: int = 0) -> MixtureStream:
        """The training (or validation) stream of one rank; rank/world size default to the running trainer's."""
        self.setup()
        if rank is None:
            rank, world_size = self._rank()
        resolved = self.resolved_val if val else self.resolved
        for r in resolved:
            if r.config.cache and r.decoded is None:  # once, in this process: forked workers share it
                r.decoded = decode_source(r)
                bad = sum(isinstance(x, Undecodable) for shard in r.decoded for x in shard)
                log.info("source %r: %d samples decoded into memory (%d could not be decoded; they count as errors "
                         "when the stream reaches them)", r.config.name,
                         sum(isinstance(x, dict) for shard in r.decoded for x in shard), bad)
        weights = [r.config.weight for r in resolved] if val else self.mixture_weights()
        return MixtureStream(
            resolved, weights, self.normalizers, self.embodiments, horizon=self.horizon,
            max_state_dim=self.max_state_dim, max_action_dim=self.max_action_dim, batch_size=self.batch_size,
            batches_per_epoch=self.val_batches if val else self.batches_per_epoch,
            # Validation reads the same samples every time: a seed apart from all training epochs.
            seed=self.seed + 1_000_003 if val else self.seed, rank=rank, world_size=world_size or 1, epoch=epoch,
            image_size=self.image_size, shuffle_buffer=self.shuffle_buffer,
            max_consecutive_errors=self.max_consecutive_errors,
            # One width for training and validation batches: the widest privileged state of any source.
            max_privileged_dim=max(r.meta.get("privileged_dim", 0) for r in self.resolved + self.resolved_val),
        )

    def _next_epoch(self) -> int:
        self.epochs_started += 1
        return self.epochs_started - 1

    def train_dataloader(self) -> DataLoader:
        return _EpochLoader(self.make_dataset(), self._next_epoch, num_workers=self.num_workers,
                            persistent_workers=False, worker_init_fn=leave_stop_signals_to_the_trainer)

    def val_dataloader(self):
        return DataLoader(self.make_dataset(val=True), batch_size=None, num_workers=self.num_workers,
                          worker_init_fn=leave_stop_signals_to_the_trainer)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        errors = batch.pop(ERRORS_KEY, None) if isinstance(batch, dict) else None
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.drawn_counts.update(batch[schema.SOURCE_ID].tolist())
            if errors and errors["counts"]:
                self.error_counts.update(errors["counts"])
                n = sum(errors["counts"].values())
                more = f"; and {n - len(errors['named'])} more" if n > len(errors["named"]) else ""
                log.warning("skipped %d sample(s): %s%s (totals: %s)", n, "; ".join(errors["named"]), more,
                            dict(self.error_counts))
        return batch

    def data_spec(self) -> DataSpec:
        """What inference needs from the data side, stored by the policy in its checkpoints: per embodiment its
        action-head slot, dims, normaliser and modality; the camera views, image size and horizon."""
        self.setup()
        first = self.resolved[0]
        embodiments = {}
        for name, slot in self.embodiments.items():
            normalizer = self.normalizers.get(name)
            if normalizer is None:  # a slot no source feeds (e.g. filled by pseudo-labels)
                continue
            embodiments[name] = EmbodimentSpec(
                id=slot,
                state_dim=normalizer.dim("state"),
                action_dim=normalizer.dim("actions"),
                has_action=normalizer.dim("actions") > 0,
                normalizer=normalizer.to_dict(),
                modality=self.modalities.get(name),
            )
        size = [self.image_size] * 2 if self.image_size else list(first.meta["image_size"])
        return DataSpec(
            embodiments=embodiments,
            views=list(first.views),
            image_size=size,
            horizon=self.horizon,
            max_state_dim=self.max_state_dim,
            max_action_dim=self.max_action_dim,
            sources=self.source_names,
            source_targets=[self.source_targets(cfg) for cfg in self.sources],
        )

    @staticmethod
    def source_targets(cfg: SourceConfig) -> list[str]:
        return list(cfg.targets) if cfg.targets is not None else (["action"] if cfg.has_action else [])

    # ---------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint by Lightning: what a checkpoint needs to un-normalise actions on its own,
        and the epoch counter so that a resumed run draws fresh (not replayed) but reproducible streams."""
        return {
            "seed": self.seed,
            "epochs_started": self.epochs_started,
            "embodiments": dict(self.embodiments),
            "normalizers": {emb: n.to_dict() for emb, n in self.normalizers.items()},
            "modalities": dict(self.modalities),
            "horizon": self.horizon,
            "max_state_dim": self.max_state_dim,
            "max_action_dim": self.max_action_dim,
            "sources": [{**asdict(r.config), "samples": r.samples} for r in self.resolved],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["embodiments"] != self.embodiments:
            raise ValueError(f"checkpoint embodiment map {state['embodiments']} differs from this run's "
                             f"{self.embodiments}: the action head's per-embodiment slots would be mixed up")
        self.epochs_started = state["epochs_started"]
        # The model learned in the checkpoint's units: keep its statistics even if the shards changed since.
        self.normalizers.update(normalizers_from_state(state))
        self.modalities.update(state["modalities"])
