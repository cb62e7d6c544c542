"""Pseudo-labelling actionless episodes with an inverse dynamics model, one label per step.

Anchored at every step t, the IDM predicts the chunk a_t .. a_{t+H-1} from frames t and min(t + H, T - 1) (the
same pairing as the shard writer's samples). Step s is then covered by up to H chunks (anchors s - H + 1 .. s);
its label is the mean of those predictions and its spread their standard deviation, a per-step confidence: where
the overlapping chunks (and the flow head's samples) disagree, the label is unreliable.

Every prediction is stored at its explicit step index ``anchor + k``, taken from the anchors handed to the
predictor, never from the order in which results come back. (GR00T's public labeller gathers chunks from a thread
pool in completion order, so labels can land on the wrong steps.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from datamodules.normalization import Normalizer

#: ``(frames_t uint8 [N, V, 3, h, w], frames_tH uint8 [N, V, 3, h, w], anchors long [N]) -> chunk [N, H, >= A]``
ChunkPredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | np.ndarray"]


class EpisodeLabels(NamedTuple):
    actions: np.ndarray  # float32 [T, A]: mean of the overlapping predictions (NaN on steps no anchor covers)
    spread: np.ndarray  # float32 [T, A]: their standard deviation (0 where a single prediction covers the step)
    counts: np.ndarray  # int64 [T]: how many chunk predictions cover each step


def episode_frames(frames: Mapping[str, np.ndarray] | np.ndarray | torch.Tensor,
                   views: Sequence[str] | None = None) -> torch.Tensor:
    """Frames of one episode as uint8 ``[T, V, 3, h, w]``: from ``Episode.frames`` (view -> ``[T, h, w, 3]``, stacked
    in ``views`` order, default the mapping's order) or an array already ``[T, V, 3, h, w]``."""
    if isinstance(frames, Mapping):
        names = list(views) if views is not None else list(frames)
        missing = [v for v in names if v not in frames]
        if missing:
            raise KeyError(f"episode has no view(s) {missing}; it has {list(frames)}")
        frames = np.stack([frames[v] for v in names], axis=1).transpose(0, 1, 4, 2, 3)  # [T, V, 3, h, w]
    frames = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if frames.dim() != 5 or frames.shape[2] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"episode frames must be uint8 [T, V, 3, h, w], got {frames.dtype} {tuple(frames.shape)}")
    return frames


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
        chunk = predict_chunk(frames[t], frames[(t + horizon).clamp(max=T - 1)], t)
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
