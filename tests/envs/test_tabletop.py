"""The embedded tabletop world: experts, instruction dependence, determinism, Gymnasium API, tiers, pyramid."""

from __future__ import annotations

import json
import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from scipy.stats import binomtest

from datamodules.shards import read_episodes, write_source
from envs.tabletop import (
    DEFAULT_EPISODES,
    ENV_IDS,
    MODALITIES,
    TIERS,
    VIEWS,
    ExpertPolicy,
    Renderer,
    ScriptedExpert,
    TabletopEnv,
    TabletopPyramid,
    apply_artefacts,
    generate_episodes,
    make_world,
)


def _run_expert(seed: int, embodiment: str, noise: float = 0.0, target=None, max_steps: int = 100):
    world = make_world(seed, embodiment)
    expert = ScriptedExpert(noise=noise, seed=seed, target=target(world) if target else None)
    for _ in range(max_steps):
        world.step(expert.act(world))
        if world.success:
            return world, True
    return world, False


@pytest.mark.parametrize("embodiment", ["point_gripper", "two_link_arm"])
@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_expert_succeeds_per_task_family(embodiment, noise):
    per_family: dict[str, list[bool]] = {}
    for seed in range(100):
        world, ok = _run_expert(seed, embodiment, noise)
        per_family.setdefault(world.scene.family, []).append(ok)
    assert set(per_family) == {"pick_place", "push"}
    for family, results in per_family.items():
        assert np.mean(results) >= 0.95, (embodiment, noise, family, np.mean(results))


def test_following_another_instruction_succeeds_at_chance():
    """An expert executing a random (object, receptacle) pair of the scene, i.e. one that ignores the instruction,
    succeeds about as often as that pair happens to be the instructed one."""
    rng = np.random.default_rng(0)
    successes, chance = [], []
    for seed in range(1000, 1300):
        pick = lambda w: (int(rng.integers(len(w.obj_pos))), int(rng.integers(len(w.scene.rec_pos))))  # noqa: E731
        world, ok = _run_expert(seed, "point_gripper", target=pick)
        successes.append(ok)
        chance.append(1.0 / (len(world.obj_pos) * len(world.scene.rec_pos)))
    rate, expected = np.mean(successes), np.mean(chance)
    assert 0.1 < expected < 0.2
    assert rate < 0.6 * 0.95
    assert binomtest(int(np.sum(successes)), len(successes), expected).pvalue > 1e-3, (rate, expected)


def test_instruction_names_the_target_and_scenes_have_distractors():
    for seed in range(50):
        scene = make_world(seed, "point_gripper").scene
        assert scene.object_name(scene.target_obj) in scene.instruction
        assert scene.receptacle_name(scene.target_rec) in scene.instruction
        assert 2 <= len(scene.obj_pos) <= 4 and 2 <= len(scene.rec_pos) <= 3
        names = [scene.object_name(i) for i in range(len(scene.obj_pos))]
        assert len(set(names)) == len(names)


def _episodes_equal(a, b) -> bool:
    same = a.instruction == b.instruction and all(np.array_equal(a.frames[v], b.frames[v]) for v in a.frames)
    if a.actions is not None:
        same = same and np.array_equal(a.actions, b.actions) and np.array_equal(a.state, b.state)
    return same


