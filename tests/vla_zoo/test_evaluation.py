"""The closed-loop evaluator on a toy env whose outcome is known in advance: success counting, early stop,
chunk execution and re-planning, seeding, process split, the report files and errors (its training callback:
tests/vla_zoo/test_callbacks.py)."""

from __future__ import annotations

import argparse
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import LightningModule
from PIL import Image

from vla_zoo.evaluation import episode_seed, evaluate_closed_loop

START = 5.0


class LineEnv(gym.Env):
    """x starts at 5 and succeeds once |x| < 0.5; action[0] moves x, action[1] is a tag the env records.

    Tasks: ``reachable`` (moves work), ``blocked`` (moves are ignored: never succeeds), ``odd_blocked`` (blocked when
    the reset seed is odd). Truncates after ``max_steps`` steps.
    """

    metadata = {"render_fps": 10}

    def __init__(self, task: str, seed: int, max_steps: int = 8, action_dim: int = 2):
        self.task, self.max_steps, self.embodiment = task, max_steps, "line"
        self.action_space = gym.spaces.Box(-1, 1, (action_dim,), np.float32)
        self.tags: list[float] = []
        self.resets: list[int] = []
        self.closed = False

    def reset(self, *, seed=None, options=None):
        self.resets.append(seed)
        self.x, self.steps = START, 0
        self.blocked = self.task == "blocked" or (self.task == "odd_blocked" and seed % 2 == 1)
        return self._obs(), {}

    def step(self, action):
        self.tags.append(float(action[1]))
        if not self.blocked:
            self.x += float(action[0])
        self.steps += 1
        success = abs(self.x) < 0.5
        return self._obs(), 0.0, success, self.steps >= self.max_steps, {"success": success, "task_family": self.task}

    def _obs(self):
        image = np.full((4, 4, 3), min(255, int(40 * abs(self.x))), np.uint8)
        return {"images": {"scene": image}, "state": np.array([self.x], np.float32), "instruction": "go to zero"}

    def close(self):
        self.closed = True


class TaggingPolicy:
    """Returns chunks of ``horizon`` unit moves towards 0, tagged ``10 * call + position``."""

    def __init__(self, horizon: int):
        self.horizon, self.calls, self.resets, self.seen = horizon, 0, 0, []

    def reset(self):
        self.resets += 1

    def get_action(self, observation):
        self.seen.append(observation)
        step = -np.sign(observation["state"][0])
        chunk = np.array([[step, 10 * self.calls + k] for k in range(self.horizon)], np.float32)  # [H, 2]
        self.calls += 1
        return {"actions": chunk}


def _envs():
    made: list[LineEnv] = []

    def make_env(task, seed):
        made.append(LineEnv(task, seed))
        return made[-1]

    return made, make_env


def test_success_rates_match_the_known_outcome_and_episodes_stop_at_success():
    made, make_env = _envs()
    policy = TaggingPolicy(horizon=3)
    tasks = ["reachable", "blocked", "odd_blocked"]
    r = evaluate_closed_loop(policy, make_env, tasks, episodes_per_task=6, seed=7)

    odd = [episode_seed(7, "odd_blocked", i) % 2 for i in range(6)]
    assert 0 < sum(odd) < 6, "the seeds should give this test both outcomes"
    expected = {"reachable": 1.0, "blocked": 0.0, "odd_blocked": 1 - sum(odd) / 6}
    assert r["success"] == pytest.approx(expected)
    assert r["average"] == pytest.approx(np.mean(list(expected.values())))
    assert r["tasks"]["odd_blocked"] == {"successes": 6 - sum(odd), "episodes": 6, "success_rate": (6 - sum(odd)) / 6}
    for e in r["episodes"]:
        # success takes exactly 5 unit moves; failures run to the env's own limit (max_steps=None)
        assert e["steps"] == (5 if e["success"] else 8)
    assert policy.resets == 18
    assert [env.resets for env in made] == [[episode_seed(7, t, i) for i in range(6)] for t in tasks]
    assert all(env.closed for env in made)
    assert all(o["embodiment"] == "line" and o["instruction"] == "go to zero" for o in policy.seen)


