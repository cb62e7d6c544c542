"""The Lightning side of pseudo-labelling (the labellers themselves: ``components/pseudo_labels.py``): labellers read
from checkpoints, and offline labelling into new shards.

Checkpoint labellers. ``CheckpointLatentActionLabeler`` (a ``LatentActionModule`` checkpoint) and
``CheckpointIDMLabeler`` (an ``InverseDynamicsModule`` checkpoint) rebuild the frozen model from the recipe the
vla-zoo CLI embeds in every checkpoint (instantiated with jsonargparse, as LightningCLI does) and its weights, and
take what the checkpoint knows (views, horizon, the IDM's action dims, slot and normaliser) as defaults:

    - class_path: lit_modules.labeling.CheckpointIDMLabeler
      init_args: {checkpoint: runs/idm/checkpoints/last.ckpt, embodiment: point_gripper, embodiment_id: 4}

Offline labelling: ``lightning predict --config recipes/label.yaml``. Frozen labellers label every step of every
episode of one source (``datamodules.episodes.EpisodeDataModule``), and each labeller's labels become the actions of a
NEW source written with ``datamodules.shards.write_source``: ``<output_dir>/<source>_<label_embodiment>`` (e.g.
``neural_latent``, ``neural_idm_point_gripper``), whose embodiment is the labeller's ``label_embodiment`` and whose
``source.json`` says under ``pseudo_labels`` which labeller and checkpoint produced them. A later recipe then reads it
as an ordinary source::

    - {name: neural_idm, shards: .cache/vla_zoo/labels/neural_idm_point_gripper, embodiment: idm_point_gripper,
       targets: [action]}

Per-step labels: IDM chunks predicted at every anchor are averaged by explicit step index
(``components.pseudo_labels.label_episode``); a latent label of step s is the LAM's raw (unnormalised: the mixture
normalises it like any action) latent of the frame pair (s, s+H), flattened. So the chunk of an offline latent source
at anchor t holds the latents of anchors t .. t+H-1, one per step, whereas the on-the-fly ``latent`` target is the
one latent of (t, t+H) laid over N steps: give the two their own embodiment names and slots.

Ranks label disjoint episodes; the labels (small arrays) are gathered to rank 0, which re-reads the source and
writes the new shards (frames are re-encoded as JPEG from the decoded source frames).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch import LightningModule
from torch import nn

from components.inverse_dynamics import InverseDynamicsModel
from components.latent_action import LatentActionModel
from components.pseudo_labels import IDMLabeler, LatentActionLabeler
from datamodules.episode import Episode, Modality
from datamodules.shards import load_sidecars, read_episodes, write_source
from lit_modules.checkpoint import CONFIG_KEY, MIXTURE_STATE_KEY, read_checkpoint


# ---------------------------------------------------------------------------------------------- checkpoints
def _instantiate(config: Any, base: Any, where: str) -> Any:
    """A ``{class_path, init_args}`` config (nested ones too) -> the object, the way LightningCLI builds it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "part", fail_untyped=False)  # as LightningCLI does for its model
    try:
        return parser.instantiate_classes(parser.parse_object({"part": config})).part
    except Exception as e:
        raise ValueError(f"{where}: cannot rebuild the component from its stored config: {e}") from e


def load_component(path: str, attribute: str = "model") -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A LightningModule checkpoint -> (the config of its ``attribute`` component, that component's state dict,
    the module's other init arguments). The config comes from the recipe the vla-zoo CLI embedded (or, failing
    that, from the hyper-parameters Lightning saved)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labeler checkpoint {path!r} not found: train it first (recipes/lam.yaml, "
                                "recipes/idm.yaml) or point `checkpoint` at an existing .ckpt")
    ckpt = read_checkpoint(path)  # weights_only: a crafted checkpoint is refused before it can run code
    init_args: dict[str, Any] = {}
    if CONFIG_KEY in ckpt:
        init_args = (yaml.safe_load(ckpt[CONFIG_KEY]).get("model") or {}).get("init_args") or {}
    hparams = dict(ckpt.get("hyper_parameters") or {})
    init_args = {**hparams, **init_args}
    if init_args.get(attribute) is None:
        raise KeyError(f"checkpoint {path!r} holds no config for its `{attribute}`: train it with the vla-zoo CLI "
                       "(`lightning fit --config ...`), which embeds the recipe in every checkpoint")
    prefix = f"{attribute}."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return init_args[attribute], state, {**init_args, MIXTURE_STATE_KEY: ckpt.get(MIXTURE_STATE_KEY)}


