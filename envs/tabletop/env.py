"""Gymnasium environments of the tabletop world, one per embodiment, for closed-loop evaluation.

Observation (the project's env contract): ``{"images": {"scene", "wrist": uint8 [h, w, 3]}, "state": float32 [3],
"instruction": str}``. ``step`` puts ``success`` and ``task_family`` in ``info``; an episode terminates on success
and is truncated after ``max_episode_steps``. ``reset(seed=s)`` builds exactly the scene that ``make_world(s, ...)``
builds, which is how recorded episodes (``metadata["seed"]``) are replayed.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .embodiments import MODALITIES, make_embodiment
from .world import TASK_FAMILIES, TEMPLATES, VIEWS, WRIST_WINDOW, Renderer, World, make_world

_CHARSET = string.ascii_lowercase + " "
_MAX_INSTRUCTION = max(len(t) for ts in TEMPLATES.values() for t in ts) + 40  # room for two colour-noun phrases


class TabletopEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        embodiment: str = "point_gripper",
        image_size: int = 64,
        max_episode_steps: int = 80,
        task_families: tuple[str, ...] | list[str] = TASK_FAMILIES,
        visuals: str = "default",
        render_mode: str | None = None,
        wrist_window: float = WRIST_WINDOW,
        num_objects: int | None = None,
    ):
        """``num_objects``: every scene holds the target and ``num_objects - 1`` distractor objects (the difficulty
        knob; None: 2-4 objects, as in the pyramid's tiers)."""
        if embodiment not in MODALITIES:
            raise ValueError(f"Unknown tabletop embodiment {embodiment!r}; choose one of {sorted(MODALITIES)}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.embodiment = embodiment
        self.image_size = image_size
        self.max_episode_steps = max_episode_steps
        self.task_families = tuple(task_families)
        self.num_objects = num_objects
        self.visuals = visuals
        self.render_mode = render_mode
        self.views = VIEWS
        self.renderer = Renderer(image_size, wrist_window)  # a policy trained on a wider wrist camera sees one
        image = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(
            {
                "images": spaces.Dict({view: image for view in VIEWS}),
                "state": spaces.Box(*make_embodiment(embodiment).state_bounds()),
                "instruction": spaces.Text(max_length=_MAX_INSTRUCTION, min_length=1, charset=_CHARSET),
            }
        )
        # move dims in [-1, 1] (scaled by the embodiment's step), grip command in [0, 1] (> 0.5 closes)
        self.action_space = spaces.Box(np.array([-1, -1, 0], np.float32), np.array([1, 1, 1], np.float32))
        self.world: World | None = None
        self._frames: dict[str, np.ndarray] | None = None
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        episode_seed = seed if seed is not None else int(self.np_random.integers(2**63 - 1))
        families = self.task_families
        if options and "task_family" in options:
            families = (options["task_family"],)
        self.world = make_world(episode_seed, self.embodiment, self.visuals, families, self.num_objects)
        self._steps = 0
        return self._observation(), self._info()

    def step(self, action):
        if self.world is None:
            raise RuntimeError("TabletopEnv.step called before reset()")
        self.world.step(np.asarray(action, dtype=np.float64))
        self._steps += 1
        terminated = self.world.success
        truncated = not terminated and self._steps >= self.max_episode_steps
        return self._observation(), float(terminated), terminated, truncated, self._info()

    def render(self):
        if self.render_mode == "rgb_array" and self._frames is not None:
            return np.concatenate([self._frames[v] for v in VIEWS], axis=1)  # [h, 2w, 3]
        return None

    def _observation(self) -> dict[str, Any]:
        self._frames = self.renderer(self.world)
        return {"images": self._frames, "state": self.world.state(), "instruction": self.world.scene.instruction}

    def _info(self) -> dict[str, Any]:
        return {"success": self.world.success, "task_family": self.world.scene.family}


ENV_IDS = {
    "point_gripper": "vla_zoo/TabletopPointGripper-v0",
    "two_link_arm": "vla_zoo/TabletopTwoLinkArm-v0",
}


def register_envs() -> None:
    """Register one Gymnasium id per embodiment (idempotent)."""
    for embodiment, env_id in ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=TabletopEnv, kwargs={"embodiment": embodiment})


def make_env(task: str, seed: int, embodiment: str = "point_gripper", **kwargs: Any) -> TabletopEnv:
    """The world restricted to one task family (``"pick_place"`` or ``"push"``), for closed-loop evaluation
    (``envs.registry``); episodes are seeded by ``reset(seed=...)``, so ``seed`` is unused."""
    return TabletopEnv(embodiment=embodiment, task_families=(task,), **kwargs)


def resolve_tasks(tasks: Sequence[str] | str | None) -> list[str]:
    """Task families to evaluate: ``None`` for all, or a list / comma-separated string of names."""
    names = TASK_FAMILIES if tasks is None else tasks.split(",") if isinstance(tasks, str) else tasks
    unknown = sorted(set(names) - set(TASK_FAMILIES))
    if unknown:
        raise ValueError(f"unknown tabletop task families {unknown}; choose from {list(TASK_FAMILIES)}")
    return list(names)