@pytest.mark.parametrize("tier", ["sim", "neural"])
def test_generation_is_deterministic_and_independent_of_splitting(tier):
    first = list(generate_episodes(tier, 3, seed=0))
    again = list(generate_episodes(tier, 2, seed=0)) + list(generate_episodes(tier, 1, seed=0, start=2))
    assert all(_episodes_equal(a, b) for a, b in zip(first, again))
    other = list(generate_episodes(tier, 3, seed=1))
    assert not any(_episodes_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("tier", list(TIERS))
def test_tier_episodes_have_their_embodiment_views_and_actions(tier):
    spec = TIERS[tier]
    episodes = list(generate_episodes(tier, 2, seed=3, image_size=48))
    for ep in episodes:
        assert ep.embodiment == spec.embodiment
        assert ep.has_action == (not spec.actionless)
        assert set(ep.frames) == set(VIEWS)
        assert all(f.shape[1:] == (48, 48, 3) for f in ep.frames.values())
        assert ep.metadata["success"] is True and ep.metadata["task_family"] in ("pick_place", "push")
        assert ep.fps == 10.0 and 15 <= ep.length <= 101
        if ep.has_action:
            modality = MODALITIES[ep.embodiment]
            assert ep.state.shape == (ep.length, modality.state_dim)
            assert ep.actions.shape == (ep.length, modality.action_dim)
            assert np.abs(ep.actions[:, :2]).max() <= 1.0
            # gripper closes and opens during pick-and-place; never closes while pushing
            assert (ep.state[:, 2].max() == 1.0) == (ep.metadata["task_family"] == "pick_place")
        else:
            assert ep.state is None


def test_artefacts_corrupt_frames_and_jitter_time():
    clean = next(generate_episodes("robot", 1, seed=0))
    corrupted, params = apply_artefacts(clean.frames, np.random.default_rng(0))
    n = len(corrupted["scene"])
    assert n == clean.length - params["dropped"] + params["repeated"]
    assert len(corrupted["wrist"]) == n
    assert params["dropped"] + params["repeated"] > 0
    # visibly altered, yet still the same scene: nearer its clean frame than a frame of another scene is
    other = next(generate_episodes("robot", 1, seed=1)).frames["scene"][0].astype(float)
    a, b = clean.frames["scene"][0].astype(float), corrupted["scene"][0].astype(float)
    assert 3 < np.abs(a - b).mean() < 0.8 * np.abs(other - b).mean()


@pytest.mark.parametrize("embodiment", ["point_gripper", "two_link_arm"])
def test_end_effector_position_is_visible_in_the_scene_view(embodiment):
    """The gripper's dark fingers track the EE: their darkness-weighted centroid in a scene frame locates the EE
    to well under a pixel, so EE motion is recoverable from frames."""
    renderer = Renderer(64)
    world = make_world(7, embodiment, families=("push",))  # push: the gripper never hides behind a held object
    expert, truth, found = ScriptedExpert(), [], []
    rows, cols = np.mgrid[0:64, 0:64] + 0.5
    for _ in range(30):
        image = renderer(world)["scene"].astype(float)
        ee_px = np.array([world.ee[0] * 64, (1 - world.ee[1]) * 64])
        grey = np.ptp(image, axis=-1) < 40
        near = np.hypot(cols - ee_px[0], rows - ee_px[1]) < 5  # a window around the truth: search, not answer
        weight = np.maximum(300 - image.sum(-1), 0) * grey * near
        found.append([(weight * cols).sum() / weight.sum(), (weight * rows).sum() / weight.sum()])
        truth.append(ee_px)
        world.step(expert.act(world))
    err = np.abs(np.array(found) - np.array(truth))
    assert err.mean() < 0.5, err.mean()
    assert np.ptp(np.array(truth), axis=0).max() > 10  # it moved


@pytest.mark.parametrize("embodiment", ["point_gripper", "two_link_arm"])
def test_gym_env_passes_checker(embodiment):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker reports problems as warnings
        check_env(gym.make(ENV_IDS[embodiment], render_mode="rgb_array").unwrapped)
    env = gym.make(ENV_IDS[embodiment])
    obs, info = env.reset(seed=0)
    assert set(obs["images"]) == set(VIEWS) and obs["state"].shape == (3,) and obs["instruction"]
    assert info["task_family"] in ("pick_place", "push")
    assert env.unwrapped.embodiment == embodiment


@pytest.mark.parametrize("tier", ["robot", "robot_b", "sim"])
def test_replaying_recorded_actions_in_the_env_reproduces_the_episode(tier):
    spec = TIERS[tier]
    for ep in generate_episodes(tier, 3, seed=0):
        env = TabletopEnv(spec.robot, visuals=spec.visuals)
        obs, _ = env.reset(seed=ep.metadata["seed"])
        assert obs["instruction"] == ep.instruction
        assert np.array_equal(obs["images"]["scene"], ep.frames["scene"][0])
        for t, action in enumerate(ep.actions[:-1]):  # the last action is the hold after success
            np.testing.assert_allclose(obs["state"], ep.state[t], atol=1e-6)
            obs, reward, terminated, truncated, info = env.step(action)
        assert terminated and info["success"] and reward == 1.0
        assert info["task_family"] == ep.metadata["task_family"]
        assert np.array_equal(obs["images"]["wrist"], ep.frames["wrist"][-1])


def test_expert_policy_closes_the_loop_through_the_env():
    env = gym.make(ENV_IDS["two_link_arm"])
    policy = ExpertPolicy(env)
    meta = policy.metadata()["embodiments"]["two_link_arm"]
    assert (meta["state_dim"], meta["action_dim"], meta["image_size"]) == (3, 3, [64, 64])
    successes = 0
    for seed in range(10):
        obs, info = env.reset(seed=seed)
        policy.reset()
        for _ in range(env.unwrapped.max_episode_steps):
            obs, _, terminated, truncated, info = env.step(policy.get_action(obs)["actions"][0])
            if terminated or truncated:
                break
        successes += info["success"]
    assert successes >= 9


def test_bad_names_get_clear_errors():
    with pytest.raises(ValueError, match="Unknown tabletop tier 'robots'"):
        next(generate_episodes("robots", 1, seed=0))
    with pytest.raises(ValueError, match="Unknown tabletop embodiment 'arm'"):
        TabletopEnv("arm")
    with pytest.raises(ValueError, match="Unknown tabletop task family 'stack'"):
        make_world(0, "point_gripper", families=("stack",))
    with pytest.raises(ValueError, match=r"unknown tiers \['humans'\]"):
        TabletopPyramid(episodes={"humans": 3})
    with pytest.raises(ValueError, match=r"TabletopPyramid\(heldout=...\): 'robot' needs a count >= 0, got -1"):
        TabletopPyramid(heldout={"robot": -1})
    with pytest.raises(ValueError, match="action must be 3 finite numbers"):
        make_world(0, "point_gripper").step(np.array([0.0, np.nan, 0.0]))


def test_heldout_split_holds_new_scenes_of_the_same_tier(tmp_path):
    """A held-out split is the same tier (same embodiment, task families, views) from other worlds: no world seed of
    the training tier reappears in it, and it is rebuilt alone when only its count changes."""
    only_robot = {"robot": 4, "robot_b": 0, "sim": 0, "human": 0, "neural": 0}
    make = lambda n: TabletopPyramid(str(tmp_path), seed=0, image_size=32, horizon=4, num_workers=1,  # noqa: E731
                                     episodes=only_robot, heldout={"robot": n})
    pyramid = make(3)
    pyramid.prepare()
    assert pyramid.heldout_sources == {"robot": str(tmp_path / "heldout" / "robot")}
    train = list(read_episodes(pyramid.sources["robot"]))
    heldout = list(read_episodes(pyramid.heldout_sources["robot"]))
    assert (len(train), len(heldout)) == (4, 3)
    assert {e.embodiment for e in heldout} == {"point_gripper"} and all(e.actions is not None for e in heldout)
    seeds = lambda episodes: {e.metadata["seed"] for e in episodes}  # noqa: E731
    assert len(seeds(heldout)) == 3 and not seeds(train) & seeds(heldout)
    marker = (tmp_path / "robot" / "READY.json").stat().st_mtime_ns
    make(2).prepare()
    assert (tmp_path / "robot" / "READY.json").stat().st_mtime_ns == marker
    assert len(list(read_episodes(pyramid.heldout_sources["robot"]))) == 2


TINY = {"robot": 2, "robot_b": 1, "sim": 3, "human": 1, "neural": 1}


def _indexes(root) -> dict:
    """Every source's index.json (per shard: sample count, size, sha256) under a pyramid root."""
    return {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob("index.json"))}


