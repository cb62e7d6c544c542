"""Sources read from anywhere WebDataset reads: an HTTP server, ``file:`` and ``pipe:`` URLs, brace patterns, with
their sidecars; the samples equal those of the same source read from its local directory."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from datamodules.mixture import MixtureDataModule
from datamodules.shards import read_episodes, source_shards
from tests.datamodules.synth import make_source


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines in the test output
        pass


@pytest.fixture
def served(tmp_path: Path):
    """``tmp_path`` served over HTTP on a free loopback port, in a thread, for the test only."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _batches(shards: str, n: int = 3) -> list[dict]:
    dm = MixtureDataModule(sources=[{"name": "robot", "shards": shards, "embodiment": "arm"}], embodiments={"arm": 0},
                           horizon=4, max_state_dim=4, max_action_dim=4, batch_size=8, batches_per_epoch=n,
                           shuffle_buffer=16)
    return list(dm.make_dataset(rank=0, world_size=1))


def _assert_same(batches: list[dict], expected: list[dict]) -> None:
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        for key, value in want.items():
            if key.startswith("_"):
                continue
            if isinstance(value, list):
                assert got[key] == value, key
            else:
                np.testing.assert_array_equal(got[key].numpy(), value.numpy(), err_msg=key)


def test_a_source_served_over_http_gives_the_local_samples(tmp_path: Path, served: str) -> None:
    local = make_source(tmp_path / "robot", "robot", 4, samples_per_shard=16)
    assert len(source_shards(local)) > 2
    expected = _batches(str(local))
    count = len(source_shards(local))
    pattern = f"{served}/robot/shard-{{000000..{count - 1:06d}}}.tar"
    for shards in (pattern, f"{served}/robot/", f"pipe:curl -s -f {pattern}", f"file:{local}/shard-{{000000..{count - 1:06d}}}.tar"):
        _assert_same(_batches(shards), expected)
    # Episodes rebuild from the URL too (sidecars and shards both remote).
    remote = list(read_episodes(f"{served}/robot/"))
    assert [e.metadata for e in remote] == [e.metadata for e in read_episodes(local)]
    np.testing.assert_array_equal(remote[1].actions, next(e for i, e in enumerate(read_episodes(local)) if i == 1).actions)


def test_remote_mistakes_are_named(tmp_path: Path, served: str) -> None:
    make_source(tmp_path / "robot", "robot", 2, samples_per_shard=16)
    with pytest.raises(FileNotFoundError, match=r"source 'robot': .*/absent/index.json could not be read"):
        _batches(f"{served}/absent/")
    with pytest.raises(ValueError, match=r"source 'robot': shards .*shard-000099.tar.* not listed in .*index.json"):
        _batches(f"{served}/robot/shard-{{000000..000099}}.tar")
    index = tmp_path / "robot" / "index.json"
    index.write_text(index.read_text().replace("shard-000000.tar", "x;rm -rf y.tar"))
    with pytest.raises(ValueError, match="are not plain file names"):
        _batches(f"{served}/robot/")
