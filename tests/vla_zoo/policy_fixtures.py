"""Test support: a small deterministic numpy policy following the policy contract, servable with
``python -m vla_zoo.deploy.server --policy tests.vla_zoo.policy_fixtures:make_policy``."""

from __future__ import annotations

import time
import zlib
from typing import Any

import numpy as np

from datamodules.episode import Episode

VIEWS = ["scene", "wrist"]
EMBODIMENTS = {"point_gripper": (3, 3), "two_link_arm": (3, 3)}  # name -> (state_dim, action_dim)


class LinearTestPolicy:
    """Actions are a fixed random function of every observation field (both views, state, instruction,
    embodiment) and of the number of ``reset()`` calls, so a reply equal to the local one proves that the whole
    observation crossed the wire intact. ``delay_s`` simulates a slow model."""

    def __init__(self, image_size: int = 64, horizon: int = 8, delay_s: float = 0.0, seed: int = 0) -> None:
        self.image_size = image_size
        self.horizon = horizon
        self.delay_s = delay_s
        self.resets = 0
        rng = np.random.default_rng(seed)
        num_features = len(VIEWS) * 3 + 3 + 1
        self.weights = {
            name: rng.normal(size=(horizon, action_dim, num_features)) for name, (_, action_dim) in EMBODIMENTS.items()
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "embodiments": {
                name: {"state_dim": s, "action_dim": a, "image_keys": list(VIEWS), "image_size": [self.image_size] * 2}
                for name, (s, a) in EMBODIMENTS.items()
            },
            "horizon": self.horizon,
        }

    def reset(self) -> None:
        self.resets += 1

    def get_action(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.delay_s:
            time.sleep(self.delay_s)
        colour_means = [observation["images"][v].reshape(-1, 3).mean(0) / 255.0 for v in VIEWS]
        text = zlib.crc32(observation["instruction"].encode()) / 2**32
        features = np.concatenate([*colour_means, observation["state"].astype(np.float64), [text]])
        actions = np.tanh(self.weights[observation["embodiment"]] @ features) + 0.01 * self.resets  # [H, A]
        return {"actions": actions.astype(np.float32)}


def make_policy(**kwargs: Any) -> LinearTestPolicy:
    return LinearTestPolicy(**kwargs)


def make_observation(rng: np.random.Generator, embodiment: str = "point_gripper", image_size: int = 64) -> dict[str, Any]:
    state_dim, _ = EMBODIMENTS[embodiment]
    return {
        "images": {v: rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for v in VIEWS},
        "state": rng.normal(size=state_dim).astype(np.float32),
        "instruction": f"pick up the cube {int(rng.integers(100))}",
        "embodiment": embodiment,
    }


def make_episodes(rng: np.random.Generator, lengths: list[int], embodiment: str = "point_gripper", image_size: int = 8) -> list[Episode]:
    return [
        Episode(
            frames={v: rng.integers(0, 256, (t, image_size, image_size, 3), dtype=np.uint8) for v in VIEWS},
            instruction="push the block", embodiment=embodiment, fps=10.0,
            state=rng.normal(size=(t, 3)).astype(np.float32), actions=rng.normal(size=(t, 3)).astype(np.float32),
        )
        for t in lengths
    ]


def lerobot_replay(root: str, embodiment: str, horizon: int, stride: int, image_size: int) -> Any:
    """A ReplayPolicy over a LeRobot dataset folder (for the open-loop command's --lerobot path)."""
    from datamodules.lerobot import load_lerobot_episodes
    from vla_zoo.deploy.replay import ReplayPolicy

    episodes, _ = load_lerobot_episodes(root, embodiment=embodiment, image_size=image_size)
    return ReplayPolicy(list(episodes), horizon=horizon, stride=stride)
