"""Meta-World demonstrations as shards: scripted experts on a task list, rendered, one source per pyramid tier.

Tiers (``TIERS``), each written to ``root/metaworld_<tier>/`` by ``datamodules.shards.write_source``:

=========  ==========================================================================  ===========  =======
tier       what                                                                        views        actions
=========  ==========================================================================  ===========  =======
``robot``  the expert, default visuals                                                 corner,      yes
                                                                                       gripper_pov
``sim``    noisy expert (per-episode noise std ~ U[0, sim_noise]); random colours,     corner,      yes
           lights and camera poses                                                     gripper_pov
``human``  the expert filmed from other cameras, recorded as ``human`` without state   corner2,     no
           or actions (a stand-in for video of people doing the tasks)                 behind_gripper
=========  ==========================================================================  ===========  =======

``dart_noise`` > 0 turns on DART (Laskey et al., 2017, "DART: Noise Injection for Robust Imitation Learning") in the
``robot`` tier: each episode draws a noise std from U[0, dart_noise], the env executes the expert's action plus that
Gaussian noise, and the label recorded is the expert's clean action in the state the noise led to. The demonstrations
then cover the small off-path states a learned policy drifts into, each labelled with the expert's correction,
which plain behaviour cloning never sees (the ``sim`` tier's noise is different: there the noisy action is the
label). The number of demonstrations is unchanged.

``privileged=True`` also records, per frame of the ``robot`` and ``sim`` tiers, Meta-World's privileged positions of
the task's main object and of the goal (``PRIVILEGED``: 6 floats, metres) as ``Episode.privileged``: an auxiliary
training target (``components.privileged_head``), never a policy input.

Only successful episodes are kept: slot ``i`` of a task retries with fresh seeds until the expert succeeds (at most
``max_attempts`` times). Every seed derives from ``(seed, task, tier, i, attempt)``, so the data do not depend on
``num_workers``. Episodes are recorded up to and including the first successful frame; ``actions[t]`` is the
command issued at frame ``t`` (the last one is the expert's command at the final frame; with ``dart_noise``, the
expert's clean command, while the env executed it plus noise).

    python -m envs.metaworld.generate --root data/metaworld --tasks MT10 --episodes 10 --tiers robot,sim,human
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # spawned workers inherit it before they import mujoco

import argparse
import json
import logging
import multiprocessing
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from datamodules.episode import Episode
from envs.metaworld.tasks import MODALITY, MT10, resolve_tasks

log = logging.getLogger(__name__)

TIERS = ("robot", "sim", "human")
# Bump when generation changes what a given config produces, so cached sources are rebuilt.
GENERATOR_VERSION = 1
MARKER = "READY.json"
# Meta-World v3's 39-D observation: the first object's xyz at [4:7] (the puck of reach / push / pick-place, the
# handle or button of the others), the goal's xyz at [36:39].
PRIVILEGED = np.r_[4:7, 36:39]
PRIVILEGED_NAMES = ("object_x", "object_y", "object_z", "goal_x", "goal_y", "goal_z")


def demo_seed(seed: int, task: str, tier: str, index: int, attempt: int) -> int:
    """Reset seed of attempt ``attempt`` at demonstration slot ``index`` of ``task`` in ``tier``."""
    entropy = [seed, zlib.crc32(task.encode()), zlib.crc32(tier.encode()), index, attempt]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class MetaWorldDemos:
    """Preparer (``prepare() -> None``) of Meta-World demonstration sources, cached under ``root``.

    ``episodes_per_task`` is one count for every tier or a ``{tier: count}`` map. A later ``prepare()`` skips
    every tier whose ``READY.json`` matches its config and rebuilds the others; a tier is written into a temporary
    folder and renamed into place. Workers are spawned processes (each renders on its own core), so a script
    calling ``prepare()`` with ``num_workers > 1`` needs the usual ``if __name__ == "__main__":`` guard.
    """

    def __init__(
        self,
        root: str = ".cache/vla_zoo/metaworld",
        tasks: Sequence[str] | str = tuple(MT10),
        episodes_per_task: int | dict[str, int] = 10,
        tiers: Sequence[str] = ("robot",),
        image_size: int = 64,
        seed: int = 0,
        num_workers: int = 2,
        horizon: int = 16,
        max_steps: int = 300,
        max_attempts: int = 10,
        sim_noise: float = 0.3,
        dart_noise: float = 0.0,
        views: Sequence[str] = ("corner", "gripper_pov"),
        human_views: Sequence[str] = ("corner2", "behind_gripper"),
        jpeg_quality: int = 90,
        privileged: bool = False,
    ) -> None:
        unknown = sorted(set(tiers) - set(TIERS))
        if unknown:
            raise ValueError(f"MetaWorldDemos(tiers=...): unknown tiers {unknown}; valid: {list(TIERS)}")
        counts = episodes_per_task if isinstance(episodes_per_task, dict) else {t: episodes_per_task for t in tiers}
        missing = sorted(set(tiers) - set(counts))
        if missing:
            raise ValueError(f"MetaWorldDemos(episodes_per_task=...): no count for tiers {missing}")
        self.root = Path(root)
        self.tasks = resolve_tasks(tasks)
        self.episodes = {t: int(counts[t]) for t in tiers if counts[t] > 0}
        self.image_size = image_size
        self.seed = seed
        self.num_workers = num_workers
        self.horizon = horizon
        self.max_steps = max_steps
        self.max_attempts = max_attempts
        self.sim_noise = sim_noise
        if dart_noise < 0:
            raise ValueError(f"MetaWorldDemos(dart_noise={dart_noise}): a noise std must be >= 0")
        self.dart_noise = dart_noise
        self.views = {"robot": tuple(views), "sim": tuple(views), "human": tuple(human_views)}
        self.jpeg_quality = jpeg_quality
        self.privileged = privileged

    def config(self, tier: str) -> dict[str, Any]:
        return {
            "generator_version": GENERATOR_VERSION,
            "tier": tier,
            "tasks": self.tasks,
            "episodes_per_task": self.episodes[tier],
            "image_size": self.image_size,
            "views": list(self.views[tier]),
            "seed": self.seed,
            "horizon": self.horizon,
            "max_steps": self.max_steps,
            "max_attempts": self.max_attempts,
            "noise": [0.0, self.sim_noise] if tier == "sim" else [0.0, 0.0],
            # Only present when on, so caches written before the option existed stay valid.
            **({"dart_noise": [0.0, self.dart_noise]} if tier == "robot" and self.dart_noise > 0 else {}),
            **({"privileged": list(PRIVILEGED_NAMES)} if self.privileged and tier != "human" else {}),
        }

    @property
    def sources(self) -> dict[str, str]:
        """Source name -> folder, for every tier."""
        return {f"metaworld_{tier}": str(self.root / f"metaworld_{tier}") for tier in self.episodes}

    def is_ready(self, tier: str) -> bool:
        try:
            return json.loads((self.root / f"metaworld_{tier}" / MARKER).read_text()) == self.config(tier)
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    def prepare(self) -> None:
        for tier in self.episodes:
            if not self.is_ready(tier):
                self.write_tier(tier)

    def write_tier(self, tier: str) -> dict[str, Any]:
        """Generate ``tier`` and write it as a source; returns its ``source.json`` dict."""
        from datamodules.progress import track
        from datamodules.shards import write_source  # the writer belongs to the data layer

        start = time.perf_counter()
        name = f"metaworld_{tier}"
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        stats = {"slots": 0, "kept": 0, "attempts": 0}
        slots = self.episodes[tier] * len(self.tasks)
        episodes = track(self.iter_episodes(tier), f"metaworld {tier}", total=slots, unit="episode")
        source = write_source(
            self._counted(episodes, stats),
            tmp,
            source=name,
            horizon=self.horizon,
            modality=None if tier == "human" else MODALITY,
            jpeg_quality=self.jpeg_quality,
            extra_metadata={"generator": "envs.metaworld", "config": self.config(tier)},
        )
        if stats["kept"] < stats["slots"]:
            log.warning("%s: the expert failed %d of %d slots in %d attempts each", name,
                        stats["slots"] - stats["kept"], stats["slots"], self.max_attempts)
        (tmp / MARKER).write_text(json.dumps(self.config(tier), indent=1, sort_keys=True))
        final = self.root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        log.info("metaworld: wrote %s (%d episodes, %d attempts) in %.1f s", final, stats["kept"],
                 stats["attempts"], time.perf_counter() - start)
        return source

    def iter_episodes(self, tier: str) -> Iterator[Episode | None]:
        """Episodes of ``tier``, the tasks interleaved (slot 0 of every task, then slot 1, ...; ``None`` where every
        attempt failed), from worker processes. Interleaved, every shard of the written source holds every task, so
        a streamed source's batches (one shard at a time through a small buffer) are not batches of one task."""
        jobs = [self._job(tier, task, i) for i in range(self.episodes[tier]) for task in self.tasks]
        if self.num_workers <= 1:
            try:
                yield from map(generate_demo, jobs)
            finally:
                close_envs()
            return
        # spawn, not fork: prepare() may run inside a process that already has threads (Lightning, torch, EGL)
        with multiprocessing.get_context("spawn").Pool(min(self.num_workers, len(jobs))) as pool:
            yield from pool.imap(generate_demo, jobs)

    def _job(self, tier: str, task: str, index: int) -> dict[str, Any]:
        return {
            "tier": tier,
            "task": task,
            "index": index,
            "seed": self.seed,
            "image_size": self.image_size,
            "views": self.views[tier],
            "max_steps": self.max_steps,
            "max_attempts": self.max_attempts,
            "sim_noise": self.sim_noise,
            "dart_noise": self.dart_noise if tier == "robot" else 0.0,
            "privileged": self.privileged and tier != "human",
        }

    @staticmethod
    def _counted(episodes: Iterator[Episode | None], stats: dict[str, int]) -> Iterator[Episode]:
        for ep in episodes:
            stats["slots"] += 1
            if ep is not None:
                stats["kept"] += 1
                stats["attempts"] += ep.metadata["attempt"] + 1
                yield ep


