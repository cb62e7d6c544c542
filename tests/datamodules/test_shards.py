import json

import numpy as np
import pytest

from datamodules.episode import Modality
from datamodules.shards import decode_sample, iter_raw_samples, load_sidecars, read_episodes, shard_files, write_source
from tests.datamodules.synth import make_episodes


def test_write_then_read_episodes_round_trip(tmp_path):
    episodes = make_episodes(5, seed=1, state_dim=3, action_dim=2)
    modality = Modality(["x", "y", "grip"], ["dx", "grip"], {"pos": (0, 2), "grip": (2, 3)}, {"move": (0, 1)})
    meta = write_source(episodes, tmp_path, source="robot", horizon=4, modality=modality, samples_per_shard=7,
                        extra_metadata={"tier": "robot"})
    total = sum(e.length for e in episodes)
    assert meta["samples"] == total and meta["episodes"] == 5 and meta["tier"] == "robot"
    side = load_sidecars(tmp_path)
    assert sum(s["samples"] for s in side["index"]["shards"]) == total
    assert len(side["index"]["shards"]) == -(-total // 7)
    assert Modality.from_dict(side["modality"]) == modality
    all_actions = np.concatenate([e.actions for e in episodes])
    np.testing.assert_allclose(side["stats"]["actions"]["max"], all_actions.max(0), rtol=1e-6)
    np.testing.assert_allclose(side["stats"]["actions"]["q01"], np.quantile(all_actions, 0.01, axis=0), rtol=1e-5)

    back = list(read_episodes(tmp_path))
    assert len(back) == 5
    for a, b in zip(episodes, back):
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.actions, b.actions)
        assert a.instruction == b.instruction and a.metadata == b.metadata and a.embodiment == b.embodiment
        for v in a.frames:
            assert np.abs(a.frames[v].astype(int) - b.frames[v]).mean() < 6  # JPEG loss; neighbouring frames differ by ~40


def test_samples_carry_chunks_pad_masks_and_future_frames(tmp_path):
    (ep,) = make_episodes(1, seed=2, length=(6, 6))
    write_source([ep], tmp_path, source="robot", horizon=4)
    side = load_sidecars(tmp_path)
    samples = [decode_sample(s, side["source"]) for url in shard_files(tmp_path) for s in iter_raw_samples(url)]
    assert [s["meta"]["t"] for s in samples] == list(range(6))
    last = samples[4]  # t = 4 of T = 6: two real steps, two padded; the future frame is the last one
    np.testing.assert_array_equal(last["action_pad"], [False, False, True, True])
    np.testing.assert_array_equal(last["actions"][:2], ep.actions[4:6])
    np.testing.assert_array_equal(last["actions"][2:], 0)
    assert last["meta"]["t_future"] == 5
    assert np.abs(last["images"][1, 0].transpose(1, 2, 0).astype(int) - ep.frames["scene"][5]).mean() < 6


def test_actionless_source_has_the_same_members(tmp_path):
    write_source(make_episodes(2, has_action=False), tmp_path / "h", source="human", horizon=4)
    write_source(make_episodes(2), tmp_path / "r", source="robot", horizon=4)
    keys = []
    for d in ("h", "r"):
        raw = next(iter_raw_samples(next(iter(shard_files(tmp_path / d)))))
        keys.append(sorted(k for k in raw if not k.startswith("__")))
        assert "." not in raw["__key__"]
    assert keys[0] == keys[1]
    src = json.loads((tmp_path / "h" / "source.json").read_text())
    assert src["has_action"] is False
    assert all(e.actions is None and e.state is None for e in read_episodes(tmp_path / "h"))


def test_writer_rejects_inconsistent_episodes(tmp_path):
    eps = make_episodes(1, embodiment="arm") + make_episodes(1, embodiment="hand")
    with pytest.raises(ValueError, match="embodiment"):
        write_source(eps, tmp_path, source="mixed")
    with pytest.raises(ValueError, match="view name"):
        write_source(make_episodes(1, views=("scene.left",)), tmp_path, source="dots")


def test_privileged_state_round_trips_and_sources_without_it_still_decode(tmp_path):
    episodes = make_episodes(3, seed=4)
    rng = np.random.default_rng(0)
    for ep in episodes:
        ep.privileged = rng.normal(size=(ep.length, 5)).astype(np.float32)
    meta = write_source(episodes, tmp_path / "p", source="sim", horizon=4)
    assert meta["privileged_dim"] == 5
    side = load_sidecars(tmp_path / "p")
    all_privileged = np.concatenate([e.privileged for e in episodes])
    np.testing.assert_allclose(side["stats"]["privileged"]["mean"], all_privileged.mean(0), rtol=1e-5)
    for a, b in zip(episodes, read_episodes(tmp_path / "p")):
        np.testing.assert_array_equal(a.privileged, b.privileged)
    # A source written without it (or before the field existed) has no member and decodes as before.
    write_source(make_episodes(2), tmp_path / "r", source="robot", horizon=4)
    raw = next(iter_raw_samples(next(iter(shard_files(tmp_path / "r")))))
    assert "privileged.npy" not in raw
    old_meta = {k: v for k, v in load_sidecars(tmp_path / "r")["source"].items() if k != "privileged_dim"}
    assert "privileged" not in decode_sample(raw, old_meta)


def test_episodes_with_and_without_privileged_state_cannot_share_a_source(tmp_path):
    episodes = make_episodes(2)
    episodes[1].privileged = np.zeros((episodes[1].length, 3), np.float32)
    with pytest.raises(ValueError, match="privileged_dim"):
        write_source(episodes, tmp_path, source="sim", horizon=4)
