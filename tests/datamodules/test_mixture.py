import inspect
import logging
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch.utils.data import DataLoader

from datamodules import schema
from datamodules.mixture import MixtureDataModule, SourceConfig, normalizers_from_state
from datamodules.shards import read_episodes
from tests.datamodules.synth import FAULTS, corrupt_shard, make_source

WEIGHTS = {"a": 0.5, "b": 0.25, "c": 0.15, "d": 0.10, "zero": 0.0}
EMBODIMENTS = {"arm": 0, "gripper": 1, "hand": 2}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pool")
    make_source(root / "a", "a", 8, seed=0, embodiment="arm", state_dim=3, action_dim=2)
    make_source(root / "b", "b", 6, seed=1, embodiment="arm", state_dim=3, action_dim=2, action_offset=5.0)
    make_source(root / "c", "c", 6, seed=2, embodiment="gripper", state_dim=2, action_dim=3)
    make_source(root / "d", "d", 4, seed=3, embodiment="hand", has_action=False)
    make_source(root / "zero", "zero", 3, seed=4, embodiment="arm", state_dim=3, action_dim=2)
    return root


def sources(pool: Path, names=WEIGHTS, **overrides) -> list[dict]:
    emb = {"a": "arm", "b": "arm", "c": "gripper", "d": "hand", "zero": "arm"}
    return [dict(name=n, shards=str(pool / n / "shard-*.tar"), embodiment=emb[n], weight=WEIGHTS[n],
                 has_action=n != "d", **overrides.get(n, {})) for n in names]


def datamodule(pool, **kwargs) -> MixtureDataModule:
    kwargs = {"sources": sources(pool), "embodiments": EMBODIMENTS, "horizon": 4, "max_state_dim": 4,
              "max_action_dim": 4, "batch_size": 50, "batches_per_epoch": 400, "shuffle_buffer": 16, **kwargs}
    dm = MixtureDataModule(**kwargs)
    dm.setup()
    return dm


def drawn_sources(loader) -> Counter:
    counts = Counter()
    for batch in loader:
        counts.update(batch[schema.SOURCE_ID].tolist())
    return counts


def assert_ratios(counts: Counter, n: int) -> None:
    names = list(WEIGHTS)
    assert sum(counts.values()) == n
    assert counts[names.index("zero")] == 0  # a zero-weight source never appears
    active = [i for i, name in enumerate(names) if WEIGHTS[name] > 0]
    observed = np.array([counts[i] for i in active])
    expected = np.array([WEIGHTS[names[i]] for i in active]) * n
    assert chisquare(observed, expected).pvalue > 0.001, (observed, expected)
    np.testing.assert_allclose(observed / n, expected / n, atol=0.015)


@pytest.mark.slow
def test_mixture_ratios_single_process(pool):
    dm = datamodule(pool)
    assert_ratios(drawn_sources(dm.train_dataloader()), 20_000)


@pytest.mark.slow
def test_mixture_ratios_with_two_workers_and_two_ranks(pool):
    dm = datamodule(pool, batches_per_epoch=200)
    counts, keys = Counter(), []
    for rank in range(2):  # every simulated rank yields exactly batches_per_epoch batches
        loader = DataLoader(dm.make_dataset(rank=rank, world_size=2), batch_size=None, num_workers=2)
        batches = list(loader)
        assert len(batches) == 200
        for b in batches:
            counts.update(b[schema.SOURCE_ID].tolist())
        keys.append([t for b in batches[:20] for t in zip(*(b[k].tolist() for k in ("source_id", "episode", "step")))])
    assert keys[0] != keys[1]  # ranks draw different streams
    assert_ratios(counts, 20_000)


def first_keys(dm: MixtureDataModule, n: int = 1000, epoch: int = 0) -> list[tuple[int, int, int]]:
    keys = []
    for batch in dm.make_dataset(rank=0, world_size=1, epoch=epoch):
        keys += zip(batch["source_id"].tolist(), batch["episode"].tolist(), batch["step"].tolist())
        if len(keys) >= n:
            return keys[:n]
    raise AssertionError("stream ended early")


def test_same_seed_same_stream_different_seed_different(pool):
    a, b, c = (first_keys(datamodule(pool, seed=s)) for s in (7, 7, 8))
    assert a == b
    assert a != c and sum(x == y for x, y in zip(a, c)) < 100


