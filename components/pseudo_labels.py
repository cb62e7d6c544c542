"""Pseudo-label targets: how actionless data becomes flow-matching targets of extra embodiment slots.

A pseudo-labeler is an ``nn.Module`` with a ``kind`` (``"latent"``, ``"idm"``, ...) and
``targets(batch, select) -> PseudoTargets | None``: for the batch rows ``select``-ed (the samples whose source
declares this kind among its ``targets``), it returns action-chunk-shaped targets for its own embodiment slot.
``VLAPolicy`` concatenates them with the real-action rows; the action head never knows which is which.

Two labelers, as in GR00T N1 (paper Sec. 2.2):

- ``LatentActionLabeler`` (kind ``latent``): the pre-quantisation latent ``[N, D]`` of a latent-action model for
  the frame pair (t, t+H), laid into the first N steps and D dims of the chunk. Either frozen (a trained model) or
  co-trained inside the policy's fit (``co_train``): then its own loss (the standalone model's,
  ``components.latent_action.LatentActionObjective``) is returned as ``aux_loss`` and its latent, detached, is the
  target, so the action head's loss never shapes the latent space it is asked to predict.
- ``IDMLabeler`` (kind ``idm``): a frozen inverse dynamics model samples the H actions between frames t and t+H with
  a fixed noise seed.

Both also label whole episodes step by step (``label_steps``; IDM chunks through ``label_episode``, which puts
every chunk prediction on its own step) for offline labelling into new shards. Labellers read from checkpoints
and the offline writer are the Lightning side of labelling: ``lit_modules/labeling.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from components.inverse_dynamics import InverseDynamicsModel
from components.latent_action import LatentActionModel, LatentActionObjective, frame_pair
from datamodules import schema
from datamodules.episode import episode_frames
from datamodules.normalization import Normalizer


@dataclass
class PseudoTargets:
    """Extra training rows. ``index`` picks the batch rows (and so the VL tokens) they belong to."""

    index: torch.Tensor  # [N] long, rows of the batch
    actions: torch.Tensor  # [N, H, A_max] normalised targets
    action_mask: torch.Tensor  # [N, H, A_max] bool
    embodiment_id: torch.Tensor  # [N] long: the pseudo-label kind's own slot
    state: torch.Tensor | None = None  # [N, S_max]; None -> zeros
    name: str = "pseudo"  # for logging
    aux_loss: torch.Tensor | None = None  # the labeler's own training loss when it is co-trained


def _freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


class _Labeler(nn.Module):
    """Shared by the labelers: a frozen model stays in eval mode and out of the optimiser whatever the Trainer does
    (Lightning puts the whole LightningModule in train mode at the start of every epoch)."""

    frozen: bool = True

    def train(self, mode: bool = True) -> "_Labeler":
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    @staticmethod
    def _views(images: torch.Tensor, view_indices: Sequence[int] | None, name: str) -> torch.Tensor:
        if view_indices is None:
            return images
        if max(view_indices) >= images.shape[-4]:
            raise ValueError(f"{name}: view_indices {list(view_indices)} but the batch has {images.shape[-4]} views")
        return images[..., list(view_indices), :, :, :]

    @staticmethod
    def _place(values: torch.Tensor, horizon: int, max_action_dim: int, steps: int, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, steps, dims] -> zero-padded actions [n, H, A_max] and their mask."""
        n = values.shape[0]
        actions = values.new_zeros(n, horizon, max_action_dim)
        mask = torch.zeros(n, horizon, max_action_dim, dtype=torch.bool, device=values.device)
        actions[:, :steps, :dims] = values[:, :steps, :dims]
        mask[:, :steps, :dims] = True
        return actions, mask


