"""LeRobot both ways: our shards export to a LeRobot v3.0 folder that the importer reads back to the same arrays;
a Hub repo_id is read through LeRobot's own dataset class when the ``lerobot`` extra is installed."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from datamodules.lerobot import LeRobotFormatError, export_lerobot, load_lerobot_episodes, main
from datamodules.shards import read_episodes
from tests.datamodules.synth import make_source


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, Path]:
    source = make_source(tmp_path / "robot", "robot", 5, samples_per_shard=20)
    # 25 rows per data file: episodes of 6-14 steps spread over several files, as LeRobot packs them.
    export_lerobot(source, tmp_path / "lerobot", frames_per_file=25, progress=False)
    return source, tmp_path / "lerobot"


def test_exported_folder_reads_back_to_the_same_arrays(exported) -> None:
    source, folder = exported
    info = json.loads((folder / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 5
    assert len(list(folder.glob("data/chunk-*/file-*.parquet"))) > 1
    assert info["features"]["action"]["names"] == ["action_0", "action_1"]
    episodes, report = load_lerobot_episodes(folder, embodiment="arm", image_size=None)
    back, original = list(episodes), list(read_episodes(source))
    assert report.complete and not report.dropped and len(back) == len(original) == 5
    for got, want in zip(back, original):
        assert got.instruction == want.instruction and got.fps == want.fps
        np.testing.assert_array_equal(got.state, want.state)
        np.testing.assert_array_equal(got.actions, want.actions)
        assert set(got.frames) == set(want.frames) == {"scene", "wrist"}
        for view in want.frames:
            np.testing.assert_array_equal(got.frames[view], want.frames[view])


def test_actionless_sources_export_their_video_alone(tmp_path: Path) -> None:
    source = make_source(tmp_path / "human", "human", 2, has_action=False)
    info = export_lerobot(source, tmp_path / "out", progress=False)
    assert "action" not in info["features"] and "observation.state" not in info["features"]
    episodes, _ = load_lerobot_episodes(tmp_path / "out", embodiment="human", image_size=None)
    first = next(episodes)
    assert first.state is None and first.actions is None
    np.testing.assert_array_equal(first.frames["scene"], next(read_episodes(source)).frames["scene"])
    with pytest.raises(FileExistsError, match="already holds a LeRobot dataset"):
        export_lerobot(source, tmp_path / "out", progress=False)


def test_export_from_the_command_line(exported, tmp_path: Path, capsys) -> None:
    source, _ = exported
    assert main([str(source), str(tmp_path / "cli"), "--export"]) == 0
    assert json.loads(capsys.readouterr().out)["total_frames"] == sum(e.length for e in read_episodes(source))


def test_a_repo_id_is_read_through_lerobots_dataset_class(exported, monkeypatch) -> None:
    _, folder = exported
    monkeypatch.setitem(sys.modules, "lerobot", None)  # LeRobot not installed: the error says how to get it
    monkeypatch.setitem(sys.modules, "lerobot.datasets", None)
    monkeypatch.setitem(sys.modules, "lerobot.datasets.lerobot_dataset", None)
    monkeypatch.setitem(sys.modules, "lerobot.common.datasets.lerobot_dataset", None)
    with pytest.raises(LeRobotFormatError, match=r"user/pick_cube: not a local folder; .*pip install -e '.\[lerobot\]'"):
        load_lerobot_episodes("user/pick_cube", embodiment="arm")

    asked = []

    class LeRobotDataset:  # stands in for LeRobot's class: it downloads repo_id and exposes the local root
        def __init__(self, repo_id: str) -> None:
            asked.append(repo_id)
            self.root = folder

    monkeypatch.setitem(sys.modules, "lerobot.datasets.lerobot_dataset", types.SimpleNamespace(LeRobotDataset=LeRobotDataset))
    episodes, report = load_lerobot_episodes("user/pick_cube", embodiment="arm", image_size=None)
    assert asked == ["user/pick_cube"] and len(list(episodes)) == 5 and report.root == str(folder)
