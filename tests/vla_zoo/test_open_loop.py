"""Open-loop evaluation: exact zero error for a replay, the known error for a known perturbation, plots, command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.vla_zoo.policy_fixtures import make_episodes
from vla_zoo.deploy.replay import ReplayPolicy
from vla_zoo.open_loop import main, open_loop_eval

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class OffsetPolicy:
    """Wraps a policy and adds a fixed offset to every action: the open-loop MSE must be offset**2 per dimension."""

    def __init__(self, inner: Any, offset: np.ndarray) -> None:
        self.inner, self.offset = inner, offset

    def metadata(self) -> dict[str, Any]:
        return self.inner.metadata()

    def reset(self) -> None:
        self.inner.reset()

    def get_action(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        return {"actions": self.inner.get_action(observation)["actions"] + self.offset}


def _assert_plots(out: Path, result: dict[str, Any]) -> None:
    for episode in result["episodes"]:
        data = (out / episode["plot"]).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


@pytest.mark.parametrize("execute_every", [3, 4])
def test_replay_gives_zero_error_and_writes_plots(tmp_path: Path, execute_every: int) -> None:
    episodes = make_episodes(np.random.default_rng(0), [11, 6, 9])
    policy = ReplayPolicy(episodes, horizon=4, stride=execute_every)
    result = open_loop_eval(policy, episodes, tmp_path, execute_every=execute_every)
    assert [e["mse_per_dim"] for e in result["episodes"]] == [[0.0, 0.0, 0.0]] * 3
    summary = result["embodiments"]["point_gripper"]
    assert summary["mse_per_dim"] == [0.0, 0.0, 0.0] and summary["steps"] == 26 and summary["episodes"] == 3
    np.testing.assert_allclose(summary["predicted_std"], summary["recorded_std"])
    assert json.loads((tmp_path / "open_loop.json").read_text()) == result
    _assert_plots(tmp_path, result)


def test_perturbed_and_idle_policies_give_the_known_error(tmp_path: Path) -> None:
    episodes = make_episodes(np.random.default_rng(1), [13, 8])
    offset = np.array([0.5, -0.25, 0.1], np.float32)
    result = open_loop_eval(OffsetPolicy(ReplayPolicy(episodes, horizon=4), offset), episodes, tmp_path / "offset")
    for e in result["episodes"]:
        np.testing.assert_allclose(e["mse_per_dim"], offset.astype(np.float64) ** 2, rtol=1e-5)
    np.testing.assert_allclose(result["embodiments"]["point_gripper"]["mse_per_dim"], offset**2, rtol=1e-5)

    # A policy that idles (always zero): MSE is the recorded mean square and the predicted std collapses to 0.
    idle = OffsetPolicy(ReplayPolicy(episodes, horizon=4), 0)
    idle.get_action = lambda observation: {"actions": np.zeros((4, 3), np.float32)}
    result = open_loop_eval(idle, episodes, tmp_path / "idle", max_episodes=1)
    assert len(result["episodes"]) == 1
    np.testing.assert_allclose(result["episodes"][0]["mse_per_dim"], (episodes[0].actions.astype(np.float64) ** 2).mean(0))
    summary = result["embodiments"]["point_gripper"]
    assert summary["predicted_std"] == [0.0, 0.0, 0.0] and min(summary["recorded_std"]) > 0.3


def test_bad_arguments_and_replies_are_named(tmp_path: Path) -> None:
    episodes = make_episodes(np.random.default_rng(2), [6])
    with pytest.raises(ValueError, match=r"execute_every must be in \[1, horizon=4\], got 5"):
        open_loop_eval(ReplayPolicy(episodes, horizon=4), episodes, tmp_path, execute_every=5)
    short = OffsetPolicy(ReplayPolicy(episodes, horizon=4), 0)
    short.get_action = lambda observation: {"actions": np.zeros((2, 3), np.float32)}
    with pytest.raises(ValueError, match=r"actions of shape \[2, 3\].*expected \[H >= 4, 3\]"):
        open_loop_eval(short, episodes, tmp_path)


def test_command_on_shards_with_replay(tmp_path: Path) -> None:
    from datamodules.episode import Modality
    from datamodules.shards import write_source

    episodes = make_episodes(np.random.default_rng(3), [10, 7, 5])
    modality = Modality(["x", "y", "grip"], ["dx", "dy", "grip"])
    write_source(episodes, tmp_path / "robot", source="robot", horizon=4, modality=modality)
    out = tmp_path / "eval"
    args = ["--replay", str(tmp_path / "robot"), "--shards", str(tmp_path / "robot"), "--out", str(out)]
    result = main([*args, "--execute-every", "2", "--max-episodes", "2"])
    assert result["execute_every"] == 2 and [e["index"] for e in result["episodes"]] == [0, 1]
    summary = result["embodiments"]["point_gripper"]
    assert summary["mse_per_dim"] == [0.0, 0.0, 0.0] and summary["action_names"] == ["dx", "dy", "grip"]
    assert sorted(p.name for p in out.glob("*.png")) == ["episode_0000.png", "episode_0001.png"]


def test_command_on_a_lerobot_dataset(tmp_path: Path) -> None:
    from tests.datamodules.test_lerobot import ACTION_NAMES, make_episodes as lerobot_episodes, write_v21

    root = write_v21(tmp_path / "ds", lerobot_episodes())
    kwargs = {"root": str(root), "embodiment": "test_arm", "horizon": 4, "stride": 2, "image_size": 32}
    result = main([
        "--policy", "tests.vla_zoo.policy_fixtures:lerobot_replay", "--policy-kwargs", json.dumps(kwargs),
        "--lerobot", str(root), "--embodiment", "test_arm", "--views", "top,wrist", "--execute-every", "2",
        "--out", str(tmp_path / "eval"),
    ])
    summary = result["embodiments"]["test_arm"]
    assert summary["mse_per_dim"] == [0.0, 0.0, 0.0] and summary["action_names"] == ACTION_NAMES
    assert summary["episodes"] == 3 and len(list((tmp_path / "eval").glob("*.png"))) == 3
