"""The embedded procedural tabletop world: the project's default data and closed-loop test bed.

Importing this package registers the Gymnasium ids ``vla_zoo/TabletopPointGripper-v0`` and
``vla_zoo/TabletopTwoLinkArm-v0``.
"""

from .embodiments import MODALITIES, PointGripper, TwoLinkArm, make_embodiment
from .env import ENV_IDS, TabletopEnv, register_envs
from .experts import ExpertPolicy, ScriptedExpert
from .pyramid import DEFAULT_EPISODES, TabletopPyramid
from .tiers import FPS, TIERS, apply_artefacts, episode_seed, generate_episodes, rollout
from .world import TASK_FAMILIES, VIEWS, WRIST_WINDOW, Renderer, Scene, Visuals, World, make_world, sample_scene

register_envs()

__all__ = [
    "DEFAULT_EPISODES",
    "ENV_IDS",
    "FPS",
    "MODALITIES",
    "TASK_FAMILIES",
    "TIERS",
    "VIEWS",
    "WRIST_WINDOW",
    "ExpertPolicy",
    "PointGripper",
    "Renderer",
    "Scene",
    "ScriptedExpert",
    "TabletopEnv",
    "TabletopPyramid",
    "TwoLinkArm",
    "Visuals",
    "World",
    "apply_artefacts",
    "episode_seed",
    "generate_episodes",
    "make_embodiment",
    "make_world",
    "register_envs",
    "rollout",
    "sample_scene",
]