# One env per (task, tier) per worker process: building one compiles the MuJoCo model and an OpenGL context.
_ENVS: dict[tuple, Any] = {}


def _env(task: str, tier: str, image_size: int, views: tuple[str, ...], max_steps: int) -> Any:
    from envs.metaworld.env import MetaWorldEnv, VisualRandomization

    key = (task, tier, image_size, views, max_steps)
    if key not in _ENVS:
        randomization = VisualRandomization() if tier == "sim" else None
        _ENVS[key] = MetaWorldEnv(task, image_size, views, max_steps, visual_randomization=randomization)
    return _ENVS[key]


def close_envs() -> None:
    """Release this process's cached envs (their OpenGL contexts must go before the interpreter tears down)."""
    while _ENVS:
        _ENVS.popitem()[1].close()


def generate_demo(job: dict[str, Any]) -> Episode | None:
    """One successful demonstration for a job of ``MetaWorldDemos``, or None if every attempt failed."""
    from envs.metaworld.experts import MetaWorldExpertPolicy

    tier, task, index = job["tier"], job["task"], job["index"]
    env = _env(task, tier, job["image_size"], tuple(job["views"]), job["max_steps"])
    for attempt in range(job["max_attempts"]):
        s = demo_seed(job["seed"], task, tier, index, attempt)
        rng = np.random.default_rng(s)
        noise = float(rng.uniform(0.0, job["sim_noise"])) if tier == "sim" else 0.0
        dart = float(rng.uniform(0.0, job["dart_noise"])) if job["dart_noise"] > 0 else 0.0  # _job: robot tier only
        policy = MetaWorldExpertPolicy(env, noise=noise, seed=s)
        frames, states, actions, raw, success = _record(env, policy, s, execution_noise=dart, rng=rng)
        if not success:
            continue
        actionless = tier == "human"
        return Episode(
            frames={v: np.stack(f) for v, f in frames.items()},
            instruction=env.instruction,
            embodiment="human" if actionless else env.embodiment,
            fps=env.fps,
            state=None if actionless else np.stack(states),
            actions=None if actionless else np.stack(actions),
            metadata={"task_family": task, "tier": tier, "seed": s, "index": index, "attempt": attempt,
                      "noise": noise, "dart_noise": dart, "success": True},
            privileged=np.stack(raw)[:, PRIVILEGED].astype(np.float32) if job.get("privileged") else None,
        )
    return None