def test_presets_set_tier_sizes_and_overrides_win():
    large = TabletopPyramid(preset="large")
    assert large.episodes == {"robot": 50, "robot_b": 500, "sim": 3000, "human": 1000, "neural": 1000}
    assert large.heldout == {"robot": 20, "sim": 50}
    assert TabletopPyramid().episodes == DEFAULT_EPISODES and TabletopPyramid().heldout == {}
    mixed = TabletopPyramid(preset="large", episodes={"sim": 7, "human": 0}, heldout={"sim": 0})
    assert mixed.episodes["sim"] == 7 and "human" not in mixed.episodes and mixed.heldout == {"robot": 20}
    with pytest.raises(ValueError, match=r"TabletopPyramid\(preset='huge'\): unknown preset; choose one of "
                                         r"\['default', 'large'\]"):
        TabletopPyramid(preset="huge")


def test_preset_generation_is_deterministic_per_seed_and_independent_of_chunking(tmp_path):
    """The same preset and seed give byte-identical shards however the tiers are cut into chunks (what a worker
    renders), and the same bytes as writing the tier's episodes in one stream; another seed gives other data."""
    make = lambda folder, seed, chunk, **kw: TabletopPyramid(  # noqa: E731
        str(tmp_path / folder), seed=seed, image_size=32, horizon=4, preset="large", episodes={**TINY, **kw},
        heldout={"robot": 1, "sim": 0}, num_workers=1, chunk_episodes=chunk, progress=False)
    make("a", 0, 2).prepare()
    make("b", 0, 3).prepare()
    make("c", 1, 2, robot=0, robot_b=0, human=0, neural=0).prepare()
    assert _indexes(tmp_path / "a") == _indexes(tmp_path / "b")
    assert set(_indexes(tmp_path / "a")) == {*TINY, "heldout/robot"}
    assert _indexes(tmp_path / "c")["sim"] != _indexes(tmp_path / "a")["sim"]
    write_source(generate_episodes("sim", 3, seed=0, image_size=32), tmp_path / "stream", source="sim", horizon=4,
                 modality=MODALITIES["point_gripper"])
    assert json.loads((tmp_path / "stream" / "index.json").read_text()) == _indexes(tmp_path / "a")["sim"]


