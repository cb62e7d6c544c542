"""Samples/s of the mixture loader against the raw read-and-decode limit measured in the same run.

The limit reads the same tar members and decodes the same JPEGs and arrays (``decode_sample``) in a tight,
single-process loop over every shard of every source. The loader is ``MixtureDataModule``'s train loader with 0, 1
and 2 workers (resampling, shuffling, mixing, normalising, padding, collating). Target: loader >= 70% of the limit.
The same loader with every source decoded into memory once (``cache: true``; 0 workers) is measured beside it,
with the time that decoding took.

    python benchmarks/data_throughput.py                         # the default tabletop pyramid
    python benchmarks/data_throughput.py --shards DIR [DIR ...]  # any source directories

Without ``--shards`` it prepares ``envs.tabletop.pyramid.TabletopPyramid`` (cached under ``--root``); where that
is not available it writes synthetic 64 px sources instead. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from datamodules.mixture import MixtureDataModule
from datamodules.shards import decode_sample, iter_raw_samples, load_sidecars, shard_files, write_source
from vla_zoo.machine import describe


def synthetic_sources(root: Path) -> list[str]:
    from datamodules.episode import Episode

    rng = np.random.default_rng(0)
    dirs = []
    for name, has_action, n in (("robot", True, 20), ("sim", True, 40), ("human", False, 20)):
        episodes = []
        for _ in range(n):
            T = 40
            yy, xx = np.mgrid[0:64, 0:64] / 64
            frames = {v: (127 + 100 * np.sin(3 * (xx + yy)[None, ..., None] + rng.uniform(0, 6, (T, 1, 1, 3))))
                      .astype(np.uint8) for v in ("scene", "wrist")}
            episodes.append(Episode(frames, "stack the blocks", "point_gripper" if has_action else "human", 10.0,
                                    rng.normal(size=(T, 3)).astype(np.float32) if has_action else None,
                                    rng.normal(size=(T, 3)).astype(np.float32) if has_action else None))
        write_source(episodes, root / name, source=name)
        dirs.append(str(root / name))
    return dirs


def default_sources(root: str) -> tuple[list[str], str]:
    try:
        from envs.tabletop.pyramid import TabletopPyramid
    except ImportError:
        return synthetic_sources(Path(tempfile.mkdtemp(prefix="vla_zoo_bench_"))), "synthetic"
    pyramid = TabletopPyramid(root=root)
    pyramid.prepare()
    return list(pyramid.sources.values()), "tabletop_pyramid"


def measure_limit(dirs: list[str], min_seconds: float) -> float:
    """Samples/s of read + decode over every shard, repeated until ``min_seconds`` have passed."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for d in dirs:
            meta = load_sidecars(d)["source"]
            for url, expected in shard_files(d).items():
                for raw in iter_raw_samples(url, expected=expected):
                    decode_sample(raw, meta)
                    n += 1
    return n / (time.perf_counter() - start)


def measure_loader(dm: MixtureDataModule, num_workers: int) -> float:
    """Samples/s of the train loader, timed from the first batch (worker start-up excluded)."""
    dm.num_workers = num_workers
    it = iter(dm.train_dataloader())
    next(it)
    n, start = 0, time.perf_counter()
    for batch in it:
        n += len(batch["source_id"])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", nargs="*", help="source directories (default: the tabletop pyramid)")
    parser.add_argument("--root", default=".cache/vla_zoo/tabletop", help="where the pyramid is cached")
    parser.add_argument("--samples", type=int, default=6000, help="samples per loader measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--limit-seconds", type=float, default=10.0)
    args = parser.parse_args()

    dirs, data = (args.shards, "given") if args.shards else default_sources(args.root)
    metas = {d: load_sidecars(d)["source"] for d in dirs}
    embodiments = {e: i for i, e in enumerate(sorted({m["embodiment"] for m in metas.values()}))}
    sources = [{"name": m["name"], "shards": d, "embodiment": m["embodiment"], "has_action": m["has_action"]}
               for d, m in metas.items()]
    def datamodule(cache: bool) -> MixtureDataModule:
        return MixtureDataModule([{**s, "cache": cache} for s in sources], embodiments,
                                 horizon=min(m["horizon"] for m in metas.values()), batch_size=args.batch_size,
                                 batches_per_epoch=args.samples // args.batch_size + 1)

    dm = datamodule(cache=False)
    dm.setup()

    limit = measure_limit(dirs, args.limit_seconds)
    loader = {str(w): measure_loader(dm, w) for w in args.workers}
    cached = datamodule(cache=True)
    cached.setup()
    start = time.perf_counter()
    cached.make_dataset()  # the first loader decodes the sources into memory
    fill_s = time.perf_counter() - start
    cached_loader = measure_loader(cached, 0)
    print(json.dumps({
        "machine": describe(),
        "data": data,
        "sources": {m["name"]: m["samples"] for m in metas.values()},
        "image_size": next(iter(metas.values()))["image_size"],
        "views": next(iter(metas.values()))["views"],
        "batch_size": args.batch_size,
        "limit_samples_per_s": round(limit, 1),
        "loader_samples_per_s": {w: round(v, 1) for w, v in loader.items()},
        "loader_over_limit": {w: round(v / limit, 3) for w, v in loader.items()},
        "target_over_limit": 0.7,
        "cached_fill_s": round(fill_s, 1),
        "cached_loader_samples_per_s_0_workers": round(cached_loader, 1),
        "cached_over_streamed_0_workers": round(cached_loader / loader["0"], 1) if "0" in loader else None,
    }, indent=1))


if __name__ == "__main__":
    main()
