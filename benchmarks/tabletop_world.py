"""Speed and size of the embedded tabletop world; prints one JSON object.

* render: microseconds per frame pair (scene + wrist view) and the ratio to a baseline that only allocates, fills
  and converts one 64x64 RGB frame in the same process (the machine is shared: ratios travel, absolute numbers don't).
* env: Gymnasium steps per second for each embodiment under the scripted expert, with physics alone (no
  rendering) as the baseline.
* pyramid: wall time and bytes on disk of the default ``TabletopPyramid().prepare()`` into a temporary folder,
  with the time to merely generate the same episodes in memory (one process) as the baseline.

    PYTHONPATH=. python benchmarks/tabletop_world.py [--image-size 64] [--skip-pyramid]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from envs.tabletop import DEFAULT_EPISODES, Renderer, ScriptedExpert, TabletopEnv, TabletopPyramid, generate_episodes
from envs.tabletop.world import make_world
from vla_zoo.machine import describe


def _per_call(fn, repeats: int) -> tuple[float, float]:
    """Seconds per call: wall clock and this process's CPU time (less disturbed by other jobs on the machine)."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def bench_render(image_size: int) -> dict:
    def baseline():
        frame = np.empty((image_size, image_size, 3), np.float32)
        frame.fill(128.0)
        return frame.astype(np.uint8)

    base, base_cpu = _per_call(baseline, 2000)
    out = {"baseline_us": round(base * 1e6, 2), "baseline_cpu_us": round(base_cpu * 1e6, 2)}
    renderer = Renderer(image_size)
    for embodiment in ("point_gripper", "two_link_arm"):
        world = make_world(3, embodiment)
        t, cpu = _per_call(lambda: renderer(world), 1000)
        out[embodiment] = {
            "us_per_frame_pair": round(t * 1e6, 1),
            "cpu_us_per_frame_pair": round(cpu * 1e6, 1),
            "ratio_to_baseline": round(t / base, 1),
        }
    return out


def bench_env(image_size: int, steps: int = 3000) -> dict:
    out = {}
    for embodiment in ("point_gripper", "two_link_arm"):
        env = TabletopEnv(embodiment, image_size=image_size)
        expert = ScriptedExpert()
        env.reset(seed=0)
        start, episodes = time.perf_counter(), 0
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(expert.act(env.world))
            if terminated or truncated:
                episodes += 1
                env.reset()
        env_rate = steps / (time.perf_counter() - start)

        world, start = make_world(0, embodiment), time.perf_counter()
        for i in range(steps):
            world.step(expert.act(world))
            if world.success:
                world = make_world(i + 1, embodiment)
        physics_rate = steps / (time.perf_counter() - start)
        out[embodiment] = {
            "env_steps_per_s": round(env_rate),
            "physics_only_steps_per_s": round(physics_rate),
            "ratio_env_to_physics": round(env_rate / physics_rate, 3),
            "episodes_completed": episodes,
        }
    return out


def bench_pyramid(image_size: int) -> dict:
    start = time.perf_counter()
    steps = sum(ep.length for tier, n in DEFAULT_EPISODES.items() for ep in generate_episodes(tier, n, 0, image_size))
    generate_s = time.perf_counter() - start
    out = {"episodes": DEFAULT_EPISODES, "frames": steps, "generate_only_one_process_s": round(generate_s, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        pyramid = TabletopPyramid(str(Path(tmp) / "tabletop"), image_size=image_size)
        start = time.perf_counter()
        pyramid.prepare()
        prepare_s = time.perf_counter() - start
        per_tier = {
            tier: sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
            for tier, folder in pyramid.sources.items()
        }
        start = time.perf_counter()
        pyramid.prepare()
        reuse_s = time.perf_counter() - start
    out.update(
        {
            "prepare_s": round(prepare_s, 2),
            "ratio_prepare_to_generate_only": round(prepare_s / generate_s, 2),
            "second_prepare_s": round(reuse_s, 4),
            "bytes_on_disk": sum(per_tier.values()),
            "megabytes_on_disk": round(sum(per_tier.values()) / 2**20, 1),
            "bytes_per_tier": per_tier,
        }
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--skip-pyramid", action="store_true")
    args = parser.parse_args()
    result = {"machine": describe(), "image_size": args.image_size, "render": bench_render(args.image_size), "env": bench_env(args.image_size)}
    if not args.skip_pyramid:
        result["pyramid"] = bench_pyramid(args.image_size)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
