"""Whole episodes of one shard source, for ``predict`` runs that process episode by episode (offline labelling).

Each rank reads the source in writing order and keeps episodes ``i`` with ``i % world_size == rank``, so ranks
split the work without a sampler (the dataset is iterable) and every episode is handled exactly once. Every rank
decodes the whole source to find its episodes: shards are written one sample per step, so an episode's position
in the tar stream is only known by reading up to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from datamodules.episode import episode_frames
from datamodules.shards import load_sidecars, read_episodes


class EpisodeStream(IterableDataset):
    """Yields ``{"index": episode index in the source, "frames": uint8 [T, V, 3, h, w]}`` for one rank."""

    def __init__(self, source_dir: str, views: list[str], rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.source_dir, self.views, self.rank, self.world_size = source_dir, views, rank, world_size

    def __len__(self) -> int:
        """Episodes this rank yields (the progress bar's total): indices rank, rank + world_size, ..."""
        return len(range(self.rank, load_sidecars(self.source_dir)["source"]["episodes"], self.world_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, episode in enumerate(read_episodes(self.source_dir)):
            if index % self.world_size == self.rank:
                yield {"index": index, "frames": episode_frames(episode.frames, self.views)}


class EpisodeDataModule(LightningDataModule):
    """``predict_dataloader`` over the episodes of the source in ``source`` (a directory of shards + sidecars).

    Args:
        source: the source directory (as written by ``datamodules.shards.write_source``).
        views: camera views stacked in this order (default: the order in ``source.json``).
    """

    def __init__(self, source: str, views: Optional[list[str]] = None) -> None:
        super().__init__()
        self.source = source
        self.requested_views = views
        self.meta: dict[str, Any] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if not Path(self.source).is_dir():
            raise FileNotFoundError(f"data.init_args.source: {self.source!r} is not a source directory")
        self.meta = load_sidecars(self.source)["source"]
        unknown = [v for v in self.requested_views or [] if v not in self.meta["views"]]
        if unknown:
            raise ValueError(f"data.init_args.views: {unknown} not in {self.source} (it has {self.meta['views']})")

    @property
    def views(self) -> list[str]:
        return list(self.requested_views or self.meta["views"])

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(EpisodeStream(self.source, self.views, rank, world), batch_size=None, num_workers=0)