def test_a_tier_that_fails_validation_gets_no_marker(tmp_path, monkeypatch):
    monkeypatch.setattr("datamodules.validate.validate_source", lambda *a, **k: (["x: broken"], 0))
    pyramid = TabletopPyramid(str(tmp_path), image_size=32, horizon=4, episodes={**TINY, "robot": 1, "robot_b": 0,
                              "sim": 0, "human": 0, "neural": 0}, num_workers=1, progress=False)
    with pytest.raises(RuntimeError, match=r"failed validation after writing \(0 of \d+ samples read\): x: broken"):
        pyramid.prepare()
    assert not pyramid.is_ready("robot") and not (tmp_path / "robot").exists()


def test_scene_seeds_cover_every_split_and_retry(tmp_path):
    pyramid = TabletopPyramid(str(tmp_path), episodes={**TINY, "robot": 1, "robot_b": 0, "sim": 0, "human": 0,
                              "neural": 0}, heldout={"robot": 1}, num_workers=1, progress=False, image_size=32,
                              horizon=4)
    assert len(pyramid.scene_seeds(max_attempts=3)) == 6  # 2 episodes x 3 attempts
    pyramid.prepare()
    recorded = {e.metadata["seed"] for src in (*pyramid.sources.values(), *pyramid.heldout_sources.values())
                for e in read_episodes(src)}
    assert recorded <= pyramid.scene_seeds()