def _record(env: Any, policy: Any, seed: int, execution_noise: float = 0.0,
            rng: np.random.Generator | None = None) -> tuple[dict[str, list], list, list, list, bool]:
    """Roll ``policy`` out, recording its commands and the privileged observation of every frame;
    ``execution_noise`` perturbs what is executed, not the label."""
    rng = np.random.default_rng(seed) if rng is None else rng
    obs, _ = env.reset(seed=seed)
    frames: dict[str, list] = {v: [] for v in obs["images"]}
    states: list[np.ndarray] = []
    actions: list[np.ndarray] = []
    raw: list[np.ndarray] = []
    success = False
    while True:
        for v, image in obs["images"].items():
            frames[v].append(image)
        states.append(obs["state"])
        raw.append(env.raw_observation.copy())
        actions.append(policy.get_action(obs)["actions"][0])
        if success:
            return frames, states, actions, raw, True
        executed = actions[-1]
        if execution_noise > 0:
            executed = np.clip(executed + execution_noise * rng.standard_normal(executed.shape), -1.0, 1.0)
        obs, _, _, truncated, info = env.step(executed.astype(np.float32))
        success = info["success"]
        if truncated and not success:
            return frames, states, actions, raw, False


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m envs.metaworld.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="output folder (one sub-folder per tier)")
    parser.add_argument("--tasks", default="MT10", help="comma-separated Meta-World v3 tasks, or MT10")
    parser.add_argument("--episodes", type=int, default=10, help="successful demonstrations per task and tier")
    parser.add_argument("--tiers", default="robot", help=f"comma-separated, from {list(TIERS)}")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--horizon", type=int, default=16, help="action chunk length stored per sample")
    parser.add_argument("--sim-noise", type=float, default=0.3, help="largest expert noise std in the sim tier")
    parser.add_argument("--dart-noise", type=float, default=0.0,
                        help="largest std of the noise executed (not recorded) in the robot tier (DART)")
    args = parser.parse_args(argv)
    from datamodules.progress import configure_logging

    configure_logging()
    demos = MetaWorldDemos(
        root=args.root,
        tasks=args.tasks,
        episodes_per_task=args.episodes,
        tiers=args.tiers.split(","),
        image_size=args.image_size,
        seed=args.seed,
        num_workers=args.workers,
        horizon=args.horizon,
        sim_noise=args.sim_noise,
        dart_noise=args.dart_noise,
    )
    start = time.perf_counter()
    demos.prepare()
    summary = {name: json.loads((Path(path) / "source.json").read_text()) for name, path in demos.sources.items()}
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "sources": summary}, indent=1))


if __name__ == "__main__":
    main()