def test_balance_by_size_weights_by_sample_count(pool):
    dm = datamodule(pool, balance_by_size=True)
    size = {r.config.name: r.samples for r in dm.resolved}
    raw = np.array([WEIGHTS[n] * size[n] for n in WEIGHTS])
    np.testing.assert_allclose(dm.mixture_weights(), raw / raw.sum())


def test_batches_follow_the_schema_for_action_and_actionless_sources(pool):
    dm = datamodule(pool, batch_size=64, batches_per_epoch=3)
    batch = next(iter(dm.train_dataloader()))
    errors = batch.pop("_errors")
    assert errors == {"counts": {}, "named": []}
    assert set(batch) == set(schema.ALL_KEYS)
    B, H = 64, 4
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (B, 2, 2, 3, 16, 16)
    assert batch["state"].shape == (B, 4) and batch["actions"].shape == (B, H, 4)
    for k in ("state_mask", "action_mask", "has_action"):
        assert batch[k].dtype == torch.bool
    src = batch["source_id"]
    names = list(WEIGHTS)
    human = src == names.index("d")
    assert human.any() and (~human).any()
    assert not batch["has_action"][human].any() and batch["has_action"][~human].all()
    assert not batch["action_mask"][human].any() and not batch["state_mask"][human].any()
    assert (batch["actions"][human] == 0).all() and (batch["state"][human] == 0).all()
    assert (batch["embodiment_id"][human] == EMBODIMENTS["hand"]).all()
    arm = (src == 0) | (src == 1)
    # arm: 2 action dims, 3 state dims; masked dims and padded steps are zero
    assert batch["state_mask"][arm][:, :3].all() and not batch["state_mask"][arm][:, 3:].any()
    assert not batch["action_mask"][arm][:, :, 2:].any()
    assert (batch["actions"][~batch["action_mask"]] == 0).all()
    assert (batch["actions"].abs() <= 1).all()  # min-max to [-1, 1]
    # anchors near an episode end have padded steps, masked out
    real_steps = batch["action_mask"][arm][:, :, 0].sum(1)
    assert (real_steps < H).any() and (real_steps >= 1).all()


def test_sources_of_one_embodiment_share_combined_statistics(pool):
    dm = datamodule(pool)
    raw = np.concatenate([e.actions for n in ("a", "b", "zero") for e in read_episodes(pool / n)])
    arm = dm.normalizers["arm"]
    np.testing.assert_allclose(arm.stats["actions"]["min"], raw.min(0), rtol=1e-6)
    np.testing.assert_allclose(arm.stats["actions"]["max"], raw.max(0), rtol=1e-6)
    assert dm.normalizers["gripper"].dim("actions") == 3 and dm.normalizers["hand"].dim("actions") == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s, p: s[0].update(shards=str(p / "nothing" / "*.tar")), "'a'.*matches no files"),
        (lambda s, p: s[1].update(embodiment="tank"), "'b'.*unknown embodiment 'tank'"),
        (lambda s, p: s[2].update(weight=-0.1), "'c'.*weight must be >= 0"),
        (lambda s, p: s[2].update(weight=float("inf")), "'c'.*weight must be >= 0 and finite, got inf"),
        (lambda s, p: s[1].update(weight=float("nan")), "'b'.*weight must be >= 0 and finite, got nan"),
        (lambda s, p: s[3].update(name="a"), "duplicate source name.*'a'"),
        (lambda s, p: s[1].update(normalization="z_score"), "'b'.*normalization 'z_score'"),
        (lambda s, p: s[3].update(has_action=True), "'d'.*no actions"),
    ],
)
def test_config_errors_name_the_source(pool, change, message):
    cfg = sources(pool)
    change(cfg, pool)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        datamodule(pool, sources=cfg)


def test_embodiments_sharing_a_slot_are_a_config_error(pool):
    with pytest.raises(ValueError, match=r"embodiments: \['arm', 'hand'\] share slot 0; give each"):
        datamodule(pool, embodiments={"arm": 0, "gripper": 1, "hand": 0})
    with pytest.raises(ValueError, match="'hand' has slot -1"):
        datamodule(pool, embodiments={"arm": 0, "gripper": 1, "hand": -1})


