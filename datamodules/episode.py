"""One recorded episode in memory: the unit that generators and converters hand to the shard writer.

Every producer of data (the embedded tabletop world, the Meta-World generator, the LeRobot converter) yields
``Episode`` objects; ``datamodules.shards.write_source`` turns a stream of them into WebDataset shards with one
sample per anchor step. Actionless video (human / neural tiers) has ``state = actions = None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Modality:
    """Named dimensions of an embodiment's flat state and action vectors (GR00T's modality.json, flattened).

    ``state_groups`` / ``action_groups`` map a group name (e.g. ``"joints"``, ``"gripper"``) to a ``(start, end)``
    slice of the flat vector; ``state_names`` / ``action_names`` name every dimension.
    """

    state_names: list[str]
    action_names: list[str]
    state_groups: dict[str, tuple[int, int]] = field(default_factory=dict)
    action_groups: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    @property
    def action_dim(self) -> int:
        return len(self.action_names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state_names": list(self.state_names),
            "action_names": list(self.action_names),
            "state_groups": {k: list(v) for k, v in self.state_groups.items()},
            "action_groups": {k: list(v) for k, v in self.action_groups.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Modality":
        return cls(
            state_names=list(d["state_names"]),
            action_names=list(d["action_names"]),
            state_groups={k: tuple(v) for k, v in d.get("state_groups", {}).items()},
            action_groups={k: tuple(v) for k, v in d.get("action_groups", {}).items()},
        )


@dataclass
class Episode:
    """A trajectory of T steps.

    ``frames[view]`` is uint8 ``[T, h, w, 3]`` (RGB) for every camera view; ``state`` is float32 ``[T, S]``;
    ``actions`` is float32 ``[T, A]`` where ``actions[t]`` is the command issued at step t (moving the world from
    frame t to frame t+1). Actionless episodes leave ``state`` and ``actions`` as None.

    ``privileged`` is float32 ``[T, P]``: what a simulator knows and a deployed robot does not (e.g. object and goal
    positions). It is never a policy input; it can serve as an auxiliary training target
    (``components.privileged_head``).
    """

    frames: dict[str, np.ndarray]
    instruction: str
    embodiment: str
    fps: float
    state: np.ndarray | None = None
    actions: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. task family, seed, success, noise level
    privileged: np.ndarray | None = None

    def __post_init__(self) -> None:
        lengths = {name: len(f) for name, f in self.frames.items()}
        if not lengths:
            raise ValueError("Episode needs at least one camera view in `frames`")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"Episode views have different lengths: {lengths}")
        for name, f in self.frames.items():
            if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
                raise ValueError(f"Episode view {name!r} must be uint8 [T, h, w, 3], got {f.dtype} {f.shape}")
        t = self.length
        for key in ("state", "actions", "privileged"):
            arr = getattr(self, key)
            if arr is not None and (arr.ndim != 2 or len(arr) != t):
                raise ValueError(f"Episode {key} must be [T={t}, D], got {arr.shape}")

    @property
    def length(self) -> int:
        return len(next(iter(self.frames.values())))

    @property
    def has_action(self) -> bool:
        return self.actions is not None


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
