"""Meta-World's scripted experts wrapped as policies (the policy contract in CONTRACTS.md).

The experts are per-step proportional controllers reading privileged state (object and goal poses), so a policy is
bound to the env it drives. With ``horizon > 1`` the chunk is what the expert would issue over the next ``horizon``
steps, found by simulating ahead (``MetaWorldEnv.lookahead``): executing a full chunk open-loop then reproduces the
per-step expert exactly. ``noise`` adds Gaussian noise of that standard deviation to every action (before the
[-1, 1] clip), which degrades success gracefully: the knob behind the ``sim`` tier and the evaluator's tests.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from envs.metaworld.env import MetaWorldEnv
from envs.metaworld.tasks import MODALITY

# The experts' gains saturate the action on purpose (the env clips to [-1, 1]); their warning says nothing new.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", module=r"metaworld\.policies")


def scripted_expert(task: str) -> Any:
    """Meta-World's own scripted policy for ``task`` (an object with ``get_action(obs39) -> [4]``)."""
    from metaworld.policies import ENV_POLICY_MAP

    if task not in ENV_POLICY_MAP:
        raise KeyError(f"Meta-World has no scripted expert for {task!r}; known: {sorted(ENV_POLICY_MAP)}")
    return ENV_POLICY_MAP[task]()


class MetaWorldExpertPolicy:
    """The scripted expert of ``env``'s task as a policy emitting ``[horizon, 4]`` action chunks."""

    def __init__(self, env: MetaWorldEnv, noise: float = 0.0, horizon: int = 1, seed: int = 0) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.env = env.unwrapped
        if not isinstance(self.env, MetaWorldEnv):
            raise TypeError(f"MetaWorldExpertPolicy drives a MetaWorldEnv, got {type(self.env).__name__}")
        self.noise = noise
        self.horizon = horizon
        self.expert = scripted_expert(self.env.task)
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        """Nothing to forget: the expert is stateless and the noise stream runs on across episodes."""

    def get_action(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.horizon == 1:
            chunk = np.asarray(self.expert.get_action(self.env.raw_observation), dtype=np.float32)[None]
        else:
            chunk = self.env.lookahead(self.expert.get_action, self.horizon)
        if self.noise > 0:
            chunk = chunk + self.noise * self.rng.standard_normal(chunk.shape)
        return {"actions": np.clip(chunk, -1.0, 1.0).astype(np.float32)}  # [H, 4]

    def metadata(self) -> dict[str, Any]:
        return {
            "embodiments": {
                self.env.embodiment: {
                    "state_dim": MODALITY.state_dim,
                    "action_dim": MODALITY.action_dim,
                    "image_keys": list(self.env.views),
                    "image_size": [self.env.height, self.env.width],
                }
            },
            "horizon": self.horizon,
        }