def test_missing_stats_names_the_source(pool, tmp_path):
    make_source(tmp_path / "x", "x", 2, embodiment="arm")
    (tmp_path / "x" / "stats.json").unlink()
    cfg = sources(pool, ["a"]) + [dict(name="x", shards=str(tmp_path / "x"), embodiment="arm")]
    with pytest.raises(FileNotFoundError, match="source 'x'.*stats.json"):
        datamodule(pool, sources=cfg)


def test_non_finite_statistics_are_refused_naming_file_and_key(pool, tmp_path):
    import json

    src = make_source(tmp_path / "x", "x", 2, embodiment="arm")
    stats = json.loads((src / "stats.json").read_text())
    stats["actions"]["mean"][1] = float("nan")
    (src / "stats.json").write_text(json.dumps(stats))  # json writes NaN, and reads it back
    cfg = sources(pool, ["a"]) + [dict(name="x", shards=str(src), embodiment="arm")]
    with pytest.raises(ValueError, match=r"source 'x': .*x/stats.json holds non-finite .*actions\.mean\[1\] = nan"):
        datamodule(pool, sources=cfg)


def test_mismatched_views_or_image_size_fail_at_startup(pool, tmp_path):
    make_source(tmp_path / "big", "big", 2, embodiment="arm", size=24)
    cfg = sources(pool, ["a"]) + [dict(name="big", shards=str(tmp_path / "big"), embodiment="arm")]
    with pytest.raises(ValueError, match="different image sizes.*image_size"):
        datamodule(pool, sources=cfg)
    dm = datamodule(pool, sources=cfg, image_size=20, batches_per_epoch=2)
    assert next(iter(dm.train_dataloader()))["images"].shape[-2:] == (20, 20)
    cfg[1]["views"] = ["wrist"]
    with pytest.raises(ValueError, match="different numbers of views"):
        datamodule(pool, sources=cfg)


@pytest.mark.parametrize("fault", FAULTS)
def test_corrupt_samples_are_skipped_and_counted(pool, tmp_path, fault):
    make_source(tmp_path / "bad", "bad", 4, seed=5, embodiment="arm", samples_per_shard=100)
    corrupt_shard(tmp_path / "bad" / "shard-000000.tar", fault)
    cfg = sources(pool, ["a"]) + [dict(name="bad", shards=str(tmp_path / "bad"), embodiment="arm", weight=1.0)]
    dm = datamodule(pool, sources=cfg, batch_size=40, batches_per_epoch=10)
    errors, sources_seen = Counter(), Counter()
    for batch in dm.train_dataloader():
        errors.update(batch.pop("_errors")["counts"])
        sources_seen.update(batch["source_id"].tolist())
        assert torch.isfinite(batch["actions"]).all()
    assert errors[f"bad/{fault}"] >= 1, errors
    assert set(k.split("/")[0] for k in errors) == {"bad"}
    assert sources_seen[1] > 100  # the good samples of the damaged source keep flowing


def test_skipped_sample_warnings_name_the_shard_and_the_key(pool, tmp_path, caplog):
    make_source(tmp_path / "bad", "bad", 4, seed=5, embodiment="arm", samples_per_shard=100)
    shard = tmp_path / "bad" / "shard-000000.tar"
    key = corrupt_shard(shard, "duplicate_key")
    cfg = [dict(name="bad", shards=str(tmp_path / "bad"), embodiment="arm", weight=1.0)]
    dm = datamodule(pool, sources=cfg, batch_size=40, batches_per_epoch=4)
    dm.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1)  # on_after_batch_transfer: training only
    with caplog.at_level(logging.WARNING, logger="datamodules.mixture"):
        for batch in dm.train_dataloader():
            assert "_errors" not in dm.on_after_batch_transfer(batch, 0)
    assert dm.error_counts["bad/duplicate_key"] >= 1
    assert any(f"source 'bad': {shard}:{key}: duplicate_key" in r.getMessage() for r in caplog.records), caplog.text


def test_all_corrupt_source_raises_quickly(pool, tmp_path):
    make_source(tmp_path / "rotten", "rotten", 3, embodiment="arm", samples_per_shard=10)
    for shard in (tmp_path / "rotten").glob("*.tar"):
        corrupt_shard(shard, "non_finite", every=True)
    cfg = sources(pool, ["a"]) + [dict(name="rotten", shards=str(tmp_path / "rotten"), embodiment="arm")]
    dm = datamodule(pool, sources=cfg, batch_size=8, max_consecutive_errors=50)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="source 'rotten' failed 50 times in a row.*non_finite"):
        for _ in dm.train_dataloader():
            pass
    assert time.perf_counter() - start < 10


