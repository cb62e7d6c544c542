"""A policy that plays back recorded actions: checks an environment or robot integration without any model.

If replaying the demonstrations does not solve the task in your environment, the problem is the integration
(action units, order of dimensions, control rate, camera naming), not the policy. ``ReplayPolicy`` follows the
policy contract, so it can be served by ``vla_zoo.deploy.server`` and driven through ``RemotePolicy`` exactly like a
trained checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datamodules.episode import Episode


class ReplayPolicy:
    """Returns the recorded action chunk of the current episode, one chunk per ``get_action`` call.

    ``reset()`` (called at episode start) moves to the next episode, cycling through ``episodes``; a call before any
    ``reset()`` plays episode 0. Call ``k`` returns ``actions[k * stride : k * stride + horizon]``: with the default
    ``stride = horizon`` that is what a caller executing the whole chunk needs; a caller that re-plans every
    ``n`` steps (open-loop evaluation with ``execute_every=n``) sets ``stride = n``. Steps past the end of the
    episode repeat its last action, i.e. hold the final command.
    """

    def __init__(self, episodes: Sequence[Episode], horizon: int, stride: int | None = None) -> None:
        if not episodes:
            raise ValueError("ReplayPolicy needs at least one episode")
        actionless = [i for i, ep in enumerate(episodes) if ep.actions is None or ep.state is None]
        if actionless:
            raise ValueError(f"ReplayPolicy needs episodes with state and actions; episodes {actionless} have none")
        if horizon < 1 or (stride is not None and stride < 1):
            raise ValueError(f"horizon and stride must be >= 1, got horizon={horizon}, stride={stride}")
        self.episodes = list(episodes)
        self.horizon = horizon
        self.stride = horizon if stride is None else stride
        self._episode = 0
        self._step = 0
        self._started = False
        self._metadata = self._build_metadata()

    @classmethod
    def from_shards(cls, source_dir: str | Path, horizon: int | None = None, stride: int | None = None) -> "ReplayPolicy":
        """Replay the episodes stored in a shard directory; ``horizon`` defaults to the one in its source.json."""
        from datamodules.shards import read_episodes

        source_dir = Path(source_dir)
        if horizon is None:
            source_json = source_dir / "source.json"
            if not source_json.exists():
                raise FileNotFoundError(f"{source_json} not found: is {source_dir} a shard directory? Or pass horizon=")
            horizon = int(json.loads(source_json.read_text())["horizon"])
        return cls(list(read_episodes(source_dir)), horizon=horizon, stride=stride)

    def _build_metadata(self) -> dict[str, Any]:
        embodiments: dict[str, dict[str, Any]] = {}
        for i, ep in enumerate(self.episodes):
            first = next(iter(ep.frames.values()))
            spec = {
                "state_dim": int(ep.state.shape[1]),
                "action_dim": int(ep.actions.shape[1]),
                "image_keys": sorted(ep.frames),
                "image_size": [int(first.shape[1]), int(first.shape[2])],
            }
            if embodiments.setdefault(ep.embodiment, spec) != spec:
                raise ValueError(
                    f"episode {i} of embodiment {ep.embodiment!r} has {spec}, earlier episodes of the same embodiment "
                    f"have {embodiments[ep.embodiment]}"
                )
        return {"embodiments": embodiments, "horizon": self.horizon}

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def reset(self) -> None:
        if self._started:
            self._episode = (self._episode + 1) % len(self.episodes)
        self._started = True
        self._step = 0

    @property
    def current_episode(self) -> int:
        return self._episode

    def get_action(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        self._started = True
        episode = self.episodes[self._episode]
        if observation["embodiment"] != episode.embodiment:
            raise ValueError(
                f"replaying episode {self._episode} of embodiment {episode.embodiment!r}, but the observation is from "
                f"{observation['embodiment']!r}"
            )
        rows = np.minimum(np.arange(self._step, self._step + self.horizon), episode.length - 1)  # hold the end
        self._step += self.stride
        return {"actions": episode.actions[rows].astype(np.float32)}  # [H, A]