# ---------------------------------------------------------------------------------------------- episodes
def anchor_pairs(frames: torch.Tensor, anchors: torch.Tensor, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``[T, ...]`` at each anchor t and at ``min(t + horizon, T - 1)``: the pairs a labeller sees (the shard
    writer's pairing, clipped at the episode's last frame)."""
    return frames[anchors], frames[(anchors + horizon).clamp(max=frames.shape[0] - 1)]


#: ``(frames_t uint8 [N, V, 3, h, w], frames_tH uint8 [N, V, 3, h, w], anchors long [N]) -> chunk [N, H, >= A]``
ChunkPredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | np.ndarray"]


class EpisodeLabels(NamedTuple):
    actions: np.ndarray  # float32 [T, A]: mean of the overlapping predictions (NaN on steps no anchor covers)
    spread: np.ndarray  # float32 [T, A]: their standard deviation (0 where a single prediction covers the step)
    counts: np.ndarray  # int64 [T]: how many chunk predictions cover each step


def label_episode(
    predict_chunk: ChunkPredictor,
    frames: Mapping[str, np.ndarray] | np.ndarray | torch.Tensor,
    horizon: int,
    *,
    stride: int = 1,
    anchors: Iterable[int] | None = None,
    batch_size: int = 64,
    action_dim: int | None = None,
    normalizer: Normalizer | None = None,
    views: Sequence[str] | None = None,
) -> EpisodeLabels:
    """Label every step of one episode with overlapping IDM chunk predictions.

    Anchored at every step t, the IDM predicts the chunk a_t .. a_{t+H-1} from frames t and min(t + H, T - 1)
    (``anchor_pairs``). Step s is then covered by up to H chunks (anchors s - H + 1 .. s); its label is the mean of
    those predictions and its spread their standard deviation, a per-step confidence. Every prediction is stored at
    its explicit step ``anchor + k``, taken from the anchors handed to the predictor, never from the order in which
    results come back (GR00T's public labeller gathers chunks in completion order, so labels can land on the wrong
    steps).

    Args:
        predict_chunk: the IDM as a function of a batch of frame pairs and their anchor steps, e.g.
            ``lambda x_t, x_tH, t: idm.predict(x_t, x_tH)``; returns chunks ``[N, H, A_max]``.
        frames: the episode's frames (see ``episode_frames``).
        horizon: H, the chunk length the IDM was trained with (frame t+H is clipped to the last frame).
        stride: anchor every ``stride`` steps (1 = every step); must be <= H so that every step is covered.
        anchors: explicit anchor steps, in any order (overrides ``stride``).
        batch_size: anchors per ``predict_chunk`` call.
        action_dim: real action dims to keep (default: the normaliser's, else all the predictor returns).
        normalizer: the embodiment's normaliser; predictions are un-normalised (to its units) before averaging.
        views: view order when ``frames`` is an ``Episode.frames`` mapping.
    """
    frames = episode_frames(frames, views)
    T = frames.shape[0]
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if anchors is None:
        if not 1 <= stride <= horizon:
            raise ValueError(f"stride must be in [1, horizon={horizon}] so that every step is labelled, got {stride}")
        anchors = range(0, T, stride)
    anchors = torch.as_tensor(list(anchors), dtype=torch.long)
    if anchors.numel() and (anchors.min() < 0 or anchors.max() >= T):
        raise ValueError(f"anchors must lie in [0, {T - 1}] for an episode of {T} steps")
    if anchors.unique().numel() != anchors.numel():
        raise ValueError("anchors contain duplicates: each anchor step's chunk is predicted once")
    if action_dim is None and normalizer is not None and normalizer.dim("actions"):
        action_dim = normalizer.dim("actions")

    # by_offset[s, k] = the prediction for step s made by the chunk anchored at s - k (NaN: no such chunk)
    by_offset: np.ndarray | None = None
    for start in range(0, anchors.numel(), batch_size):
        t = anchors[start:start + batch_size]  # [N]
        chunk = predict_chunk(*anchor_pairs(frames, t, horizon), t)
        chunk = chunk.detach().cpu().float().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk, np.float32)
        if chunk.ndim != 3 or chunk.shape[0] != t.numel() or chunk.shape[1] < horizon:
            raise ValueError(f"predict_chunk must return [N={t.numel()}, H={horizon}, A], got {chunk.shape}")
        chunk = chunk[:, :horizon, :action_dim]  # [N, H, A]
        if normalizer is not None:
            chunk = normalizer.unnormalize(chunk, "actions")
        if by_offset is None:
            by_offset = np.full((T, horizon, chunk.shape[2]), np.nan)
        step = t.numpy()[:, None] + np.arange(horizon)  # [N, H]: the explicit step of every prediction
        offset = np.broadcast_to(np.arange(horizon), step.shape)
        inside = step < T  # predictions past the episode end have no step to label
        by_offset[step[inside], offset[inside]] = chunk[inside]
    if by_offset is None:
        raise ValueError("no anchors to label: the episode is empty or `anchors` is")

    counts = (~np.isnan(by_offset[..., 0])).sum(1)  # [T]
    covered = counts > 0
    labels = np.full(by_offset[:, 0].shape, np.nan)
    spread = np.full(by_offset[:, 0].shape, np.nan)
    labels[covered] = np.nanmean(by_offset[covered], axis=1)
    spread[covered] = np.nanstd(by_offset[covered], axis=1)
    return EpisodeLabels(labels.astype(np.float32), spread.astype(np.float32), counts.astype(np.int64))


# ---------------------------------------------------------------------------------------------- latent actions
class LatentActionLabeler(_Labeler):
    """Latent actions of a LAM as targets of the ``latent`` embodiment slot.

    Args:
        model: a ``LatentActionModel`` (fresh when co-trained; trained, with fitted target statistics, when frozen;
            ``lit_modules.labeling.CheckpointLatentActionLabeler`` reads one from a ``LatentActionModule`` checkpoint).
        embodiment_id: the action-head slot of latent actions (must not be a real embodiment's slot).
        view_indices: the batch views the LAM sees (default ``[0]``).
        co_train: train the LAM inside the policy's fit, on the rows whose source declares ``latent``, with the
            standalone model's objective (``LatentActionObjective``; the arguments below): its loss times
            ``loss_weight`` becomes ``aux_loss``, and the targets are normalised by the statistics it tracks (kept
            in the model's buffers, so the checkpoint's LAM is usable frozen afterwards).
        loss_weight: weight of the LAM's loss in the policy's total loss.
        quantizer_loss_weight, change_weight, stats_momentum, action_loss_weight, num_embodiments,
            labelled_fraction, max_action_dim: ``LatentActionObjective``'s (co-training only; the readout's chunk
            length is ``horizon``).
        horizon: H of the frame pairs (offline labelling, ``label_steps``).
        label_embodiment: embodiment name of offline-labelled shards.
    """

    kind = "latent"

    def __init__(
        self,
        model: LatentActionModel,
        embodiment_id: int = 2,
        view_indices: Sequence[int] | None = None,
        co_train: bool = False,
        loss_weight: float = 1.0,
        quantizer_loss_weight: float = 1.0,
        change_weight: float = 1.0,
        stats_momentum: float = 0.05,
        action_loss_weight: float = 0.0,
        num_embodiments: int = 1,
        labelled_fraction: float = 1.0,
        max_action_dim: int | None = None,
        horizon: int | None = None,
        label_embodiment: str = "latent",
    ) -> None:
        super().__init__()
        self.model = model
        self.checkpoint: str | None = None  # where the model was read from (offline labels' provenance)
        self.embodiment_id = embodiment_id
        self.view_indices = list(view_indices if view_indices is not None else [0])
        self.horizon = horizon
        self.co_train, self.frozen = co_train, not co_train
        self.loss_weight = loss_weight
        self.label_embodiment = label_embodiment
        self.objective: LatentActionObjective | None = None
        if co_train:
            try:
                self.objective = LatentActionObjective(
                    model.num_latent_tokens, model.latent_dim, change_weight=change_weight,
                    quantizer_loss_weight=quantizer_loss_weight, action_loss_weight=action_loss_weight,
                    num_embodiments=num_embodiments, horizon=self.horizon, max_action_dim=max_action_dim,
                    labelled_fraction=labelled_fraction, stats_momentum=stats_momentum,
                )
            except ValueError as e:
                raise ValueError(f"LatentActionLabeler: {e}") from e
        if len(self.view_indices) != model.num_views:
            raise ValueError(f"LatentActionLabeler: view_indices {self.view_indices} select {len(self.view_indices)} "
                             f"views but the LAM was built for num_views={model.num_views}")
        if self.frozen:
            if not bool(model.target_stats_fitted):
                raise ValueError(
                    "LatentActionLabeler: the frozen LAM has no fitted target statistics; read a trained "
                    "recipes/lam.yaml checkpoint (lit_modules.labeling.CheckpointLatentActionLabeler), call "
                    "model.fit_target_stats(...), or set co_train"
                )
            _freeze(model)

    def _frames(self, batch: dict, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return frame_pair(batch[schema.IMAGES][index], self.view_indices, "LatentActionLabeler")

    def _normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.model.target_mean) / self.model.target_std

    def _co_train(self, batch: dict, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LAM's training step on the rows ``index``: (its weighted loss, the detached latent ``[n, N, D]``)."""
        x_t, x_tH = self._frames(batch, index)
        rows = lambda key: batch[key][index] if key in batch else None  # noqa: E731
        labelled = None
        if self.objective.action_readout is not None:
            try:
                labelled = self.objective.labelled(rows(schema.HAS_ACTION), rows(schema.EPISODE))
            except ValueError as e:
                raise ValueError(f"LatentActionLabeler: {e}") from e
        out = self.objective(self.model, x_t, x_tH, rows(schema.ACTIONS), rows(schema.ACTION_MASK),
                             rows(schema.EMBODIMENT_ID), labelled)
        # float: under bf16 autocast the latent is bf16, and the head's targets are normalised in fp32
        return self.loss_weight * out["loss"], out["z"].detach().float()

    def targets(self, batch: dict, select: torch.Tensor) -> PseudoTargets | None:
        index = select.nonzero(as_tuple=True)[0]
        train_lam = self.co_train and self.training
        if not index.numel() and not train_lam:
            return None
        horizon, max_action_dim = batch[schema.ACTIONS].shape[1:]
        n, d = self.model.num_latent_tokens, self.model.latent_dim
        if n > horizon:
            raise ValueError(f"LatentActionLabeler: the LAM's num_latent_tokens ({n}) exceeds the action horizon "
                             f"({horizon}); lower the LAM's `num_latent_tokens` or raise `data.init_args.horizon` "
                             "(and the action head's `horizon`)")
        if d > max_action_dim:
            raise ValueError(f"LatentActionLabeler: the LAM's latent_dim ({d}) exceeds max_action_dim "
                             f"({max_action_dim}); lower the LAM's `latent_dim` or raise `data.init_args.max_action_dim` "
                             "(and the action head's `max_action_dim`)")
        aux = None
        if train_lam:
            if not index.numel():
                # No sample asks for latents on this rank; the objective still joins the ranks' collectives.
                aux = self.objective.idle(self.model)
                return PseudoTargets(index, batch[schema.ACTIONS][:0], batch[schema.ACTION_MASK][:0],
                                     batch[schema.EMBODIMENT_ID][:0], name=self.kind, aux_loss=aux)
            # The latent is detached: the head's loss must not shape the latent space it learns to predict.
            aux, z = self._co_train(batch, index)
        else:
            with torch.no_grad():
                z = self.model.encode(*self._frames(batch, index)).float()
        actions, mask = self._place(self._normalise(z), horizon, max_action_dim, n, d)
        slot = torch.full_like(index, self.embodiment_id)
        return PseudoTargets(index, actions, mask, slot, name=self.kind, aux_loss=aux)

    # ------------------------------------------------------------------ offline
    @torch.no_grad()
    def label_steps(self, frames: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
        """One episode's frames uint8 ``[T, V, 3, h, w]`` -> per-step labels ``[T, N * D]`` (the raw, unnormalised
        latent of the pair (s, min(s + H, T - 1)), flattened) and their names."""
        if self.horizon is None:
            raise ValueError("LatentActionLabeler.label_steps needs the LAM's frame gap: set `horizon`")
        frames = self._views(frames, self.view_indices, "LatentActionLabeler")
        device = self.model.target_mean.device
        out = []
        for steps in torch.arange(frames.shape[0]).split(batch_size):
            x_t, x_tH = anchor_pairs(frames, steps, self.horizon)
            out.append(self.model.encode(x_t.to(device).float() / 255.0, x_tH.to(device).float() / 255.0))
        z = torch.cat(out).flatten(1).cpu().numpy().astype(np.float32)
        names = [f"latent_{i}_{j}" for i in range(self.model.num_latent_tokens) for j in range(self.model.latent_dim)]
        return z, names


# ---------------------------------------------------------------------------------------------- inverse dynamics
class IDMLabeler(_Labeler):
    """A frozen inverse dynamics model's action chunks as targets of its own embodiment slot (e.g. ``idm``).

    Args:
        model: an ``InverseDynamicsModel`` (``lit_modules.labeling.CheckpointIDMLabeler`` reads one, with its action
            dims, slot and normaliser, from an ``InverseDynamicsModule`` checkpoint).
        action_dim: real action dims of the IDM's embodiment (default: the normaliser's).
        embodiment: the embodiment the IDM was trained on (names the offline labels' embodiment).
        embodiment_id: the policy's action-head slot of these labels.
        idm_embodiment_id: the IDM head's own slot for ``embodiment``.
        view_indices: the batch views passed to the IDM (default: all, in the batch's order, which must then be the
            order the IDM was trained with).
        num_steps: Euler steps of the IDM's flow head (default: the head's).
        num_samples: flow samples averaged into each label (their mean estimates E[a | frames], the least-squared-
            error label); 1 = a single draw.
        seed: the fixed noise seed: a frame pair always gets the same label.
        normalizer: the IDM embodiment's normaliser as a dict; ``label_steps`` un-normalises with it. Targets for
            the policy stay in the IDM's normalised units.
        action_names: names of the action dims in offline labels (default ``action_<i>``).
        label_embodiment: embodiment name of offline-labelled shards (default ``idm_<embodiment>``).
    """

    kind = "idm"

    def __init__(
        self,
        model: InverseDynamicsModel,
        action_dim: int | None = None,
        embodiment: str = "point_gripper",
        embodiment_id: int = 4,
        idm_embodiment_id: int = 0,
        view_indices: Sequence[int] | None = None,
        num_steps: int | None = None,
        num_samples: int = 1,
        seed: int = 0,
        normalizer: dict | None = None,
        action_names: Sequence[str] | None = None,
        label_embodiment: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.checkpoint: str | None = None  # where the model was read from (offline labels' provenance)
        self.embodiment, self.embodiment_id = embodiment, embodiment_id
        self.normalizer = Normalizer.from_dict(normalizer) if normalizer is not None else None
        if action_dim is None and self.normalizer is not None:
            action_dim = self.normalizer.dim("actions")
        if not action_dim:
            raise ValueError("IDMLabeler: `action_dim` is unknown; give it, or a normalizer (a checkpoint of a run with "
                             "a MixtureDataModule carries both: lit_modules.labeling.CheckpointIDMLabeler)")
        self.action_dim = int(action_dim)
        self.idm_embodiment_id = int(idm_embodiment_id)
        self.action_names = list(action_names or [f"action_{i}" for i in range(self.action_dim)])
        self.view_indices = list(view_indices) if view_indices is not None else None
        if num_samples < 1:
            raise ValueError(f"IDMLabeler: num_samples must be >= 1 (1: one flow sample per label), got {num_samples}")
        self.num_steps, self.num_samples, self.seed = num_steps, num_samples, seed
        self.label_embodiment = label_embodiment or f"idm_{embodiment}"
        _freeze(model)

    @property
    def horizon(self) -> int:
        return self.model.horizon

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, x_tH: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[n, V, 3, h, w]`` at t and t+H -> normalised chunks ``[n, H, action_dim]``."""
        x_t = self._views(x_t, self.view_indices, "IDMLabeler")
        x_tH = self._views(x_tH, self.view_indices, "IDMLabeler")
        generator = torch.Generator(device=x_t.device).manual_seed(self.seed)
        slot = torch.full((x_t.shape[0],), self.idm_embodiment_id, dtype=torch.long, device=x_t.device)
        chunk = self.model.predict(x_t, x_tH, slot, num_steps=self.num_steps, generator=generator,
                                   num_samples=self.num_samples)
        return chunk[..., : self.action_dim]

    def targets(self, batch: dict, select: torch.Tensor) -> PseudoTargets | None:
        index = select.nonzero(as_tuple=True)[0]
        if not index.numel():
            return None
        horizon, max_action_dim = batch[schema.ACTIONS].shape[1:]
        if self.horizon != horizon:
            raise ValueError(f"IDMLabeler: the IDM predicts {self.horizon}-step chunks but the data's horizon is "
                             f"{horizon}; `data.init_args.horizon` must equal the IDM head's `horizon`")
        if self.action_dim > max_action_dim:
            raise ValueError(f"IDMLabeler: the IDM's action_dim ({self.action_dim}) exceeds max_action_dim "
                             f"({max_action_dim}); raise `data.init_args.max_action_dim` and the head's")
        images = batch[schema.IMAGES][index]  # [n, 2, V, 3, h, w]
        chunk = self.predict(images[:, 0], images[:, 1])
        actions, mask = self._place(chunk, horizon, max_action_dim, horizon, self.action_dim)
        return PseudoTargets(index, actions, mask, torch.full_like(index, self.embodiment_id), name=self.kind)

    # ------------------------------------------------------------------ offline
    @torch.no_grad()
    def label_steps(self, frames: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
        """One episode's frames uint8 ``[T, V, 3, h, w]`` -> per-step actions ``[T, action_dim]`` in the IDM
        embodiment's units (overlapping chunk predictions averaged by step index), and their names."""
        device = next(self.model.parameters()).device
        labels = label_episode(lambda x_t, x_tH, t: self.predict(x_t.to(device), x_tH.to(device)), frames,
                               self.horizon, batch_size=batch_size, action_dim=self.action_dim,
                               normalizer=self.normalizer)
        return labels.actions, self.action_names
