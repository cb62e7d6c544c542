"""Policy server and client: a real server subprocess on loopback, exact round trips, fuzzing, shutdown, replay."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import REPO_ROOT
from tests.vla_zoo.policy_fixtures import VIEWS, make_episodes, make_observation, make_policy
from vla_zoo.open_loop import episode_observation
from vla_zoo.deploy.client import PolicyServerError, RemotePolicy
from vla_zoo.deploy.codec import CodecError, packb, unpackb
from vla_zoo.deploy.replay import ReplayPolicy
from vla_zoo.deploy.validation import ObservationError, validate_observation

FACTORY = "tests.vla_zoo.policy_fixtures:make_policy"


class ServerProcess:
    """``python -m vla_zoo.deploy.server`` on 127.0.0.1 with port 0; the bound port is read from its stdout."""

    def __init__(self, log_path: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vla_zoo.deploy.server", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True,
        )
        line = self.proc.stdout.readline()  # EOF ("") if the server dies before listening
        if not line:
            self.proc.wait(10)
            pytest.fail(f"server exited with {self.proc.returncode} before listening:\n{log_path.read_text()[-3000:]}")
        announcement = json.loads(line)
        assert announcement["event"] == "listening"
        self.port = announcement["port"]

    def client(self, timeout: float = 10.0) -> RemotePolicy:
        return RemotePolicy("127.0.0.1", self.port, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("server") / "server.log", "--policy", FACTORY)
    yield srv
    srv.stop()


def _assert_same_actions(remote: dict[str, Any], local: dict[str, Any]) -> None:
    assert remote["actions"].dtype == np.float32
    np.testing.assert_array_equal(remote["actions"], local["actions"])


def test_round_trip_equals_local_policy(server: ServerProcess) -> None:
    local = make_policy()
    rng = np.random.default_rng(0)
    with server.client() as remote:
        assert remote.metadata() == local.metadata()
        for i in range(10):
            obs = make_observation(rng, embodiment=["point_gripper", "two_link_arm"][i % 2])
            _assert_same_actions(remote.get_action(obs), local.get_action(obs))


def test_codec_round_trips_arrays_and_rejects_unsafe_ones() -> None:
    value = {"a": np.arange(6, dtype=">i4").reshape(2, 3), "b": [np.zeros(0, bool), np.float32(1.5)], "s": "x"}
    decoded = unpackb(packb(value))
    np.testing.assert_array_equal(decoded["a"], value["a"])
    assert decoded["a"].dtype.isnative and decoded["a"].flags.writeable and decoded["b"][1] == 1.5
    forged = {"__ndarray__": b"\0" * 8, "dtype": "O", "shape": [1]}
    with pytest.raises(CodecError, match="dtype 'O' is not allowed"):
        unpackb(msgpack.packb(forged))
    with pytest.raises(CodecError, match="needs 12 bytes, the message carries 8"):
        unpackb(msgpack.packb({**forged, "dtype": "<f4", "shape": [3]}))


def test_validation_names_key_and_expectation() -> None:
    policy = make_policy()
    obs = make_observation(np.random.default_rng(0))
    validate_observation(obs, policy.metadata())
    bad = {**obs, "images": {**obs["images"], "wrist": obs["images"]["wrist"][:, :, :2]}}
    with pytest.raises(ObservationError, match=r"\['wrist'\] must be a uint8 array of shape \[64, 64, 3\].*\[64, 64, 2\]"):
        validate_observation(bad, policy.metadata())
    with pytest.raises(ObservationError, match=r"unknown embodiment 'ufo'; this policy serves \['point_gripper'"):
        validate_observation({**obs, "embodiment": "ufo"}, policy.metadata())
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ObservationError, match=r"observation\['state'\] holds NaN or inf at dims \[2\]"):
            validate_observation({**obs, "state": np.array([0, 0, bad], np.float32)}, policy.metadata())


def _fuzz_messages(rng: np.random.Generator) -> list[tuple[bytes | str, str]]:
    """About 3000 malformed requests, each with the text its error message must contain ("" = any error)."""
    valid = make_observation(rng)
    messages: list[tuple[bytes | str, str]] = []

    def request(obs: Any) -> bytes:
        return packb({"type": "get_action", "observation": obs})

    for _ in range(800):  # garbage bytes
        messages.append((rng.bytes(int(rng.integers(0, 200))), ""))
    for _ in range(200):  # valid msgpack of the wrong structure
        messages.append((msgpack.packb([int(rng.integers(1e6)), "get_action", None]), "must be a map"))
        messages.append((msgpack.packb({"type": int(rng.integers(1e6))}), "unknown request type"))
    for _ in range(100):
        good = request(valid)
        messages.append((good[: int(rng.integers(1, len(good) - 1))], "not valid msgpack"))  # truncated
        messages.append(("{'type': 'ping'}", "binary frame"))
        messages.append((packb({"type": "get_action"}), "needs an 'observation'"))
        messages.append((packb({"type": "teleport"}), "unknown request type 'teleport'"))

    h = valid["images"]["scene"].shape[0]
    for _ in range(100):
        key = ["images", "state", "instruction", "embodiment"][int(rng.integers(4))]
        messages.append((request({k: v for k, v in valid.items() if k != key}), f"missing ['{key}']"))
        name = f"robot{int(rng.integers(1e6))}"
        messages.append((request({**valid, "embodiment": name}), f"unknown embodiment '{name}'"))
        messages.append((request({**valid, "embodiment": 7}), "['embodiment'] must be a str"))
        view = VIEWS[int(rng.integers(2))]
        messages.append((request({**valid, "images": {v: valid["images"][v] for v in VIEWS if v != view}}), f"missing view '{view}'"))
        dtype = [np.float32, np.int16, np.uint16, np.float64][int(rng.integers(4))]
        wrong_dtype = {**valid["images"], view: valid["images"][view].astype(dtype)}
        messages.append((request({**valid, "images": wrong_dtype}), f"['{view}'] must be a uint8 array"))
        shape = [(h + 1, h, 3), (h, h), (3, h, h), (h, h, 4), (0, h, 3)][int(rng.integers(5))]
        wrong_shape = {**valid["images"], view: np.zeros(shape, np.uint8)}
        messages.append((request({**valid, "images": wrong_shape}), f"shape [{h}, {h}, 3]"))
        messages.append((request({**valid, "images": "scene.png"}), "['images'] must be a map"))
        messages.append((request({**valid, "state": np.zeros(int(rng.integers(4, 9)), np.float32)}), "['state'] must be a float32 (or float64) array of shape [3]"))
        messages.append((request({**valid, "state": np.zeros(3, np.int64)}), "['state'] must be a float32"))
        messages.append((request({**valid, "state": [0.0, 0.0, 0.0]}), "['state'] must be a float32"))
        messages.append((request({**valid, "state": np.array([0, np.nan, 0], np.float32)}), "NaN"))
        messages.append((request({**valid, "instruction": int(rng.integers(100))}), "['instruction'] must be a str"))
        num_bytes = int(rng.integers(0, 50))
        forged = {"__ndarray__": b"\0" * (num_bytes + (num_bytes >= 12)), "dtype": "<f4", "shape": [3]}  # never 12
        messages.append((request({**valid, "state": forged}), "the message carries"))
        messages.append((request({**valid, "state": {**forged, "dtype": "O"}}), "dtype 'O' is not allowed"))
    return messages


def test_server_survives_thousands_of_malformed_requests(server: ServerProcess) -> None:
    messages = _fuzz_messages(np.random.default_rng(0))
    assert len(messages) >= 2500
    start = time.perf_counter()
    with server.client() as remote:
        connection = remote._connection
        for message, expected in messages:
            connection.send(message)
            reply = unpackb(connection.recv(timeout=10))
            assert set(reply) == {"error"}, (message[:80], reply)
            assert reply["error"]["type"] in {"DecodeError", "BadRequest", "InvalidObservation"}
            assert expected in reply["error"]["message"], (expected, reply["error"]["message"])
    # Raw TCP garbage and clients that hang up without a websocket handshake or mid-request.
    rng = np.random.default_rng(1)
    for payload in [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", rng.bytes(500), b"\x00" * 10, b""]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(payload)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"{len(messages)} malformed requests took {elapsed:.1f} s"

    local = make_policy()
    obs = make_observation(np.random.default_rng(2))
    with server.client() as remote:
        _assert_same_actions(remote.get_action(obs), local.get_action(obs))
        with pytest.raises(PolicyServerError, match="unknown embodiment 'ufo'") as info:
            remote.get_action({**obs, "embodiment": "ufo"})
        assert info.value.kind == "InvalidObservation"
        remote.ping()  # the same connection keeps working after an error
    assert server.proc.poll() is None


def test_concurrent_clients_get_their_own_answers(server: ServerProcess) -> None:
    local = make_policy()
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(100 + seed)
        with server.client() as remote:
            for i in range(15):
                obs = make_observation(rng, embodiment=["point_gripper", "two_link_arm"][(seed + i) % 2])
                if not np.array_equal(remote.get_action(obs)["actions"], local.get_action(obs)["actions"]):
                    failures.append(f"client {seed} request {i}: wrong actions")
                try:
                    remote.get_action({**obs, "state": obs["state"][:2]})
                    failures.append(f"client {seed} request {i}: a 2-dim state was accepted")
                except PolicyServerError as e:
                    if "shape [3]" not in e.message:
                        failures.append(f"client {seed} request {i}: {e}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures and not any(t.is_alive() for t in threads)


def test_event_loop_serves_while_policy_is_busy_and_sigterm_exits_cleanly(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "server.log", "--policy", FACTORY, "--policy-kwargs", '{"delay_s": 0.8}')
    try:
        local = make_policy()
        obs = make_observation(np.random.default_rng(3))
        with srv.client() as busy, srv.client() as other:
            busy.reset()
            local.reset()
            result: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: result.update(busy.get_action(obs)))
            thread.start()
            time.sleep(0.1)  # the policy is now sleeping inside get_action
            start = time.perf_counter()
            other.ping()
            with pytest.raises(PolicyServerError, match="DecodeError"):
                other._request({"type": "get_action", "observation": {"__ndarray__": b"", "dtype": "zz", "shape": []}})
            assert time.perf_counter() - start < 0.4, "ping waited for the busy policy"
            thread.join(5)
            _assert_same_actions(result, local.get_action(obs))  # includes the reset offset

            # SIGTERM while a request is in flight: the call is answered, then the process exits 0.
            late: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: late.update(busy.get_action(obs)), daemon=True)
            thread.start()
            time.sleep(0.1)
            start = time.perf_counter()
            srv.proc.send_signal(signal.SIGTERM)
            assert srv.proc.wait(5) == 0, srv.log_path.read_text()[-3000:]
            assert time.perf_counter() - start < 2.5
            thread.join(1)
            _assert_same_actions(late, local.get_action(obs))
            with pytest.raises(ConnectionError):
                other.ping()
    finally:
        srv.stop()


# ---- replay -------------------------------------------------------------------------------------------------


def test_replay_returns_recorded_chunks_step_by_step() -> None:
    episodes = make_episodes(np.random.default_rng(0), [10, 7])
    policy = ReplayPolicy(episodes, horizon=4)
    assert policy.metadata() == {
        "embodiments": {"point_gripper": {"state_dim": 3, "action_dim": 3, "image_keys": VIEWS, "image_size": [8, 8]}},
        "horizon": 4,
    }
    for cycle in range(2):  # reset walks through the episodes and wraps around
        for ep in episodes:
            policy.reset()
            for t in range(0, ep.length, 4):
                chunk = policy.get_action(episode_observation(ep, t))["actions"]
                expected = ep.actions[[min(s, ep.length - 1) for s in range(t, t + 4)]]  # held after the end
                np.testing.assert_array_equal(chunk, expected)

    every_two = ReplayPolicy(episodes, horizon=4, stride=2)
    every_two.get_action(episode_observation(episodes[0], 0))
    np.testing.assert_array_equal(every_two.get_action(episode_observation(episodes[0], 2))["actions"], episodes[0].actions[2:6])
    with pytest.raises(ValueError, match="replaying episode 0 of embodiment 'point_gripper'.*'two_link_arm'"):
        ReplayPolicy(episodes, horizon=4).get_action({**episode_observation(episodes[0], 0), "embodiment": "two_link_arm"})


def test_replay_from_shards(tmp_path: Path) -> None:
    from datamodules.shards import write_source

    episodes = make_episodes(np.random.default_rng(1), [12, 9])
    write_source(episodes, tmp_path / "robot", source="robot", horizon=4)
    policy = ReplayPolicy.from_shards(tmp_path / "robot")
    assert policy.metadata()["horizon"] == 4
    for ep in episodes:
        policy.reset()
        for t in range(0, ep.length, 4):
            expected = ep.actions[[min(s, ep.length - 1) for s in range(t, t + 4)]]
            np.testing.assert_array_equal(policy.get_action(episode_observation(ep, t))["actions"], expected)


# ---- availability and access -------------------------------------------------------------------------------


def _flood_frames(mib: int = 30) -> dict[str, bytes]:
    """Messages that cost a few bytes each per Python object msgpack builds: one array of ``mib`` MiB of empty maps
    (0x80), and empty maps nested in arrays of 64 (within any per-array limit), 64**4 = 16.8M maps in 17 MiB."""
    n = mib * 2**20
    flat = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n  # array32 header, then n fixmaps of size 0

    def array16(items: list[bytes]) -> bytes:
        return b"\xdc" + len(items).to_bytes(2, "big") + b"".join(items)

    nested = b"\x80"
    for _ in range(4):
        nested = array16([nested] * 64)
    return {"flat_30mib": flat, "nested_17mib": nested}


def _memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_flood_of_empty_maps_neither_grows_the_server_nor_stalls_other_clients(tmp_path: Path) -> None:
    """A client sends messages that unbounded msgpack turns into millions of dicts, while another client pings.
    The server runs with a 64 MiB message limit so that the frames reach the decoder; a watchdog kills it past
    1 GiB so a server without bounds fails this test instead of exhausting the machine."""
    srv = ServerProcess(tmp_path / "server.log", "--policy", FACTORY, "--max-message-mb", "64")
    frames = _flood_frames()
    rss_before = _memory_kb(srv.proc.pid, "VmRSS")
    peak = [rss_before]
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(0.01) and srv.proc.poll() is None:
            peak[0] = max(peak[0], _memory_kb(srv.proc.pid, "VmRSS"))
            if peak[0] > 2**20:
                srv.proc.kill()

    latencies: list[float] = []

    def pinger(remote: RemotePolicy) -> None:
        while not done.is_set() and len(latencies) < 2000:
            start = time.perf_counter()
            try:
                remote.ping()
            except (ConnectionError, TimeoutError):  # the server was killed: the wait until then still counts
                latencies.append(time.perf_counter() - start)
                return
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)

    replies = []
    try:
        with srv.client(timeout=20) as attacker, srv.client(timeout=20) as other:
            threads = [threading.Thread(target=watchdog, daemon=True), threading.Thread(target=pinger, args=(other,))]
            for t in threads:
                t.start()
            try:
                for name in [*frames, *frames]:  # each kind twice: the first must not leave the second any worse
                    attacker._connection.send(frames[name])
                    replies.append((name, unpackb(attacker._connection.recv(timeout=20))))
            except ConnectionClosed:
                pass  # the watchdog killed the server: reported below
            finally:
                time.sleep(0.2)  # a few pings after the last frame
                done.set()
                for t in threads:
                    t.join(5)
            slowest = max(latencies, default=float("nan"))
            assert srv.proc.poll() is None, (f"the server died (the watchdog kills it at 1 GiB): peak RSS "
                                             f"{peak[0] / 1024:.0f} MB, pings waited up to {slowest:.2f} s")
            peak[0] = max(peak[0], _memory_kb(srv.proc.pid, "VmHWM"))
            growth_mb = (peak[0] - rss_before) / 1024
            print(json.dumps({"rss_before_mb": round(rss_before / 1024), "rss_growth_mb": round(growth_mb, 1),
                              "pings": len(latencies), "max_ping_s": round(max(latencies), 4)}))
            for name, reply in replies:
                assert reply["error"]["type"] == "DecodeError" and "exceeds" in reply["error"]["message"], (name, reply)
            assert growth_mb < 200, f"server RSS grew by {growth_mb:.0f} MB"
            assert len(latencies) >= 5 and max(latencies) < 0.5, f"pings waited up to {max(latencies):.2f} s"
            local = make_policy()
            obs = make_observation(np.random.default_rng(4))
            _assert_same_actions(attacker.get_action(obs), local.get_action(obs))  # the attacker's connection too
    finally:
        done.set()
        srv.stop()


def test_default_message_limit_comes_from_the_metadata(server: ServerProcess) -> None:
    """Without --max-message-mb a frame far beyond what an observation may hold is refused by the websocket layer
    (close code 1009) before it is buffered; other connections are unaffected."""
    from vla_zoo.deploy.validation import request_limits

    limits = request_limits(make_policy().metadata())
    assert limits.max_message_bytes < 30 * 2**20 and limits.max_bin_len >= 64 * 64 * 3
    with server.client() as attacker, server.client() as other:
        with pytest.raises(ConnectionError, match="1009"):
            attacker._connection.send(b"\xc4" * (30 * 2**20))
            attacker.ping()
        other.ping()


def test_codec_limits_name_what_was_exceeded() -> None:
    from vla_zoo.deploy.validation import request_limits

    limits = request_limits(make_policy().metadata())
    obs = make_observation(np.random.default_rng(0))
    assert unpackb(packb({"type": "get_action", "observation": obs}), limits)["observation"]["instruction"]
    with pytest.raises(CodecError, match="exceeds max_str_len"):
        unpackb(packb({"type": "get_action", "observation": {**obs, "instruction": "x" * 2**17}}), limits)
    with pytest.raises(CodecError, match="exceeds max_array_len"):
        unpackb(packb({"type": "ping", "pad": [0] * 1000}), limits)
    with pytest.raises(CodecError, match="limit of 88 maps and arrays"):
        unpackb(packb({"type": "ping", "pad": [[]] * 60, "more": [[]] * 60}), limits)
    with pytest.raises(CodecError, match="exceeds max_bin_len"):
        unpackb(packb({"type": "ping", "pad": b"\0" * (limits.max_bin_len + 1)}), limits)


def test_token_is_required_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLA_ZOO_TOKEN", "s3cret-token")  # the server reads it; clients below pass theirs explicitly
    srv = ServerProcess(tmp_path / "server.log", "--policy", FACTORY, "--allow-origin", "http://localhost:3000")
    monkeypatch.delenv("VLA_ZOO_TOKEN")
    try:
        for token in (None, "wrong", "s3cret-token-", "s3cret-toke", ""):
            with pytest.raises(PermissionError, match="HTTP 401: missing or wrong token"):
                RemotePolicy("127.0.0.1", srv.port, timeout=5, token=token)
        with RemotePolicy("127.0.0.1", srv.port, timeout=5, token="s3cret-token") as remote:
            remote.ping()
        monkeypatch.setenv("VLA_ZOO_TOKEN", "s3cret-token")  # the client's default
        with srv.client() as remote:
            assert remote.metadata() == make_policy().metadata()
        # A browser must be allowed by --allow-origin and still present the token.
        from websockets.sync.client import connect

        headers = {"Authorization": "Bearer s3cret-token"}
        with connect(f"ws://127.0.0.1:{srv.port}", origin="http://localhost:3000", additional_headers=headers,
                     proxy=None) as browser:
            browser.send(packb({"type": "ping"}))
            assert unpackb(browser.recv(timeout=5)) == {"result": "pong"}
        with pytest.raises(Exception, match="HTTP 403"):
            connect(f"ws://127.0.0.1:{srv.port}", origin="https://evil.example", additional_headers=headers, proxy=None)
        assert "missing or wrong token" in srv.log_path.read_text() and "s3cret" not in srv.log_path.read_text()
    finally:
        srv.stop()


def test_browser_origins_are_refused_and_loopback_needs_no_token(server: ServerProcess, monkeypatch) -> None:
    from websockets.sync.client import connect

    monkeypatch.delenv("VLA_ZOO_TOKEN", raising=False)
    with pytest.raises(Exception, match="HTTP 403"):
        connect(f"ws://127.0.0.1:{server.port}", origin="https://evil.example", proxy=None)
    with RemotePolicy("127.0.0.1", server.port, timeout=5) as remote:  # no token, no Origin: a local client
        remote.ping()


def test_binding_beyond_loopback_without_a_token_is_refused(monkeypatch, capsys) -> None:
    from vla_zoo.deploy.server import PolicyServer, main

    monkeypatch.delenv("VLA_ZOO_TOKEN", raising=False)
    for host in ("0.0.0.0", "", "::", "192.168.1.20", "gpu-box"):
        with pytest.raises(ValueError, match=f"binding '{host}' lets other machines.*--token or the VLA_ZOO_TOKEN"):
            PolicyServer(make_policy(), host=host)
    with pytest.raises(SystemExit) as info:  # refused before the policy is built
        main(["--policy", "no_such_module:make_policy", "--host", "0.0.0.0"])
    assert info.value.code == 2 and "set a shared secret with --token or VLA_ZOO_TOKEN" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the token is empty"):
        PolicyServer(make_policy(), host="0.0.0.0", token="")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        PolicyServer(make_policy(), host=host)  # loopback: no token needed (nothing is bound until serve())
def test_precision_flag_reaches_checkpoint_policies_only(monkeypatch) -> None:
    import argparse

    from vla_zoo.deploy.loading import add_policy_arguments, policy_from_args
    from vla_zoo.policy import Policy

    parser = argparse.ArgumentParser()
    add_policy_arguments(parser)
    seen = {}
    monkeypatch.setattr(Policy, "from_checkpoint", classmethod(lambda cls, path, **kw: seen.update(path=path, **kw)))
    policy_from_args(parser.parse_args(["--checkpoint", "last.ckpt", "--precision", "bf16-true",
                                        "--policy-kwargs", '{"system2_period": 4}']))
    assert seen == {"path": "last.ckpt", "precision": "bf16-true", "system2_period": 4}
    with pytest.raises(ValueError, match="--precision applies to --checkpoint"):
        policy_from_args(parser.parse_args(["--policy", FACTORY, "--precision", "bf16-true"]))