def test_state_dict_round_trip_and_resume_draws_a_fresh_reproducible_stream(pool):
    dm = datamodule(pool, batches_per_epoch=20, seed=3)

    def epoch_keys(loader):
        return [tuple(zip(b["source_id"].tolist(), b["episode"].tolist(), b["step"].tolist())) for b in loader]

    first = epoch_keys(dm.train_dataloader())
    state = dm.state_dict()
    assert state["epochs_started"] == 1 and state["embodiments"] == EMBODIMENTS
    assert set(state["modalities"]) == set(EMBODIMENTS)

    resumed = datamodule(pool, batches_per_epoch=20, seed=3)
    resumed.load_state_dict(state)
    after_resume = epoch_keys(resumed.train_dataloader())
    again = datamodule(pool, batches_per_epoch=20, seed=3)
    again.load_state_dict(state)
    assert after_resume != first  # not a replay of the samples already seen
    assert after_resume == epoch_keys(again.train_dataloader())  # but reproducible
    assert after_resume == epoch_keys(dm.train_dataloader())  # and the same as an uninterrupted run

    norms = normalizers_from_state(state)
    ep = next(read_episodes(pool / "b"))
    y = norms["arm"].normalize(ep.actions)
    np.testing.assert_allclose(norms["arm"].unnormalize(y), ep.actions, atol=1e-5)
    with pytest.raises(ValueError, match="embodiment map"):
        datamodule(pool, embodiments={**EMBODIMENTS, "tank": 3}).load_state_dict(state)


def test_source_config_dataclass_is_accepted(pool):
    cfg = [SourceConfig(name="a", shards=str(pool / "a"), embodiment="arm", weight=1.0)]
    dm = datamodule(pool, sources=cfg, batches_per_epoch=1)
    assert next(iter(dm.train_dataloader()))["source_id"].eq(0).all()


def _stream(dm, num_workers=0):
    """(source, episode, step, image checksum) of every sample, and the error counts, of one epoch."""
    keys, errors = [], Counter()
    for batch in DataLoader(dm.make_dataset(), batch_size=None, num_workers=num_workers):
        errors.update(batch.pop("_errors")["counts"])
        sums = batch[schema.IMAGES].flatten(1).long().sum(1)
        keys += list(zip(*(batch[k].tolist() for k in ("source_id", "episode", "step")), sums.tolist()))
    return keys, errors


@pytest.mark.parametrize("fault", ["undecodable_image", "truncated_tar"])
def test_cached_source_counts_the_corrupt_samples_of_its_tars(pool, tmp_path, fault):
    """``cache: true`` decodes a source into memory once; the corrupt samples are still skipped and counted."""
    make_source(tmp_path / "bad", "bad", 4, seed=5, embodiment="arm", samples_per_shard=40)
    corrupt_shard(tmp_path / "bad" / "shard-000000.tar", fault)
    cfg = [dict(name="bad", shards=str(tmp_path / "bad"), embodiment="arm", weight=1.0, cache=True)]
    cached = datamodule(pool, sources=cfg, batch_size=20, batches_per_epoch=30, seed=7)
    keys, errors = _stream(cached)
    assert errors[f"bad/{fault}"] >= 1
    assert cached.resolved[0].decoded is not None
    # Worker processes read the parent's decoded samples (fork).
    assert len(_stream(cached, num_workers=2)[0]) == len(keys)


