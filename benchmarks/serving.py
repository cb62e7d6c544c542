"""Round-trip overhead of serving a policy (``RemotePolicy`` -> websocket server in another process) against calling
it in-process, for a realistic payload: two RGB views, a state vector, an instruction, a [16, 7] action chunk.

The policy does almost no work, so the remote time is the serving overhead itself (msgpack encoding, loopback
TCP, websocket framing, validation, the thread hop). Calls alternate local/remote so machine noise hits both.

    python benchmarks/serving.py [--calls 300] [--sizes 64 224]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vla_zoo.deploy.client import RemotePolicy  # noqa: E402
from vla_zoo.deploy.codec import packb, unpackb  # noqa: E402
from vla_zoo.machine import describe  # noqa: E402

HORIZON, STATE_DIM, ACTION_DIM, VIEWS = 16, 8, 7, ("front", "wrist")


class PayloadPolicy:
    """Follows the policy contract with negligible compute: actions depend on the inputs only through cheap sums."""

    def __init__(self, image_size: int = 224) -> None:
        self.image_size = image_size

    def metadata(self) -> dict[str, Any]:
        spec = {"state_dim": STATE_DIM, "action_dim": ACTION_DIM, "image_keys": list(VIEWS), "image_size": [self.image_size] * 2}
        return {"embodiments": {"arm": spec}, "horizon": HORIZON}

    def get_action(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        level = float(observation["images"]["front"][0, 0, 0]) + float(observation["state"].sum())
        return {"actions": np.full((HORIZON, ACTION_DIM), level, np.float32)}


def make_policy(image_size: int = 224) -> PayloadPolicy:
    return PayloadPolicy(image_size)


def _observation(rng: np.random.Generator, image_size: int) -> dict[str, Any]:
    return {
        "images": {v: rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for v in VIEWS},
        "state": rng.normal(size=STATE_DIM).astype(np.float32),
        "instruction": "pick up the red cube and place it in the bowl",
        "embodiment": "arm",
    }


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"median": round(float(np.median(ms)), 4), "p90": round(float(np.percentile(ms, 90)), 4)}


def bench(image_size: int, calls: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        [sys.executable, "-m", "vla_zoo.deploy.server", "--policy", "benchmarks.serving:make_policy",
         "--policy-kwargs", json.dumps({"image_size": image_size}), "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        port = json.loads(server.stdout.readline())["port"]
        local = PayloadPolicy(image_size)
        rng = np.random.default_rng(0)
        observations = [_observation(rng, image_size) for _ in range(8)]
        times: dict[str, list[float]] = {"in_process": [], "codec_only": [], "remote": []}
        with RemotePolicy("127.0.0.1", port) as remote:
            for i in range(calls + 20):  # the first 20 are warm-up
                obs = observations[i % len(observations)]
                t0 = time.perf_counter()
                expected = local.get_action(obs)
                t1 = time.perf_counter()
                request = unpackb(packb({"type": "get_action", "observation": obs}))
                unpackb(packb({"result": local.get_action(request["observation"])}))
                t2 = time.perf_counter()
                got = remote.get_action(obs)
                t3 = time.perf_counter()
                assert np.array_equal(got["actions"], expected["actions"])
                if i >= 20:
                    times["in_process"].append(t1 - t0)
                    times["codec_only"].append(t2 - t1)
                    times["remote"].append(t3 - t2)
        result = {name: _stats(values) for name, values in times.items()}
        in_process, remote_ms = result["in_process"]["median"], result["remote"]["median"]
        return {
            "image_size": image_size,
            "request_bytes": len(packb({"type": "get_action", "observation": observations[0]})),
            "calls": calls,
            **{f"{k}_ms": v for k, v in result.items()},
            "overhead_ms_median": round(remote_ms - in_process, 4),
            "ratio_remote_to_in_process": round(remote_ms / in_process, 1),
        }
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    args = parser.parse_args()
    results = [bench(size, args.calls) for size in args.sizes]
    print(json.dumps({
        "benchmark": "serving_round_trip", "python": platform.python_version(), "machine": describe(),
        "views": len(VIEWS), "horizon": HORIZON, "action_dim": ACTION_DIM, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
