"""Meta-World (the ``sim`` extra): env contract and seeding, chunking experts, visual randomisation, the
demonstration generator (replaying what it wrote), and the evaluation command on expert vs noisy expert."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

# find_spec, not importorskip: importing metaworld imports mujoco, which must happen after envs.metaworld has set
# MUJOCO_GL (mujoco picks its OpenGL platform once, at import).
if importlib.util.find_spec("metaworld") is None:
    pytest.skip("Meta-World is in the `sim` extra: pip install -e '.[sim]'", allow_module_level=True)

from gymnasium.utils.env_checker import check_env  # noqa: E402

from envs.metaworld import INSTRUCTIONS, MT10  # noqa: E402
from envs.metaworld.env import MetaWorldEnv, VisualRandomization  # noqa: E402
from envs.metaworld.experts import MetaWorldExpertPolicy  # noqa: E402


def _rollout(env, policy, seed, execute=None):
    obs, _ = env.reset(seed=seed)
    raw = [env.raw_observation.copy()]
    while True:
        for action in policy.get_action(obs)["actions"][:execute]:
            obs, _, terminated, truncated, info = env.step(action)
            raw.append(env.raw_observation.copy())
            if terminated or truncated:
                return info["success"], np.array(raw)


def test_env_follows_the_observation_contract_and_reset_seed_fixes_the_scene():
    env = MetaWorldEnv("push-v3", image_size=32, views=("corner", "gripperPOV"), max_steps=50)
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=3)
    assert env.embodiment == "sawyer" and info == {"success": False, "task_family": "push-v3"}
    assert set(obs["images"]) == {"corner", "gripper_pov"}  # camera names become shard-safe view names
    assert all(im.dtype == np.uint8 and im.shape == (32, 32, 3) for im in obs["images"].values())
    assert obs["state"].dtype == np.float32 and np.array_equal(obs["state"], env.raw_observation[:4].astype(np.float32))
    assert obs["instruction"] == "push the puck to the goal"
    puck_and_goal = env.raw_observation[[4, 5, 6, 36, 37, 38]]
    again, _ = env.reset(seed=3)
    assert np.array_equal(env.raw_observation[[4, 5, 6, 36, 37, 38]], puck_and_goal)
    assert all(np.array_equal(again["images"][v], obs["images"][v]) for v in obs["images"])
    env.reset(seed=4)
    assert not np.allclose(env.raw_observation[[4, 5, 6, 36, 37, 38]], puck_and_goal)
    _, _, terminated, truncated, info = env.step(np.zeros(4))
    assert info["task_family"] == "push-v3" and info["success"] is False and not terminated and not truncated
    env.close()
    assert set(MT10) <= set(INSTRUCTIONS)


def test_chunked_expert_reproduces_the_per_step_expert_exactly():
    # The chunk is simulated ahead and the simulator restored, so executing it open-loop changes nothing.
    env = MetaWorldEnv("pick-place-v3", image_size=16, views=("corner",), max_steps=150)
    ok_1, per_step = _rollout(env, MetaWorldExpertPolicy(env, horizon=1), seed=5)
    ok_8, chunked = _rollout(env, MetaWorldExpertPolicy(env, horizon=8), seed=5)
    assert ok_1 and ok_8 and per_step.shape == chunked.shape
    np.testing.assert_allclose(chunked, per_step, atol=1e-6)
    env.close()


def test_visual_randomisation_changes_the_look_not_the_scene_and_is_seeded():
    views = ("corner", "workspace")
    plain = MetaWorldEnv("reach-v3", image_size=32, views=views)
    varied = MetaWorldEnv("reach-v3", image_size=32, views=views, visual_randomization=VisualRandomization())
    a, _ = plain.reset(seed=1)
    b, _ = varied.reset(seed=1)
    c, _ = varied.reset(seed=2)
    b_again, _ = varied.reset(seed=1)
    a_again, _ = plain.reset(seed=1)
    varied.reset(seed=1)
    assert np.array_equal(plain.raw_observation, varied.raw_observation)  # same placement of objects and goal
    for view in views:  # our free camera is jittered and re-seeded like Meta-World's own
        diff = lambda x, y: np.abs(x["images"][view].astype(int) - y["images"][view]).mean()  # noqa: E731
        assert diff(a, b) > 5 and diff(b, c) > 5, view
        assert diff(b, b_again) == 0 and diff(a, a_again) == 0, view
    plain.close(), varied.close()


def test_workspace_camera_shows_the_goal_larger_than_the_corner_camera():
    # The reason the `workspace` view exists: reach/push/pick-place goals are only in the image.
    env = MetaWorldEnv("reach-v3", image_size=64, views=("corner", "workspace"))
    goal = env._raw.model.site("goal").id
    shown = env._raw.model.site_rgba[goal].copy()
    pixels = {"corner": [], "workspace": []}
    for seed in range(4):
        env._raw.model.site_rgba[goal] = shown
        with_goal, _ = env.reset(seed=seed)
        env._raw.model.site_rgba[goal, 3] = 0.0
        without = env._observation()
        for view in pixels:
            changed = np.any(with_goal["images"][view] != without["images"][view], axis=-1)
            pixels[view].append(int(changed.sum()))
    env.close()
    assert min(pixels["workspace"]) >= 3, pixels  # visible in every scene
    assert sum(pixels["workspace"]) >= 2 * sum(pixels["corner"]), pixels


@pytest.mark.slow  # ~10 s of CPU in three processes; over 20 s of wall time on a busy machine
def test_generator_writes_replayable_shards_for_two_tasks_and_two_episodes(tmp_path):
    from datamodules.shards import read_episodes
    from envs.metaworld.generate import MetaWorldDemos

    demos = MetaWorldDemos(tmp_path, tasks="reach-v3,push-v3", episodes_per_task=2, tiers=("robot",), image_size=32,
                           views=("corner",), num_workers=2, horizon=4)
    demos.prepare()
    source = json.loads((tmp_path / "metaworld_robot" / "source.json").read_text())
    assert (source["embodiment"], source["has_action"], source["episodes"]) == ("sawyer", True, 4)
    assert (source["views"], source["image_size"], source["fps"]) == (["corner"], [32, 32], 80.0)
    stats = json.loads((tmp_path / "metaworld_robot" / "stats.json").read_text())
    assert len(stats["state"]["mean"]) == 4 and len(stats["actions"]["mean"]) == 4

    episodes = list(read_episodes(tmp_path / "metaworld_robot"))
    assert [e.metadata["task_family"] for e in episodes] == ["reach-v3", "push-v3"] * 2  # tasks interleaved
    assert source["samples"] == sum(e.length for e in episodes)
    for ep in episodes:
        # Replaying the recorded actions from the recorded seed must retrace the recorded states and succeed on
        # the last frame: the data are what the expert did, not something near it.
        env = MetaWorldEnv(ep.metadata["task_family"], image_size=32, views=("corner",), max_steps=300)
        obs, _ = env.reset(seed=ep.metadata["seed"])
        assert ep.instruction == env.instruction
        for t, action in enumerate(ep.actions[:-1]):
            np.testing.assert_allclose(obs["state"], ep.state[t], atol=1e-5)
            obs, _, _, _, info = env.step(action)
            assert info["success"] == (t == ep.length - 2)
        np.testing.assert_allclose(obs["state"], ep.state[-1], atol=1e-5)
        env.close()

    stamp = (tmp_path / "metaworld_robot" / "source.json").stat().st_mtime_ns
    demos.prepare()  # cached: nothing is rewritten
    assert (tmp_path / "metaworld_robot" / "source.json").stat().st_mtime_ns == stamp


def test_generator_records_privileged_object_and_goal_positions_per_frame(tmp_path):
    from datamodules.shards import read_episodes
    from envs.metaworld.generate import PRIVILEGED, MetaWorldDemos

    MetaWorldDemos(tmp_path, tasks="push-v3", episodes_per_task=2, tiers=("robot",), image_size=32,
                   views=("corner",), num_workers=1, horizon=4, privileged=True).prepare()
    source = json.loads((tmp_path / "metaworld_robot" / "source.json").read_text())
    assert source["privileged_dim"] == 6 and source["config"]["privileged"][3:] == ["goal_x", "goal_y", "goal_z"]
    episodes = list(read_episodes(tmp_path / "metaworld_robot"))
    for ep in episodes:
        env = MetaWorldEnv("push-v3", image_size=32, views=("corner",), max_steps=300)
        env.reset(seed=ep.metadata["seed"])
        for t in (0, 1):  # the recorded positions are the privileged observation of the same frame
            np.testing.assert_allclose(ep.privileged[t], env.raw_observation[PRIVILEGED], atol=1e-6)
            env.step(ep.actions[t])
        env.close()
        # The goal stays where it was put; the expert pushed the puck several cm towards it.
        assert np.ptp(ep.privileged[:, 3:], axis=0).max() < 1e-6
        assert np.linalg.norm(ep.privileged[-1, :2] - ep.privileged[0, :2]) > 0.03
    assert np.abs(episodes[0].privileged[0, 3:] - episodes[1].privileged[0, 3:]).max() > 0.01  # a new goal each


def test_dart_executes_noisy_actions_but_records_the_experts_clean_correction():
    from envs.metaworld.experts import scripted_expert
    from envs.metaworld.generate import MetaWorldDemos, _record

    env = MetaWorldEnv("push-v3", image_size=16, views=("corner",), max_steps=300)
    executed, visited = [], []
    env_step, env_reset = env.step, env.reset

    def spy_step(action):
        executed.append(np.array(action))
        out = env_step(action)
        visited.append(env.raw_observation.copy())
        return out

    def spy_reset(**kwargs):
        out = env_reset(**kwargs)
        executed.clear()
        visited[:] = [env.raw_observation.copy()]
        return out

    env.step, env.reset = spy_step, spy_reset
    _, clean_states, _, _, ok_clean = _record(env, MetaWorldExpertPolicy(env), seed=7)
    _, states, labels, _, ok = _record(env, MetaWorldExpertPolicy(env), seed=7, execution_noise=0.3,
                                    rng=np.random.default_rng(0))
    assert ok_clean and ok
    assert len(visited) == len(labels) == len(executed) + 1  # one raw observation per recorded frame
    labels, executed = np.array(labels), np.array(executed)
    # Each label is the expert's command in the state the noise led to ...
    expert = scripted_expert("push-v3")
    np.testing.assert_allclose(labels, [np.clip(expert.get_action(o), -1, 1) for o in visited], atol=1e-5)
    # ... while the env executed that command plus N(0, 0.3) (checked where neither side was clipped) ...
    residual = (executed - labels[:-1])[(np.abs(labels[:-1]) < 0.4) & (np.abs(executed) < 1)]
    assert residual.size > 100 and abs(residual.mean()) < 0.05 and abs(residual.std() - 0.3) < 0.06
    # ... which took the hand off the clean expert's path.
    n = min(len(states), len(clean_states))
    assert np.abs(np.array(states[:n])[:, :3] - np.array(clean_states[:n])[:, :3]).max() > 0.01
    env.close()

    # Off (the default) leaves the cache key as it was, so caches written before the option stay valid.
    assert "dart_noise" not in MetaWorldDemos("unused").config("robot")
    assert MetaWorldDemos("unused", dart_noise=0.5).config("robot")["dart_noise"] == [0.0, 0.5]
    with pytest.raises(ValueError, match="dart_noise=-0.1"):
        MetaWorldDemos("unused", dart_noise=-0.1)


def test_human_tier_is_actionless_video_from_other_cameras():
    from envs.metaworld.generate import MetaWorldDemos

    demos = MetaWorldDemos("unused", tasks=["reach-v3"], episodes_per_task=1, tiers=("human",), image_size=32,
                           human_views=("corner2", "behindGripper"), num_workers=1)
    [ep] = demos.iter_episodes("human")
    assert ep.embodiment == "human" and ep.state is None and ep.actions is None
    assert list(ep.frames) == ["corner2", "behind_gripper"] and ep.frames["corner2"].shape[1:] == (32, 32, 3)
    assert ep.metadata["success"] and ep.instruction == "reach the goal position"


@pytest.mark.slow
def test_evaluation_command_scores_the_expert_1_and_a_noisy_expert_far_lower(tmp_path):
    from vla_zoo.evaluation import main

    common = ["--env", "metaworld", "--policy", "expert", "--tasks", "push-v3", "--episodes", "4", "--max-steps", "100",
              "--image-size", "16", "--views", "corner", "--videos", "1"]
    expert = main([*common, "--out", str(tmp_path / "expert")])
    # calibrated: noise 1.0 on push scored 0, 0.125, 0, 0, 0 over 5 seeds x 8 episodes
    noisy = main([*common, "--noise", "1.0", "--out", str(tmp_path / "noisy")])
    assert expert["success"] == {"push-v3": 1.0}
    assert noisy["average"] <= 0.25
    saved = json.loads((tmp_path / "noisy" / "results.json").read_text())
    assert saved["success"] == noisy["success"] and len(saved["episodes"]) == 4
    assert (tmp_path / "expert" / "success.png").stat().st_size > 0
    assert len(list((tmp_path / "expert" / "videos").glob("push-v3_episode000_success.gif"))) == 1
