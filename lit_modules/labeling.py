"""Offline pseudo-labelling: ``lightning predict --config recipes/label.yaml``.

Frozen labelers (``components.pseudo_labels.LatentActionLabeler`` / ``IDMLabeler``, loaded from their
checkpoints) label every step of every episode of one source (``datamodules.episodes.EpisodeDataModule``), and each
labeler's labels become the actions of a NEW source written with ``datamodules.shards.write_source``:
``<output_dir>/<source>_<label_embodiment>`` (e.g. ``neural_latent``, ``neural_idm_point_gripper``), whose
embodiment is the labeler's ``label_embodiment`` and whose ``source.json`` says under ``pseudo_labels`` which
labeler and checkpoint produced them. A later recipe then reads it as an ordinary source::

    - {name: neural_idm, shards: .cache/vla_zoo/labels/neural_idm_point_gripper, embodiment: idm_point_gripper,
       targets: [action]}

Per-step labels: IDM chunks predicted at every anchor are averaged by explicit step index
(``datamodules.labeling.label_episode``); a latent label of step s is the LAM's raw (unnormalised: the mixture
normalises it like any action) latent of the frame pair (s, s+H), flattened. So the chunk of an offline latent source
at anchor t holds the latents of anchors t .. t+H-1, one per step, whereas the on-the-fly ``latent`` target is the
one latent of (t, t+H) laid over N steps: give the two their own embodiment names and slots.

Ranks label disjoint episodes; the labels (small arrays) are gathered to rank 0, which re-reads the source and
writes the new shards (frames are re-encoded as JPEG from the decoded source frames).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import nn

from datamodules.episode import Episode, Modality
from datamodules.shards import load_sidecars, read_episodes, write_source


class PseudoLabelWriter(LightningModule):
    """Args:
        labelers: frozen labelers with ``label_steps(frames [T, V, 3, h, w]) -> (labels [T, A], names)``,
            ``label_embodiment`` and ``kind`` (the classes in ``components.pseudo_labels``).
        output_dir: where the new sources go, one directory per labeler.
        batch_size: frame pairs per labeler call.
        jpeg_quality / samples_per_shard: passed to ``write_source``.
    """

    def __init__(
        self,
        labelers: Sequence[nn.Module],
        output_dir: str = ".cache/vla_zoo/labels",
        batch_size: int = 64,
        jpeg_quality: int = 90,
        samples_per_shard: int = 1000,
    ) -> None:
        super().__init__()
        if not labelers:
            raise ValueError("PseudoLabelWriter: `labelers` is empty; give a LatentActionLabeler and/or an IDMLabeler")
        names = [l.label_embodiment for l in labelers]
        if len(set(names)) != len(names):
            raise ValueError(f"PseudoLabelWriter: labelers share a label_embodiment {names}; each needs its own")
        self.save_hyperparameters(ignore=["labelers"])
        self.labelers = nn.ModuleList(labelers)
        for labeler in self.labelers:
            if not getattr(labeler, "frozen", True):
                raise ValueError(f"PseudoLabelWriter: labeler {labeler.kind!r} is co-trained; offline labelling needs a "
                                 "trained, frozen one (give it a `checkpoint`)")
        self._labels: dict[int, dict[str, np.ndarray]] = {}
        self._names: dict[str, list[str]] = {}
        self.written: dict[str, dict[str, Any]] = {}  # label embodiment -> source.json of what rank 0 wrote

    def on_predict_start(self) -> None:
        self._labels, self.written = {}, {}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        frames = batch["frames"]  # uint8 [T, V, 3, h, w]
        labels = {}
        for labeler in self.labelers:
            values, names = labeler.label_steps(frames, batch_size=self.hparams.batch_size)
            if not np.isfinite(values).all():
                raise ValueError(f"labeler {labeler.kind!r} produced non-finite labels for episode {batch['index']}")
            labels[labeler.label_embodiment] = values
            self._names[labeler.label_embodiment] = names
        self._labels[int(batch["index"])] = labels

    def _gathered(self) -> dict[int, dict[str, np.ndarray]]:
        if self.trainer.world_size == 1:
            return self._labels
        parts: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(parts, (self._labels, self._names))
        for _, names in parts:
            self._names.update(names)
        return {index: labels for part, _ in parts for index, labels in part.items()}

    def on_predict_epoch_end(self) -> None:
        labels = self._gathered()
        if self.trainer.is_global_zero:
            source_dir = self.trainer.datamodule.source
            for labeler in self.labelers:
                self.written[labeler.label_embodiment] = self._write(labeler, source_dir, labels)
        self.trainer.strategy.barrier("pseudo_labels_written")

    def _write(self, labeler: nn.Module, source_dir: str, labels: dict[int, dict[str, np.ndarray]]) -> dict:
        meta = load_sidecars(source_dir)["source"]
        emb = labeler.label_embodiment
        missing = sorted(set(range(meta["episodes"])) - set(labels))
        if missing:
            raise RuntimeError(f"no labels for episodes {missing[:10]} of {source_dir}: the predict run did not see "
                               "them all (do not limit predict batches when labelling)")

        def episodes() -> Iterator[Episode]:
            for index, ep in enumerate(read_episodes(source_dir)):
                yield Episode(frames=ep.frames, instruction=ep.instruction, embodiment=emb, fps=ep.fps,
                              actions=labels[index][emb], metadata=ep.metadata)

        name = f"{meta['name']}_{emb}"
        provenance = {
            "kind": labeler.kind,
            "labeler": f"{type(labeler).__module__}.{type(labeler).__qualname__}",
            "checkpoint": getattr(labeler, "checkpoint", None),
            "labeler_horizon": labeler.horizon,
            "from_source": meta["name"],
            "from_dir": str(source_dir),
            "from_embodiment": meta["embodiment"],
        }
        return write_source(
            episodes(), Path(self.hparams.output_dir) / name, source=name, horizon=meta["horizon"],
            modality=Modality(state_names=[], action_names=self._names[emb]), jpeg_quality=self.hparams.jpeg_quality,
            samples_per_shard=self.hparams.samples_per_shard, extra_metadata={"pseudo_labels": provenance},
        )