def test_cached_source_is_drawn_uniformly_across_shards_and_streamed_one_shard_at_a_time(tmp_path):
    """Shards written in task order (one task per shard here, as Meta-World's generator writes task by task): a
    batch from the cached source mixes the tasks as uniform draws do, and every sample comes up once per pass; a
    streamed source reads one shard at a time through its buffer, so its batches hold far fewer."""
    make_source(tmp_path / "s", "s", 16, seed=3, embodiment="arm", length=(10, 10), samples_per_shard=20)
    shard_of = lambda episode: episode // 2  # noqa: E731  (2 episodes of 10 steps per shard, 8 shards)

    def batches(cache: bool | None, mixture_cache: bool = False) -> list[list[tuple[int, int]]]:
        cfg = [dict(name="s", shards=str(tmp_path / "s"), embodiment="arm", weight=1.0, cache=cache)]
        dm = datamodule(tmp_path, sources=cfg, batch_size=32, batches_per_epoch=40, seed=1, cache=mixture_cache)
        return [list(zip(b["episode"].tolist(), b["step"].tolist())) for b in dm.train_dataloader()]

    def mean_shards_per_batch(bs) -> float:
        return float(np.mean([len({shard_of(e) for e, _ in b}) for b in bs]))

    cached, streamed = batches(True), batches(False)
    # Uniform draws of 32 from 8 equal shards touch 8 * (1 - (7/8)^32) = 7.9 of them on average.
    assert mean_shards_per_batch(cached) > 7.5 and mean_shards_per_batch(streamed) < 5  # 7.85 and 3.7 measured
    counts = Counter(k for b in cached for k in b)  # 1,280 draws over 160 samples: 8 passes, each a permutation
    assert len(counts) == 160 and max(counts.values()) - min(counts.values()) <= 2
    # The mixture's `cache` is the default of the sources that leave theirs unset; a source's own value wins.
    assert mean_shards_per_batch(batches(None)) < 5
    assert mean_shards_per_batch(batches(None, mixture_cache=True)) > 7.5
    assert mean_shards_per_batch(batches(False, mixture_cache=True)) < 5


def test_default_shuffle_buffer_mixes_the_episodes_of_a_streamed_source(tmp_path):
    """Shards hold whole episodes in order (as the tabletop generator writes 1,000 samples per shard), so a streamed
    source's batches mix only the episodes its buffer spans: the default buffer must bring a batch close to the
    episode diversity of uniform draws, where the old default of 64 did not."""
    make_source(tmp_path / "s", "s", 80, seed=5, embodiment="arm", length=(25, 25), samples_per_shard=1000, size=8)
    default = inspect.signature(MixtureDataModule).parameters["shuffle_buffer"].default

    def episodes_per_batch(buffer: int) -> float:
        cfg = [dict(name="s", shards=str(tmp_path / "s"), embodiment="arm", weight=1.0)]
        dm = datamodule(tmp_path, sources=cfg, batch_size=32, batches_per_epoch=60, seed=2, shuffle_buffer=buffer)
        batches = list(dm.train_dataloader())[10:]  # past the buffer's fill
        return float(np.mean([len(set(b["episode"].tolist())) for b in batches]))

    # Uniform draws of 32 from 80 episodes touch 80 * (1 - (79/80)^32) = 26.5 of them on average.
    small, large = episodes_per_batch(64), episodes_per_batch(default)
    assert small < 12 and large > 22, (small, large)  # 8.7 and 25.2 measured


def test_privileged_state_is_standardised_per_source_and_masked_where_a_source_lacks_it(pool, tmp_path):
    from tests.datamodules.synth import make_episodes
    from datamodules.shards import write_source

    episodes = make_episodes(6, seed=7, embodiment="arm", state_dim=3, action_dim=2)
    rng = np.random.default_rng(1)
    for ep in episodes:  # positions in metres around a table: far from zero mean and unit spread
        ep.privileged = (np.array([0.1, 0.8, 0.05]) + 0.05 * rng.normal(size=(ep.length, 3))).astype(np.float32)
    write_source(episodes, tmp_path / "priv", source="priv", horizon=4)
    cfgs = sources(pool, names=["a"]) + [dict(name="priv", shards=str(tmp_path / "priv"), embodiment="arm")]
    dm = datamodule(pool, sources=cfgs, batch_size=256, batches_per_epoch=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch[schema.PRIVILEGED].shape == (256, 3) and batch[schema.PRIVILEGED_MASK].dtype == torch.bool
    has = batch[schema.SOURCE_ID] == 1
    assert batch[schema.PRIVILEGED_MASK][has].all() and not batch[schema.PRIVILEGED_MASK][~has].any()
    assert (batch[schema.PRIVILEGED][~has] == 0).all()
    values = batch[schema.PRIVILEGED][has]
    assert values.mean(0).abs().max() < 0.3 and ((values.std(0) - 1).abs() < 0.3).all()
    # A mixture of sources that have none carries no privileged keys at all.
    plain = next(iter(datamodule(pool, batch_size=8, batches_per_epoch=1).train_dataloader()))
    assert schema.PRIVILEGED not in plain
