"""The env registry: names become env factories, task lists and experts; mistakes name what is allowed."""

from __future__ import annotations

import pytest

from envs.registry import ENVS, expert, import_path, resolve_make_env, resolve_tasks
from envs.tabletop import TASK_FAMILIES, ExpertPolicy, TabletopEnv


def test_a_registered_name_gives_its_env_tasks_and_expert() -> None:
    make_env = resolve_make_env("tabletop", image_size=32)
    env = make_env("push", 0)
    try:
        assert isinstance(env, TabletopEnv) and env.task_families == ("push",) and env.image_size == 32
        policy = expert("tabletop")(env, noise=0.0, horizon=1, seed=0)
        assert isinstance(policy, ExpertPolicy)
        with pytest.raises(ValueError, match="use --horizon 1"):
            expert("tabletop")(env, horizon=4)
    finally:
        env.close()
    assert resolve_tasks("tabletop", None) == list(TASK_FAMILIES)
    assert resolve_tasks("tabletop", "push") == ["push"]
    with pytest.raises(ValueError, match=r"unknown tabletop task families \['stack'\]; choose from"):
        resolve_tasks("tabletop", ["stack"])
    # Every registered path imports (Meta-World's only where its simulator is installed).
    for name, paths in ENVS.items():
        if name == "metaworld":
            pytest.importorskip("metaworld")
        for path in paths.values():
            assert callable(import_path(path)), path


def test_unregistered_envs_are_named_by_path_and_need_their_tasks() -> None:
    assert resolve_make_env("envs.tabletop.env:make_env") is import_path("envs.tabletop.env:make_env")
    assert resolve_tasks("my.module:make_env", "a, b") == ["a", "b"]
    with pytest.raises(ValueError, match="tasks are required for env 'my.module:make_env'"):
        resolve_tasks("my.module:make_env", None)
    with pytest.raises(ValueError, match="expected an import path 'package.module:name', got 'nocolon'"):
        resolve_make_env("nocolon")
    with pytest.raises(ValueError, match=r"scripted experts exist for the registered envs \['metaworld', 'tabletop'\]"):
        expert("my.module:make_env")