def load_latent_action_model(path: str) -> tuple[LatentActionModel, dict[str, Any]]:
    """A ``LatentActionModule`` checkpoint -> its trained model (quantiser included) and the module's arguments."""
    config, state, init_args = load_component(path, "model")
    model = config if isinstance(config, nn.Module) else _instantiate(config, LatentActionModel, path)
    quantizer = init_args.get("quantizer")  # a factory given to LatentActionModule, built in its configure_model
    if model.quantizer is None and quantizer is not None:
        model.quantizer = (quantizer() if callable(quantizer) else _instantiate(quantizer, nn.Module, path)).float()
    model.load_state_dict(state)
    return model, init_args


class CheckpointLatentActionLabeler(LatentActionLabeler):
    """A frozen ``LatentActionLabeler`` whose model is read from a ``LatentActionModule`` checkpoint.

    Args:
        checkpoint: the checkpoint (``recipes/lam.yaml``).
        embodiment_id, label_embodiment: as ``LatentActionLabeler``'s.
        view_indices, horizon: as ``LatentActionLabeler``'s; default: the checkpoint's.
    """

    def __init__(self, checkpoint: str, embodiment_id: int = 2, view_indices: Sequence[int] | None = None,
                 horizon: int | None = None, label_embodiment: str = "latent") -> None:
        model, stored = load_latent_action_model(checkpoint)
        super().__init__(model, embodiment_id=embodiment_id,
                         view_indices=view_indices if view_indices is not None else stored.get("view_indices", [0]),
                         horizon=horizon if horizon is not None else stored.get("horizon"),
                         label_embodiment=label_embodiment)
        self.checkpoint = checkpoint


class CheckpointIDMLabeler(IDMLabeler):
    """An ``IDMLabeler`` whose model is read from an ``InverseDynamicsModule`` checkpoint; the run's data state
    gives the defaults of ``action_dim``, ``idm_embodiment_id`` (the IDM's slot of ``embodiment``, else 0), the
    normaliser and the action names. Other arguments: ``IDMLabeler``'s."""

    def __init__(
        self,
        checkpoint: str,
        embodiment: str = "point_gripper",
        embodiment_id: int = 4,
        action_dim: int | None = None,
        idm_embodiment_id: int | None = None,
        view_indices: Sequence[int] | None = None,
        num_steps: int | None = None,
        num_samples: int = 1,
        seed: int = 0,
        normalizer: dict | None = None,
        label_embodiment: str | None = None,
    ) -> None:
        config, state, init_args = load_component(checkpoint, "model")
        model = config if isinstance(config, nn.Module) else _instantiate(config, InverseDynamicsModel, checkpoint)
        model.load_state_dict(state)
        data_state = init_args.get(MIXTURE_STATE_KEY) or {}
        known = data_state.get("embodiments", {})
        if known and embodiment not in known:
            raise ValueError(f"IDMLabeler: `embodiment` {embodiment!r} is not one the IDM in {checkpoint!r} was "
                             f"trained on ({sorted(known)})")
        modality = (data_state.get("modalities") or {}).get(embodiment) or {}
        super().__init__(
            model, action_dim=action_dim, embodiment=embodiment, embodiment_id=embodiment_id,
            idm_embodiment_id=idm_embodiment_id if idm_embodiment_id is not None else known.get(embodiment, 0),
            view_indices=view_indices, num_steps=num_steps, num_samples=num_samples, seed=seed,
            normalizer=normalizer if normalizer is not None else data_state.get("normalizers", {}).get(embodiment),
            action_names=modality.get("action_names"), label_embodiment=label_embodiment,
        )
        self.checkpoint = checkpoint


# ---------------------------------------------------------------------------------------------- offline labelling


class PseudoLabelWriter(LightningModule):
    """Args:
        labelers: frozen labelers with ``label_steps(frames [T, V, 3, h, w]) -> (labels [T, A], names)``,
            ``label_embodiment`` and ``kind`` (``components.pseudo_labels``' labellers, or the checkpoint ones above).
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
                                 "trained, frozen one (e.g. a CheckpointLatentActionLabeler with its `checkpoint`)")
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
