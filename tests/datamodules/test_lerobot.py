"""LeRobot import: v2.1 and v3.0 fixtures written here, decoded frame by frame and checked against the source.

Every frame carries its dataset-wide frame index as 8 black/white bars (bit b = bar b), so a test can tell which
frame a decoder returned for each step: decoders that silently return a neighbouring frame fail here.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datamodules.lerobot import LeRobotFormatError, convert_lerobot, load_lerobot_episodes

REPO_ROOT = Path(__file__).resolve().parents[2]
FPS = 10
LENGTHS = (12, 9, 11)
TASKS = ["pick the red block", "push the blue block left"]
STATE_NAMES = ["x", "y", "z", "grip"]
ACTION_NAMES = ["dx", "dy", "grip"]
# v2.1 fixtures in h264, v3.0 in AV1 (LeRobot's default codec) where the encoders exist; short GOPs so that the
# v3.0 loader really seeks to a keyframe inside the shared mp4
H264 = "libx264" if "libx264" in av.codecs_available else "mpeg4"
AV1 = "libsvtav1" if "libsvtav1" in av.codecs_available else H264
H, W = 48, 64  # source frames; the loader resizes to image_size


def bars(code: int, h: int = H, w: int = W) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    for b in range(8):
        if code >> b & 1:
            img[:, b * w // 8:(b + 1) * w // 8] = 255
    return img


def read_bars(img: np.ndarray) -> int:
    h, w = img.shape[:2]
    row = img[h // 2, :, :].mean(axis=-1)
    return sum(1 << b for b in range(8) if row[int((b + 0.5) * w / 8)] > 128)


def make_episodes(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    eps, start = [], 0
    for e, t in enumerate(LENGTHS):
        eps.append({
            "index": e, "length": t, "start": start, "task_index": e % len(TASKS),
            "state": rng.normal(size=(t, len(STATE_NAMES))).astype(np.float32),
            "action": rng.normal(size=(t, len(ACTION_NAMES))).astype(np.float32),
        })
        start += t
    return eps


def write_mp4(path: Path, codes: list[int], codec: str = H264) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.gop_size = 4
        stream.options = {"g": "4"}
        for code in codes:
            for packet in stream.encode(av.VideoFrame.from_ndarray(bars(code), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def features(image_dtype: str) -> dict:
    return {
        "observation.images.top": {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"]},
        "observation.images.wrist": {"dtype": image_dtype, "shape": [H, W, 3], "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [4], "names": STATE_NAMES},
        "action": {"dtype": "float32", "shape": [3], "names": ACTION_NAMES},
        **{k: {"dtype": "int64", "shape": [1], "names": None} for k in ("frame_index", "episode_index", "index",
                                                                        "task_index")},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    }


def episode_table(ep: dict, with_wrist_images: bool) -> pa.Table:
    t = ep["length"]
    cols = {
        "observation.state": pa.array(list(ep["state"]), type=pa.list_(pa.float32())),
        "action": pa.array(list(ep["action"]), type=pa.list_(pa.float32())),
        "timestamp": pa.array(np.arange(t, dtype=np.float32) / FPS),
        "frame_index": pa.array(np.arange(t, dtype=np.int64)),
        "episode_index": pa.array(np.full(t, ep["index"], np.int64)),
        "index": pa.array(np.arange(ep["start"], ep["start"] + t, dtype=np.int64)),
        "task_index": pa.array(np.full(t, ep["task_index"], np.int64)),
    }
    if with_wrist_images:  # HF datasets' Image feature: struct {bytes, path}
        cols["observation.images.wrist"] = pa.array(
            [{"bytes": png(bars(255 - g)), "path": None} for g in range(ep["start"], ep["start"] + t)],
            type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    return pa.table(cols)


def write_v21(root: Path, eps: list[dict], video_lengths: dict[int, int] | None = None) -> Path:
    """One parquet + one mp4 per episode, jsonl metadata; the wrist camera is PNG embedded in the parquet."""
    (root / "meta").mkdir(parents=True)
    info = {
        "codebase_version": "v2.1", "robot_type": "test", "fps": FPS, "chunks_size": 1000,
        "total_episodes": len(eps), "total_frames": sum(e["length"] for e in eps), "total_tasks": len(TASKS),
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": features("image"),
    }
    (root / "meta/info.json").write_text(json.dumps(info))
    (root / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": s}) + "\n"
                                                   for i, s in enumerate(TASKS)))
    (root / "meta/episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e["index"], "tasks": [TASKS[e["task_index"]]], "length": e["length"]}) + "\n"
        for e in eps))
    for e in eps:
        path = root / f"data/chunk-000/episode_{e['index']:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(episode_table(e, with_wrist_images=True), path)
        n = (video_lengths or {}).get(e["index"], e["length"])
        write_mp4(root / f"videos/chunk-000/observation.images.top/episode_{e['index']:06d}.mp4",
                  list(range(e["start"], e["start"] + n)))
    return root


def write_v30(root: Path, eps: list[dict], video_lengths: dict[int, int] | None = None) -> Path:
    """All episodes in one data parquet and one mp4 per camera; per-episode offsets in meta/episodes."""
    (root / "meta").mkdir(parents=True)
    info = {
        "codebase_version": "v3.0", "robot_type": "test", "fps": FPS, "chunks_size": 1000,
        "total_episodes": len(eps), "total_frames": sum(e["length"] for e in eps), "total_tasks": len(TASKS),
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": {**features("video")},
    }
    (root / "meta/info.json").write_text(json.dumps(info))
    # pandas writes the task strings as the frame's unnamed index
    pq.write_table(pa.table({"task_index": list(range(len(TASKS))), "__index_level_0__": TASKS}),
                   root / "meta/tasks.parquet")
    (root / "data/chunk-000").mkdir(parents=True)
    pq.write_table(pa.concat_tables([episode_table(e, with_wrist_images=False) for e in eps]),
                   root / "data/chunk-000/file-000.parquet")
    rows, codes, t = [], {"top": [], "wrist": []}, 0.0
    for e in eps:
        n = (video_lengths or {}).get(e["index"], e["length"])
        row = {"episode_index": e["index"], "tasks": [TASKS[e["task_index"]]], "length": e["length"],
               "data/chunk_index": 0, "data/file_index": 0,
               "dataset_from_index": e["start"], "dataset_to_index": e["start"] + e["length"]}
        for cam, offset in (("top", 0), ("wrist", 128)):
            codes[cam] += [offset + g for g in range(e["start"], e["start"] + n)]
            row |= {f"videos/observation.images.{cam}/chunk_index": 0,
                    f"videos/observation.images.{cam}/file_index": 0,
                    f"videos/observation.images.{cam}/from_timestamp": t,
                    f"videos/observation.images.{cam}/to_timestamp": t + n / FPS}
        rows.append(row)
        t += n / FPS
    for cam in codes:
        write_mp4(root / f"videos/observation.images.{cam}/chunk-000/file-000.mp4", codes[cam], AV1)
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    return root


@pytest.fixture(scope="module")
def eps():
    return make_episodes()


@pytest.fixture(scope="module")
def v21(tmp_path_factory, eps):
    return write_v21(tmp_path_factory.mktemp("v21") / "ds", eps)


@pytest.fixture(scope="module")
def v30(tmp_path_factory, eps):
    return write_v30(tmp_path_factory.mktemp("v30") / "ds", eps)


def load(root, **kw):
    episodes, report = load_lerobot_episodes(root, embodiment="test_arm", **kw)
    return list(episodes), report


def check_frames(ep, src: dict, view: str, offset: int = 0, invert: bool = False) -> None:
    got = [read_bars(f) for f in ep.frames[view]]
    want = [(255 - g) if invert else offset + g for g in range(src["start"], src["start"] + src["length"])]
    assert got == want, f"episode {src['index']} view {view}: decoded frames {got}, expected {want}"


@pytest.mark.parametrize("layout", ["v21", "v30"])
def test_round_trip_frames_state_actions(layout, request, eps):
    root = request.getfixturevalue(layout)
    episodes, report = load(root, image_size=32)
    assert report.complete and report.dropped == [] and report.converted == [0, 1, 2]
    assert report.codebase_version == {"v21": "v2.1", "v30": "v3.0"}[layout]
    assert report.modality.state_names == STATE_NAMES and report.modality.action_names == ACTION_NAMES
    for ep, src in zip(episodes, eps):
        assert list(ep.frames) == ["top", "wrist"]
        assert ep.frames["top"].shape == (src["length"], 32, 32, 3) and ep.frames["top"].dtype == np.uint8
        check_frames(ep, src, "top")
        if layout == "v21":
            check_frames(ep, src, "wrist", invert=True)  # PNG bytes inside the parquet
        else:
            check_frames(ep, src, "wrist", offset=128)  # second camera of the shared mp4
        np.testing.assert_array_equal(ep.state, src["state"])
        np.testing.assert_array_equal(ep.actions, src["action"])
        assert ep.state.dtype == ep.actions.dtype == np.float32
        assert ep.instruction == TASKS[src["task_index"]] and ep.fps == FPS and ep.embodiment == "test_arm"
        assert ep.metadata == {"episode_index": src["index"], "task_index": src["task_index"]}


def test_native_size_and_view_selection(v30, eps):
    episodes, report = load(v30, image_size=None, views=["wrist"])
    assert list(report.views) == ["wrist"] and all(list(ep.frames) == ["wrist"] for ep in episodes)
    assert episodes[0].frames["wrist"].shape == (LENGTHS[0], H, W, 3)
    check_frames(episodes[2], eps[2], "wrist", offset=128)
    with pytest.raises(ValueError, match=r"views \['side'\].*available views: \['top', 'wrist'\]"):
        load(v30, views=["side"])


@pytest.mark.parametrize("layout", ["v21", "v30"])
def test_short_video_episode_dropped_and_reported(layout, tmp_path, eps):
    write = {"v21": write_v21, "v30": write_v30}[layout]
    root = write(tmp_path / "ds", eps, video_lengths={1: LENGTHS[1] - 1})
    episodes, report = load(root, image_size=32)
    assert report.converted == [0, 2] and [d["episode_index"] for d in report.dropped] == [1]
    assert "holds 8 frames" in report.dropped[0]["reason"] and "9 rows" in report.dropped[0]["reason"]
    # v3.0: episode 2 starts a frame earlier in the shared mp4 than in the data; its from_timestamp says so
    check_frames(episodes[1], eps[2], "top")
    assert report.to_dict()["episodes_dropped"] == 1


def test_timestamp_jump_and_frame_index_gap_dropped(tmp_path, eps):
    root = write_v21(tmp_path / "ds", eps)
    for index, mutate in ((0, "timestamp"), (2, "frame_index")):
        path = root / f"data/chunk-000/episode_{index:06d}.parquet"
        table = pq.read_table(path)
        values = table[mutate].to_numpy().copy()
        values[5:] += 1.0 / FPS if mutate == "timestamp" else 1
        pq.write_table(table.set_column(table.schema.get_field_index(mutate), mutate,
                                        pa.array(values, type=table.schema.field(mutate).type)), path)
    _, report = load(root)
    reasons = {d["episode_index"]: d["reason"] for d in report.dropped}
    assert report.converted == [1] and set(reasons) == {0, 2}
    assert "timestamps not 1/fps" in reasons[0] and "row 5" in reasons[0]
    assert "frame_index not contiguous" in reasons[2] and "row 5" in reasons[2]


def test_images_as_png_files(tmp_path, eps):
    root = write_v21(tmp_path / "ds", eps)
    for e in eps:  # move the wrist images out of the parquet into LeRobot's images/ folder layout
        path = root / f"data/chunk-000/episode_{e['index']:06d}.parquet"
        table = pq.read_table(path)
        for f, blob in enumerate(table["observation.images.wrist"].combine_chunks().field("bytes").to_pylist()):
            png_path = root / f"images/observation.images.wrist/episode-{e['index']:06d}/frame-{f:06d}.png"
            png_path.parent.mkdir(parents=True, exist_ok=True)
            png_path.write_bytes(blob)
        pq.write_table(table.drop_columns(["observation.images.wrist"]), path)
    (root / "images/observation.images.wrist/episode-000001/frame-000004.png").unlink()
    episodes, report = load(root, views=["wrist"], image_size=None)
    assert report.converted == [0, 2] and "image observation.images.wrist of frame 4" in report.dropped[0]["reason"]
    for ep, src in zip(episodes, [eps[0], eps[2]]):
        np.testing.assert_array_equal(ep.frames["wrist"], np.stack([bars(255 - g) for g in
                                                                   range(src["start"], src["start"] + src["length"])]))


def test_length_disagreeing_with_episodes_metadata_dropped(tmp_path, eps):
    root = write_v21(tmp_path / "ds", eps)
    lines = (root / "meta/episodes.jsonl").read_text().splitlines()
    row = json.loads(lines[1]) | {"length": 10}
    (root / "meta/episodes.jsonl").write_text("\n".join([lines[0], json.dumps(row), lines[2]]) + "\n")
    _, report = load(root)
    assert report.dropped == [{"episode_index": 1, "reason": "parquet has 9 rows, episodes metadata says length 10"}]


def test_modality_json_slices_renames_and_annotation(tmp_path, eps):
    root = write_v21(tmp_path / "ds", eps)
    for e in eps:  # GR00T keeps the instruction's task index in an annotation column
        path = root / f"data/chunk-000/episode_{e['index']:06d}.parquet"
        table = pq.read_table(path)
        table = table.append_column("annotation.human.action.task_description",
                                    pa.array(np.full(e["length"], 1 - e["task_index"], np.int64)))
        pq.write_table(table, path)
    modality = {
        "state": {"xy": {"start": 0, "end": 2}, "gripper": {"start": 3, "end": 4}},  # skips z
        "action": {"delta": {"start": 0, "end": 2, "absolute": False}, "gripper": {"start": 2, "end": 3}},
        "video": {"front": {"original_key": "observation.images.top"}},
        "annotation": {"human.action.task_description": {}, "human.validity": {}},
    }
    (root / "meta/modality.json").write_text(json.dumps(modality))
    episodes, report = load(root, image_size=32)
    m = report.modality
    assert m.state_names == ["x", "y", "grip"] and m.state_groups == {"xy": (0, 2), "gripper": (2, 3)}
    assert m.action_names == ACTION_NAMES and m.action_groups == {"delta": (0, 2), "gripper": (2, 3)}
    assert report.views == {"front": "observation.images.top"}
    for ep, src in zip(episodes, eps):
        np.testing.assert_array_equal(ep.state, src["state"][:, [0, 1, 3]])
        np.testing.assert_array_equal(ep.actions, src["action"])
        assert list(ep.frames) == ["front"]
        check_frames(ep, src, "front")
        assert ep.instruction == TASKS[1 - src["task_index"]]

    modality["state"]["xy"]["end"] = 7
    (root / "meta/modality.json").write_text(json.dumps(modality))
    with pytest.raises(LeRobotFormatError, match=r"modality\.json: state\.xy\.start/end: \[0, 7\).*size 4"):
        load(root)


def test_malformed_datasets_name_file_and_key(tmp_path, eps):
    with pytest.raises(LeRobotFormatError, match=r"meta/info\.json: \(file\): missing"):
        load(tmp_path)

    root = write_v21(tmp_path / "ds", eps[:2])
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps(info | {"codebase_version": "v1.6"}))
    with pytest.raises(LeRobotFormatError, match=r"info\.json: codebase_version: 'v1\.6' is not supported"):
        load(root)
    (root / "meta/info.json").write_text(json.dumps(info))

    video = root / "videos/chunk-000/observation.images.top/episode_000001.mp4"
    video.rename(video.with_suffix(".bak"))
    with pytest.raises(LeRobotFormatError, match=r"episode_000001\.mp4: episode 1 video observation\.images\.top"):
        load(root)
    video.with_suffix(".bak").rename(video)

    path = root / "data/chunk-000/episode_000000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["action"]), path)
    with pytest.raises(LeRobotFormatError, match=r"episode_000000\.parquet: action: missing column"):
        load(root)


def test_v30_missing_episodes_column(tmp_path, eps):
    root = write_v30(tmp_path / "ds", eps)
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["videos/observation.images.top/from_timestamp"]), path)
    with pytest.raises(LeRobotFormatError, match=r"file-000\.parquet: videos/observation\.images\.top/from_timestamp"):
        load(root)


def test_cli_reports_malformed_dataset(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/info.json").write_text(json.dumps({"codebase_version": "v9.9", "fps": 10, "features": {}}))
    proc = subprocess.run([sys.executable, "-m", "datamodules.lerobot", str(tmp_path), str(tmp_path / "out"),
                           "--embodiment", "arm"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "meta/info.json: codebase_version: 'v9.9' is not supported" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_converted_shards_read_back_equal_the_source(tmp_path, eps):
    shards = pytest.importorskip("datamodules.shards")
    root = write_v30(tmp_path / "ds", eps, video_lengths={1: LENGTHS[1] - 1})
    result = convert_lerobot(root, tmp_path / "out", source="lr", embodiment="test_arm", horizon=4, image_size=32)
    assert [d["episode_index"] for d in result["report"]["dropped"]] == [1]
    source = json.loads((tmp_path / "out/source.json").read_text())
    assert source["episodes"] == result["source"]["episodes"] == 2
    assert source["embodiment"] == "test_arm" and source["has_action"] and source["fps"] == FPS
    assert list(source["views"]) == ["top", "wrist"]
    back = list(shards.read_episodes(tmp_path / "out"))
    assert len(back) == 2
    for ep, src in zip(back, [eps[0], eps[2]]):
        check_frames(ep, src, "top")  # bars survive the JPEG round trip
        check_frames(ep, src, "wrist", offset=128)
        np.testing.assert_array_equal(ep.state, src["state"])
        np.testing.assert_array_equal(ep.actions, src["action"])
        assert ep.instruction == TASKS[src["task_index"]]


def test_cli_converts_and_prints_summary(tmp_path, eps):
    pytest.importorskip("datamodules.shards")
    root = write_v21(tmp_path / "ds", eps, video_lengths={2: LENGTHS[2] - 1})
    proc = subprocess.run([sys.executable, "-m", "datamodules.lerobot", str(root), str(tmp_path / "out"),
                           "--embodiment", "arm", "--views", "top", "--image-size", "32"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["report"]["episodes_converted"] == 2 and summary["report"]["dropped"][0]["episode_index"] == 2
    assert summary["source"]["name"] == "ds" and summary["source"]["episodes"] == 2