@pytest.mark.parametrize(
    "horizon, execute_steps, tags",
    [
        (4, None, [0, 1, 2, 3, 10]),  # whole chunks open-loop
        (4, 3, [0, 1, 2, 10, 11]),  # re-plan after 3 actions
        (4, 1, [0, 10, 20, 30, 40]),  # closed loop every step
        (2, 3, [0, 1, 10, 11, 20]),  # execute_steps longer than the chunk: the chunk bounds it
    ],
)
def test_chunks_run_open_loop_for_execute_steps_then_replan(horizon, execute_steps, tags):
    made, make_env = _envs()
    policy = TaggingPolicy(horizon)
    r = evaluate_closed_loop(policy, make_env, ["reachable"], 1, execute_steps=execute_steps)
    assert r["average"] == 1.0
    assert made[0].tags == tags
    assert policy.calls == len({t // 10 for t in tags})


def test_max_steps_bounds_an_episode_mid_chunk():
    made, make_env = _envs()
    r = evaluate_closed_loop(TaggingPolicy(4), make_env, ["blocked"], 1, max_steps=6)
    assert r["episodes"][0]["steps"] == 6 and made[0].tags == [0, 1, 2, 3, 10, 11]


def test_policy_factory_is_called_once_per_task_with_its_env():
    made, make_env = _envs()
    built = []

    def factory(env):
        built.append(env)
        return TaggingPolicy(2)

    r = evaluate_closed_loop(factory, make_env, ["reachable", "blocked"], 3)
    assert built == made and r["success"] == {"reachable": 1.0, "blocked": 0.0}


def test_processes_split_the_episodes_without_overlap():
    _, make_env = _envs()
    whole = evaluate_closed_loop(TaggingPolicy(2), make_env, ["reachable", "odd_blocked"], 5, seed=3)
    parts = [evaluate_closed_loop(TaggingPolicy(2), make_env, ["reachable", "odd_blocked"], 5, seed=3,
                                  rank=rank, world_size=3) for rank in range(3)]
    key = lambda e: (e["task"], e["episode"])  # noqa: E731
    merged = sorted((e for p in parts for e in p["episodes"]), key=key)
    assert merged == sorted(whole["episodes"], key=key)
    for task in ("reachable", "odd_blocked"):
        assert sum(p["tasks"].get(task, {}).get("successes", 0) for p in parts) == whole["tasks"][task]["successes"]


def test_writes_results_json_bar_chart_and_gifs(tmp_path):
    _, make_env = _envs()
    r = evaluate_closed_loop(TaggingPolicy(2), make_env, ["reachable", "blocked"], 3, record_videos=2, out_dir=tmp_path,
                             run_info={"checkpoint": "a.ckpt", "samples": 4})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["success"] == r["success"] and saved["average"] == 0.5 and len(saved["episodes"]) == 6
    assert saved["checkpoint"] == "a.ckpt" and saved["samples"] == 4  # what produced these numbers travels with them
    with Image.open(tmp_path / "success.png") as png:
        assert png.format == "PNG" and png.width > 100
    gifs = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert gifs == [
        "blocked_episode000_failure.gif", "blocked_episode001_failure.gif",
        "reachable_episode000_success.gif", "reachable_episode001_success.gif",
    ]
    with Image.open(tmp_path / "videos" / "reachable_episode000_success.gif") as gif:
        assert gif.n_frames == 6  # the reset frame and 5 steps


def test_bad_policy_output_and_env_info_give_clear_errors():
    _, make_env = _envs()

    class WrongDim:
        def get_action(self, observation):
            return {"actions": np.zeros((4, 3), np.float32)}

    with pytest.raises(ValueError, match=r"shape \(4, 3\).*needs \[H, 2\]"):
        evaluate_closed_loop(WrongDim(), make_env, ["reachable"], 1)

    class NoSuccess(LineEnv):
        def step(self, action):
            obs, r, term, trunc, info = super().step(action)
            return obs, r, term, trunc, {}

    with pytest.raises(KeyError, match="must put 'success' in info"):
        evaluate_closed_loop(TaggingPolicy(1), lambda t, s: NoSuccess(t, s), ["reachable"], 1)


class GainModule(LightningModule):
    """A module whose only parameter is the step size its policy uses (1: reaches 0 in 5 steps; 0: never)."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(gain))

    def training_step(self, batch, batch_idx):
        return (self.gain * 0).sum() + batch[0].sum() * 0

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 1)), batch_size=1)

    val_dataloader = train_dataloader


class GainPolicy:
    def __init__(self, module):
        self.gain = float(module.gain)

    def get_action(self, observation):
        return {"actions": np.array([[-self.gain * np.sign(observation["state"][0]), 0.0]], np.float32)}


def test_policy_flags_reach_the_checkpoint_policy(monkeypatch):
    """``--inference-steps K`` must set the Euler steps of the loaded policy (None keeps the head's own) and
    ``--samples n`` the flow samples it averages (1, a single draw, by default)."""
    from vla_zoo import evaluation
    from vla_zoo.policy import Policy

    seen = []
    monkeypatch.setattr(Policy, "from_checkpoint", classmethod(lambda cls, path, **kw: seen.append((path, kw))))
    monkeypatch.setattr(evaluation, "evaluate_closed_loop", lambda *a, **k: {"success": {}, "average": 0.0})
    monkeypatch.setattr(evaluation, "_env_kwargs", lambda *a: {})
    monkeypatch.setattr(evaluation, "resolve_make_env", lambda *a, **k: None)
    monkeypatch.setattr(evaluation, "resolve_tasks", lambda *a: [])
    for argv, steps, samples in ((["--inference-steps", "16"], 16, 1), ([], None, 1), (["--samples", "8"], None, 8)):
        evaluation.main(["--checkpoint", "x.ckpt", "--out", "o", *argv])
        assert seen[-1] == ("x.ckpt", {"num_steps": steps, "num_samples": samples})


def test_tabletop_wrist_camera_follows_the_checkpoint_unless_the_flag_overrides(tmp_path):
    """A policy trained on a pyramid with a wider wrist camera must be rolled out with that camera: the evaluator
    reads ``wrist_window`` from the run config embedded in the checkpoint; ``--wrist-window`` overrides it."""
    from envs.tabletop import WRIST_WINDOW
    from vla_zoo import evaluation
    from lit_modules.checkpoint import CONFIG_KEY

    def checkpoint(name: str, config: dict | None) -> str:
        path = tmp_path / name
        torch.save({} if config is None else {CONFIG_KEY: yaml.safe_dump(config)}, path)
        return str(path)

    pyramid = {"class_path": "envs.tabletop.TabletopPyramid", "init_args": {"root": "r", "wrist_window": 1.0}}
    wide = checkpoint("wide.ckpt", {"data": {"init_args": {"prepare": pyramid}}})
    default = checkpoint("default.ckpt", {"data": {"init_args": {"sources": []}}})
    foreign = checkpoint("foreign.ckpt", None)  # not written by the CLI: no run config to read

    def env_kwargs(ckpt: str, flag: float | None = None) -> dict:
        args = argparse.Namespace(env="tabletop", embodiment="point_gripper", policy="checkpoint", checkpoint=ckpt,
                                  wrist_window=flag, max_steps=None, image_size=None, objects=None)
        return evaluation._env_kwargs(args, None)

    assert env_kwargs(wide)["wrist_window"] == 1.0
    assert env_kwargs(default)["wrist_window"] == WRIST_WINDOW
    assert "wrist_window" not in env_kwargs(foreign)
    assert env_kwargs(wide, flag=0.6)["wrist_window"] == 0.6
    env = evaluation.resolve_make_env("tabletop", **env_kwargs(wide))("pick_place", 0)
    assert env.unwrapped.renderer.wrist_window == 1.0


def test_objects_flag_sets_the_tabletop_scenes_and_is_refused_elsewhere(tmp_path, capsys):
    from vla_zoo.evaluation import main

    results = main(["--env", "tabletop", "--policy", "expert", "--tasks", "pick_place", "--episodes", "1",
                    "--objects", "1", "--videos", "0", "--out", str(tmp_path)])
    assert results["objects"] == 1 and results["success"]["pick_place"] == 1.0
    with pytest.raises(SystemExit):
        main(["--env", "metaworld", "--policy", "expert", "--objects", "3", "--out", str(tmp_path)])
    assert "--env metaworld has no such knob" in capsys.readouterr().err