@pytest.mark.slow  # 10-35 s here, depending on load: mostly two spawned workers importing webdataset and torch
def test_pyramid_writes_every_tier_once_identically_for_any_worker_count(tmp_path):
    counts = {"robot": 3, "robot_b": 2, "sim": 3, "human": 2, "neural": 2}
    make = lambda folder, workers, **kw: TabletopPyramid(  # noqa: E731
        str(tmp_path / folder), seed=0, horizon=8, episodes={**counts, **kw}, num_workers=workers, chunk_episodes=2,
        progress=False,
    )
    pyramid = make("a", 2)
    pyramid.prepare()
    make("b", 1).prepare()
    for tier, folder in pyramid.sources.items():
        source = json.loads((tmp_path / "a" / tier / "source.json").read_text())
        assert source["episodes"] == counts[tier]
        assert source["has_action"] == (not TIERS[tier].actionless)
        assert source["embodiment"] == TIERS[tier].embodiment
        assert set(source["views"]) == set(VIEWS)
        # byte-identical shards whether the tiers' chunks were rendered by two processes or one
        index = lambda root: json.loads((tmp_path / root / tier / "index.json").read_text())  # noqa: E731
        assert index("a") == index("b")
    replayed = list(read_episodes(pyramid.sources["robot"]))
    fresh = list(generate_episodes("robot", 3, seed=0))
    assert [e.instruction for e in replayed] == [e.instruction for e in fresh]
    np.testing.assert_allclose(replayed[0].actions, fresh[0].actions, atol=1e-6)

    markers = {t: (tmp_path / "a" / t / "READY.json").stat().st_mtime_ns for t in counts}
    start = time.perf_counter()
    make("a", 2).prepare()
    assert time.perf_counter() - start < 0.5  # nothing to do: no workers started, nothing written
    make("a", 2, sim=4).prepare()
    after = {t: (tmp_path / "a" / t / "READY.json").stat().st_mtime_ns for t in counts}
    assert [t for t in counts if after[t] != markers[t]] == ["sim"]
    assert json.loads((tmp_path / "a" / "sim" / "source.json").read_text())["episodes"] == 4


@pytest.mark.parametrize("window", [0.4, 1.0])
def test_wrist_view_shifts_by_the_end_effector_move_at_its_window_scale(window):
    """The wrist camera is centred on the EE and sees ``wrist_window`` table units: a move of d table units shifts
    the table under it by d * image_size / wrist_window pixels (the widened camera of
    recipes/explore/lam/lam_wide_wrist.yaml keeps a 16-step move inside its image). The scene view does not depend
    on it."""
    renderer, default = Renderer(64, wrist_window=window), Renderer(64)
    world = make_world(3, "point_gripper", families=("push",))
    world.robot.reset(np.array([0.3, 0.5]))  # mid-table, so no move below reaches an edge
    before = renderer(world)
    np.testing.assert_array_equal(before["scene"], default(world)["scene"])
    for step in range(6):  # 6 full steps right and 3 up: 0.18 and 0.09 table units
        world.step(np.array([1.0, 1.0 if step < 3 else 0.0, 0.0], np.float32))
    after = renderer(world)["wrist"].astype(float)
    a = before["wrist"].astype(float)
    errors = {}
    for dr in range(-40, 41):
        for dc in range(-40, 41):
            # content at (r, c) before sits at (r - dr, c - dc) after: the camera moved by (dr, dc) pixels
            old = a[max(dr, 0): 64 + min(dr, 0), max(dc, 0): 64 + min(dc, 0)]
            new = after[max(-dr, 0): 64 + min(-dr, 0), max(-dc, 0): 64 + min(-dc, 0)]
            if old.shape[0] * old.shape[1] >= 16 * 16:
                errors[dr, dc] = np.abs(old - new).mean()
    found = min(errors, key=errors.get)
    expected = (-round(0.09 * 64 / window), round(0.18 * 64 / window))  # up is towards row 0
    assert abs(found[0] - expected[0]) <= 1 and abs(found[1] - expected[1]) <= 1, (found, expected)
    with pytest.raises(ValueError, match=r"wrist_window must be in \(0, 2\] table units, got 0"):
        Renderer(64, wrist_window=0)


def test_difficulty_knob_sets_the_number_of_objects_and_keeps_default_scenes():
    for seed in range(10):
        default = make_world(seed, "point_gripper").scene
        assert make_world(seed, "point_gripper", num_objects=None).scene.instruction == default.instruction
        for n in (1, 6):
            scene = make_world(seed, "point_gripper", num_objects=n).scene
            assert len(scene.obj_pos) == n and scene.object_name(scene.target_obj) in scene.instruction
    env = TabletopEnv(num_objects=5, task_families=("push",))
    env.reset(seed=3)
    assert len(env.world.scene.obj_pos) == 5
    with pytest.raises(ValueError, match="num_objects must be 1-6 \\(one colour each\\), got 7"):
        make_world(0, "point_gripper", num_objects=7)
