"""The environments closed-loop evaluation knows by name, and how a name becomes envs, tasks and experts.

Each entry gives import paths (``"module:name"``, imported on first use so that naming one env never imports
another's simulator) of ``make_env(task, seed, **kwargs) -> gym.Env``, the scripted
``expert(env, noise=, horizon=, seed=)`` and ``resolve_tasks(tasks | None) -> list[str]`` (``None``: the env's
default task list). Anything else can be named by its own ``"module:make_env"`` path.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym

MakeEnv = Callable[[str, int], gym.Env]

ENVS: dict[str, dict[str, str]] = {
    "metaworld": {
        "make_env": "envs.metaworld.env:make_env",
        "expert": "envs.metaworld.experts:MetaWorldExpertPolicy",
        "resolve_tasks": "envs.metaworld.tasks:resolve_tasks",
    },
    "tabletop": {
        "make_env": "envs.tabletop.env:make_env",
        "expert": "envs.tabletop.experts:make_expert",
        "resolve_tasks": "envs.tabletop.env:resolve_tasks",
    },
}


def import_path(path: str) -> Any:
    """``"package.module:name"`` -> that object."""
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"expected an import path 'package.module:name', got {path!r}")
    return getattr(importlib.import_module(module), name)


def resolve_make_env(make_env: MakeEnv | str, **env_kwargs: Any) -> MakeEnv:
    """A ``make_env(task, seed)`` from a callable, a registered env name (``ENVS``) or ``"module:callable"``."""
    if isinstance(make_env, str):
        make_env = import_path(ENVS[make_env]["make_env"] if make_env in ENVS else make_env)
    return functools.partial(make_env, **env_kwargs) if env_kwargs else make_env


def resolve_tasks(env: str, tasks: Sequence[str] | str | None) -> list[str]:
    """Task list for a registered env (``None``: its default, e.g. MT10 for Meta-World) or as given."""
    if env in ENVS:
        return import_path(ENVS[env]["resolve_tasks"])(tasks)
    if tasks is None:
        raise ValueError(f"tasks are required for env {env!r}")
    return [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)


def expert(env: str) -> Callable[..., Any]:
    """The scripted expert factory ``(env, noise=, horizon=, seed=) -> policy`` of a registered env."""
    if env not in ENVS:
        raise ValueError(f"scripted experts exist for the registered envs {sorted(ENVS)}, not {env!r}")
    return import_path(ENVS[env]["expert"])
