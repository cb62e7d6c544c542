"""The default data pyramid: every tier of the tabletop world written as a WebDataset source, cached on disk.

``TabletopPyramid(...).prepare()`` writes ``root/<tier>/`` (shards and sidecars, through
``datamodules.shards.write_source``) plus a ``READY.json`` marker holding the tier's config. A later ``prepare()``
skips every tier whose marker matches and regenerates the ones whose config (episode count, seed, image size,
wrist window, horizon, generator version) changed. A tier is written into a temporary folder and renamed into
place, so an interrupted run never leaves a half-written source behind a marker. ``heldout`` adds held-out splits,
``root/heldout/<tier>/``: the same tier from a seed derived from the pyramid's, so their scenes are new ones.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
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
MARKER = "READY.json"
HELDOUT = "heldout"  # sub-folder of the held-out splits
HELDOUT_KEY = 0x48454C44  # mixed into the seed of held-out splits


def heldout_seed(seed: int) -> int:
    """Seed of a pyramid's held-out splits: hashed from its seed, so it is no other pyramid's plain seed either."""
    return int(np.random.SeedSequence([seed, HELDOUT_KEY]).generate_state(1, np.uint32)[0])


def _build_tier(root: str, tier: str, config: dict[str, Any]) -> dict[str, Any]:
    from datamodules.shards import write_source  # the writer belongs to the data layer, imported where it is used

    start = time.perf_counter()
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    for stale in root_path.glob(f".{tier}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root_path / f".{tier}.tmp-{os.getpid()}"
    spec = TIERS[tier]
    episodes = generate_episodes(tier, config["episodes"], config["seed"], config["image_size"],
                                 wrist_window=config["wrist_window"])
    source = write_source(
        episodes,
        tmp,
        source=tier,
        horizon=config["horizon"],
        modality=None if spec.actionless else MODALITIES[spec.embodiment],
        extra_metadata={"generator": "envs.tabletop", "config": config},
    )
    (tmp / MARKER).write_text(json.dumps(config, indent=1, sort_keys=True))
    final = root_path / tier
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    elapsed = time.perf_counter() - start
    log.info("tabletop pyramid: wrote %s (%d episodes) in %.1f s", final, config["episodes"], elapsed)
    return source


class TabletopPyramid:
    """Preparer of the embedded world's data (``prepare() -> None``, see ``MixtureDataModule(prepare=...)``).

    ``episodes`` maps tier name to episode count (missing tiers take ``DEFAULT_EPISODES``; 0 leaves a tier out).
    ``heldout`` maps tier name to the episode count of its held-out split (default: none), written to
    ``root/heldout/<tier>`` from ``heldout_seed(seed)``: a validation source of scenes the training tiers do not
    contain. ``wrist_window`` is the side, in table units, of the square the wrist camera sees (``Renderer``).
    ``num_workers`` processes build tiers in parallel; the data does not depend on it. The workers are spawned
    (they re-import the main module), so a script calling ``prepare()`` needs the usual
    ``if __name__ == "__main__":`` guard when ``num_workers > 1``.
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
    ):
        for key, given in (("episodes", episodes), ("heldout", heldout)):
            unknown = set(given or {}) - set(TIERS)
            if unknown:
                raise ValueError(f"TabletopPyramid({key}=...): unknown tiers {sorted(unknown)}; valid: {list(TIERS)}")
            for tier, n in (given or {}).items():
                if not isinstance(n, int) or n < 0:
                    raise ValueError(f"TabletopPyramid({key}=...): {tier!r} needs a count >= 0, got {n!r}")
        counts = {**DEFAULT_EPISODES, **(episodes or {})}
        self.root = Path(root)
        self.seed = seed
        self.image_size = image_size
        self.wrist_window = float(wrist_window)
        self.horizon = horizon
        self.episodes = {tier: counts[tier] for tier in TIERS if counts[tier] > 0}
        self.heldout = {tier: n for tier, n in (heldout or {}).items() if n > 0}
        self.num_workers = num_workers

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
        jobs = [(str(self._root(heldout)), tier, self.config(tier, heldout)) for tier, heldout in todo]
        jobs.sort(key=lambda job: -job[2]["episodes"])  # biggest first balances the workers
        workers = min(self.num_workers, len(jobs))
        if workers <= 1:
            for job in jobs:
                _build_tier(*job)
            return
        # spawn, not fork: prepare() may run inside a process that already has threads (Lightning, torch)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(_build_tier, *job) for job in jobs]:
                future.result()
