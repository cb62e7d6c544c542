"""Meta-World v3 (installed with the ``sim`` extra): a gymnasium env in the project's observation contract, the
scripted experts as policies, and the demonstration generator writing shards per tier.

MuJoCo chooses its OpenGL platform once, when it is first imported: importing this package first sets the headless
default ``MUJOCO_GL=egl`` (``osmesa`` also works; set it in the environment to override).
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from envs.metaworld.tasks import EMBODIMENT, INSTRUCTIONS, MODALITY, MT10, instruction_for, resolve_tasks

__all__ = ["EMBODIMENT", "INSTRUCTIONS", "MODALITY", "MT10", "instruction_for", "resolve_tasks"]
