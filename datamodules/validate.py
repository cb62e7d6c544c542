"""Check shard sources end to end: ``python -m datamodules.validate DIR [DIR ...]``.

Reads every sample of every shard listed in each source's ``index.json`` and reports, with file and key, truncated
tars, undecodable images, missing members, wrong shapes, non-finite values, non-finite statistics in ``stats.json``,
sample keys that appear twice in the source and members that appear twice in a sample, missing sidecars and sample
counts or checksums that disagree with the index. Exits 1 if anything is wrong, 0 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from datamodules.normalization import non_finite_stats
from datamodules.progress import make_progress
from datamodules.shards import SampleError, decode_sample, iter_raw_samples, load_sidecars


def stats_problems(path: Path, stats: dict) -> list[str]:
    """One line per statistic (``actions.mean``, ``state.quantiles``...) holding NaN, inf or a non-number."""
    grouped: dict[str, list[str]] = {}
    for bad in non_finite_stats(stats):
        key, _, value = bad.partition(" = ")
        stem, bracket, index = key.partition("[")
        grouped.setdefault(stem, []).append(f"{bracket}{index}={value}" if bracket else value)
    return [f"{path}: {key}: non_finite_stats: {', '.join(values[:5])}{' ...' if len(values) > 5 else ''} "
            "(normalising with it makes every loss NaN; find the non-finite samples it was computed from and rewrite "
            "the source)" for key, values in grouped.items()]


def validate_source(
    source_dir: str | Path, checksums: bool = True, decode_every: int = 1,
    on_sample: Optional[Callable[[], None]] = None,
) -> tuple[list[str], int]:
    """Problems found in one source directory (one line each: ``file: key: kind: what``) and samples read.

    ``decode_every=k`` decodes every k-th sample of each shard (its first included) and only reads the others: the
    cheap check of a source just written, whose tars, counts and checksums are still checked in full. ``on_sample``
    is called after each sample read (a progress bar's advance)."""
    if decode_every < 1:
        raise ValueError(f"validate_source(decode_every=...) must be >= 1, got {decode_every}")
    d = Path(source_dir)
    try:
        side = load_sidecars(d)
    except (FileNotFoundError, ValueError) as e:
        return [f"{d}: missing_sidecar: {e}"], 0
    problems: list[str] = stats_problems(d / "stats.json", side["stats"])
    total = 0
    first_shard: dict[str, Path] = {}  # sample key -> the shard it was first read from
    for entry in side["index"]["shards"]:
        path = d / entry["file"]
        if not path.is_file():
            problems.append(f"{path}: missing_shard: listed in index.json but not on disk")
            continue
        if checksums:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != entry["sha256"]:
                problems.append(f"{path}: checksum: sha256 differs from index.json (file changed or damaged)")
        last_key = "<start>"
        count = 0

        def on_tar_error(err: SampleError) -> bool:
            where = err.key or f"after {last_key}"
            problems.append(f"{path}: {where}: {err.kind}: {err.args[0]}")
            return True

        for raw in iter_raw_samples(str(path), handler=on_tar_error, expected=entry["samples"]):
            count += 1
            last_key = raw["__key__"]
            if last_key in first_shard:  # within one shard the reader reports it; across shards only this can
                problems.append(f"{path}: {last_key}: duplicate_key: also in {first_shard[last_key]}")
            first_shard.setdefault(last_key, path)
            if on_sample is not None:
                on_sample()
            if (count - 1) % decode_every:
                continue
            try:
                decode_sample(raw, side["source"])
            except SampleError as err:
                problems.append(f"{path}: {last_key}: {err.kind}: {err.args[0]}")
        if count > entry["samples"]:
            problems.append(f"{path}: sample_count: read {count} samples, index.json says {entry['samples']}")
        total += count
    return problems, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.validate", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="source directories written by datamodules.shards.write_source")
    parser.add_argument("--no-checksums", action="store_true", help="skip the sha256 comparison with index.json")
    args = parser.parse_args(argv)
    failed = False
    for d in args.dirs:
        with make_progress("sample") as progress:
            task = progress.add_task(f"validate {Path(d).name}", total=_listed_samples(d))
            problems, samples = validate_source(d, checksums=not args.no_checksums,
                                                on_sample=lambda: progress.advance(task))
        for p in problems:
            print(p, file=sys.stderr)
        failed |= bool(problems)
        status = f"{len(problems)} problem(s)" if problems else "ok"
        print(f"{d}: {samples} samples read: {status}")
    return 1 if failed else 0


def _listed_samples(source_dir: str) -> Optional[int]:
    """Samples the source's index.json lists (the bar's total); None where it cannot be read."""
    try:
        return sum(s["samples"] for s in load_sidecars(source_dir)["index"]["shards"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
