"""Closed-loop evaluation: roll a policy out in simulation and report success rates.

``evaluate_closed_loop`` runs any policy (CONTRACTS.md: ``get_action(obs) -> {"actions": [H, A]}``, optional
``reset()``) on any env following the observation contract, executes each predicted chunk open-loop for
``execute_steps`` actions before asking again, and writes ``results.json``, a ``success.png`` bar chart and a few
rollout GIFs. ``vla_zoo.callbacks.ClosedLoopEvalCallback`` does the same during training; ``python -m vla_zoo.evaluation`` does it
from a checkpoint or for the scripted experts::

    python -m vla_zoo.evaluation --env metaworld --checkpoint last.ckpt --tasks MT10 --episodes 10 --out eval/
    python -m vla_zoo.evaluation --env metaworld --policy expert --noise 0.5 --tasks push-v3 --episodes 20 --out eval/

Episode ``i`` of task ``t`` always starts from the same initial state for a given ``seed`` (its reset seed is
derived from ``(seed, t, i)`` on a stream of its own, so evaluation seeds never coincide with the generator's
demonstration seeds).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from envs.registry import ENVS, MakeEnv, expert, resolve_make_env, resolve_tasks

log = logging.getLogger(__name__)

#: A policy, or ``env -> policy`` for policies that need the env itself (scripted experts read simulator state).
PolicyOrFactory = Any

_EVAL_STREAM = zlib.crc32(b"closed-loop-evaluation")


def episode_seed(seed: int, task: str, episode: int) -> int:
    """Reset seed of evaluation episode ``episode`` of ``task``."""
    entropy = [seed, zlib.crc32(task.encode()), _EVAL_STREAM, episode]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _rollout(
    policy: Any, env: gym.Env, seed: int, execute_steps: int | None, max_steps: int, record: bool
) -> tuple[bool, int, list[np.ndarray]]:
    """One episode: returns (success, steps taken, frames if recorded)."""
    obs, _ = env.reset(seed=seed)
    if hasattr(policy, "reset"):
        policy.reset()
    action_dim = env.action_space.shape[0]
    frames = [_frame(obs)] if record else []
    steps = 0
    while steps < max_steps:
        chunk = np.asarray(policy.get_action({**obs, "embodiment": env.unwrapped.embodiment})["actions"])
        if chunk.ndim != 2 or chunk.shape[1] != action_dim or len(chunk) == 0:
            raise ValueError(
                f"policy returned actions of shape {chunk.shape}; the env {type(env).__name__} needs [H, {action_dim}]"
            )
        for action in chunk[: execute_steps or len(chunk)]:
            obs, _, terminated, truncated, info = env.step(action)
            steps += 1
            if record:
                frames.append(_frame(obs))
            if "success" not in info:
                raise KeyError(f"{type(env).__name__}.step() must put 'success' in info (observation contract)")
            if info["success"]:
                return True, steps, frames
            if terminated or truncated or steps >= max_steps:
                return False, steps, frames
    return False, steps, frames


def _frame(obs: dict[str, Any]) -> np.ndarray:
    return np.concatenate(list(obs["images"].values()), axis=1)  # views side by side


def _episode_limit(env: gym.Env, max_steps: int | None) -> int:
    if max_steps is not None:
        return max_steps
    unwrapped = env.unwrapped
    limit = getattr(unwrapped, "max_steps", None) or getattr(unwrapped, "max_episode_steps", None)
    limit = limit or (env.spec.max_episode_steps if env.spec else None)
    if limit is None:
        raise ValueError(f"{type(env).__name__} declares no episode limit (max_steps): pass max_steps")
    return int(limit)


def evaluate_closed_loop(
    policy: PolicyOrFactory,
    make_env: MakeEnv,
    tasks: list[str],
    episodes_per_task: int,
    seed: int = 0,
    execute_steps: int | None = None,
    max_steps: int | None = None,
    record_videos: int = 0,
    out_dir: str | os.PathLike | None = None,
    rank: int = 0,
    world_size: int = 1,
    run_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Success rate of ``policy`` per task over ``episodes_per_task`` seeded episodes, and their average.

    ``policy`` is a policy or a factory ``env -> policy`` (called once per task). ``execute_steps`` actions of each
    chunk run open-loop before re-planning (``None``: the whole chunk). ``max_steps`` bounds an episode (``None``:
    the env's own limit). The first ``record_videos`` episodes of each task become GIFs under ``out_dir``.
    With ``world_size > 1`` this process runs only the episodes ``k`` with ``k % world_size == rank`` (``k``
    numbering all episodes of all tasks); sum ``successes`` / ``episodes`` over processes for the totals.
    ``run_info`` (e.g. the checkpoint and the policy's sampling options) is stored in the results as given.
    ``progress`` draws a bar over this process's episodes, with the success rate so far.
    """
    from datamodules.progress import make_progress

    if execute_steps is not None and execute_steps < 1:
        raise ValueError(f"execute_steps must be >= 1 or None, got {execute_steps}")
    out = Path(out_dir) if out_dir is not None else None
    episodes: list[dict[str, Any]] = []
    mine = {t: [i for i in range(episodes_per_task) if (t * episodes_per_task + i) % world_size == rank]
            for t in range(len(tasks))}
    with make_progress("episode", disable=not progress) as bar:
        bar_task = bar.add_task("closed loop", total=sum(map(len, mine.values())))
        for t, task in enumerate(tasks):
            if not mine[t]:
                continue
            env = make_env(task, seed)
            try:
                task_policy = policy if hasattr(policy, "get_action") else policy(env)
                limit = _episode_limit(env, max_steps)
                for i in mine[t]:
                    s = episode_seed(seed, task, i)
                    record = out is not None and i < record_videos
                    success, steps, frames = _rollout(task_policy, env, s, execute_steps, limit, record)
                    episodes.append({"task": task, "episode": i, "seed": s, "success": success, "steps": steps})
                    if record:
                        name = f"{task}_episode{i:03d}_{'success' if success else 'failure'}.gif"
                        save_gif(frames, out / "videos" / name, env_fps(env))
                    wins = sum(e["success"] for e in episodes)
                    bar.update(bar_task, advance=1, description=f"closed loop {task}: {wins}/{len(episodes)} succeeded")
            finally:
                env.close()
    results = summarize(episodes, tasks)
    results.update(seed=seed, episodes_per_task=episodes_per_task, execute_steps=execute_steps, max_steps=max_steps)
    results.update(run_info or {})
    if out is not None:
        write_report(results, out)
    return results


def env_fps(env: gym.Env) -> float:
    """Frames per second of an env's rollouts (for GIFs and videos); 20 where it declares none."""
    return float(getattr(env.unwrapped, "fps", None) or env.metadata.get("render_fps") or 20)


def summarize(episodes: list[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Per-task counts and success rates, and their unweighted average over tasks that ran."""
    per_task = {}
    for task in tasks:
        mine = [e for e in episodes if e["task"] == task]
        if mine:
            wins = sum(e["success"] for e in mine)
            per_task[task] = {"successes": wins, "episodes": len(mine), "success_rate": wins / len(mine)}
    rates = [v["success_rate"] for v in per_task.values()]
    return {
        "success": {k: v["success_rate"] for k, v in per_task.items()},
        "average": float(np.mean(rates)) if rates else float("nan"),
        "tasks": per_task,
        "episodes": episodes,
    }


def write_report(results: dict[str, Any], out_dir: str | os.PathLike) -> None:
    """``results.json`` and a ``success.png`` bar chart of per-task success with the average as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    names, rates = list(results["success"]), list(results["success"].values())
    fig = Figure(figsize=(max(4.0, 0.6 * len(names) + 1.5), 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), rates, color="tab:blue")
    ax.axhline(results["average"], color="tab:red", linestyle="--", label=f"average {results['average']:.2f}")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(out / "success.png", dpi=100)


def save_gif(frames: list[np.ndarray], path: str | os.PathLike, fps: float) -> None:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # GIF delays are whole centiseconds and viewers slow anything under 20 ms down: skip frames above 50 fps.
    stride = max(1, math.ceil(fps / 50))
    images = [Image.fromarray(f) for f in frames[::stride]]
    duration = max(20, int(1000 * stride / fps))
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)


def _load_policy(args: argparse.Namespace) -> PolicyOrFactory:
    if args.policy == "expert":
        if args.env not in ENVS:
            raise SystemExit(f"--policy expert needs a registered env ({sorted(ENVS)}), got {args.env!r}")
        return functools.partial(expert(args.env), noise=args.noise, horizon=args.horizon, seed=args.seed)
    if args.checkpoint is None:
        raise SystemExit("pass --checkpoint CKPT (or --policy expert)")
    from vla_zoo.policy import Policy  # the trained-model policy; imported here so the experts need no model code

    return Policy.from_checkpoint(args.checkpoint, num_steps=args.inference_steps, num_samples=args.samples)


def trained_wrist_window(run_config: dict[str, Any]) -> float:
    """The wrist-camera width (table units) of the tabletop pyramid a run trained on, from its resolved config
    (``lit_modules.checkpoint.load_run_config``); the world's default when the run prepared no pyramid or left it unset."""
    from envs.tabletop import WRIST_WINDOW

    prepare = (run_config.get("data") or {}).get("init_args", {}).get("prepare") or {}
    return float((prepare.get("init_args") or {}).get("wrist_window", WRIST_WINDOW))


def _checkpoint_wrist_window(checkpoint: str | None) -> float | None:
    """``trained_wrist_window`` of a checkpoint's embedded run config (read memory-mapped, without the weights);
    None if it has none (not written by the CLI)."""
    if checkpoint is None:
        return None
    from lit_modules.checkpoint import load_run_config

    try:
        return trained_wrist_window(load_run_config(checkpoint))
    except KeyError:
        return None


def _env_kwargs(args: argparse.Namespace, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Env options from the command line, rendering what the policy was trained on unless told otherwise."""
    if args.env not in ENVS:
        return {}
    embodiment = "sawyer" if args.env == "metaworld" else args.embodiment
    spec = None
    if metadata is not None:
        spec = metadata["embodiments"].get(embodiment)
        if spec is None:
            raise SystemExit(f"the policy knows embodiments {sorted(metadata['embodiments'])}, not {embodiment!r}")
    kwargs: dict[str, Any] = {}
    if args.env == "metaworld":
        if spec is not None:
            kwargs.update(views=list(spec["image_keys"]), image_size=tuple(spec["image_size"]))
        if args.views is not None:
            kwargs["views"] = args.views.split(",")
        if args.max_steps is not None:
            kwargs["max_steps"] = args.max_steps
    else:
        kwargs["embodiment"] = embodiment
        if spec is not None:
            kwargs["image_size"] = int(spec["image_size"][0])
        if args.max_steps is not None:
            kwargs["max_episode_steps"] = args.max_steps
        # The wrist camera the policy was trained with: a policy from a wider-wrist pyramid must not be rolled out
        # with the default camera without a word.
        wrist_window = args.wrist_window
        if wrist_window is None and args.policy == "checkpoint":
            wrist_window = _checkpoint_wrist_window(args.checkpoint)
        if wrist_window is not None:
            kwargs["wrist_window"] = wrist_window
        if args.objects is not None:
            kwargs["num_objects"] = args.objects
    if args.image_size is not None:
        kwargs["image_size"] = args.image_size
    return kwargs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from datamodules.progress import configure_logging

    parser = argparse.ArgumentParser(prog="python -m vla_zoo.evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="metaworld", help=f"one of {sorted(ENVS)} or 'module:make_env'")
    parser.add_argument("--checkpoint", help="a vla-zoo checkpoint (loaded with vla_zoo.policy.Policy)")
    parser.add_argument("--policy", choices=["checkpoint", "expert"], default="checkpoint")
    parser.add_argument("--noise", type=float, default=0.0, help="std of Gaussian action noise (--policy expert)")
    parser.add_argument("--horizon", type=int, default=1, help="chunk length of the expert (--policy expert)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (Meta-World: names or MT10)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inference-steps", type=int, default=None,
                        help="Euler steps of the flow-matching head per chunk (default: the head's own, 4)")
    parser.add_argument("--samples", type=int, default=1,
                        help="flow samples averaged into each chunk (default 1: one draw, as trained)")
    parser.add_argument("--execute-steps", type=int, default=None, help="actions per chunk before re-planning")
    parser.add_argument("--max-steps", type=int, default=None, help="episode length limit")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--views", default=None, help="comma-separated views (Meta-World; default: the policy's)")
    parser.add_argument("--embodiment", default="point_gripper", help="tabletop embodiment")
    parser.add_argument("--wrist-window", type=float, default=None,
                        help="tabletop wrist camera width in table units (default: the checkpoint's training pyramid)")
    parser.add_argument("--objects", type=int, default=None,
                        help="tabletop: objects per scene, the target and N-1 distractors (default: 2-4)")
    parser.add_argument("--videos", type=int, default=2, help="GIFs recorded per task")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    if args.objects is not None and args.env != "tabletop":
        parser.error(f"--objects sets the tabletop world's scenes; --env {args.env} has no such knob")
    configure_logging()

    policy = _load_policy(args)
    env_kwargs = _env_kwargs(args, policy.metadata() if hasattr(policy, "metadata") else None)
    results = evaluate_closed_loop(
        policy,
        resolve_make_env(args.env, **env_kwargs),
        resolve_tasks(args.env, args.tasks),
        args.episodes,
        seed=args.seed,
        execute_steps=args.execute_steps,
        max_steps=args.max_steps,
        record_videos=args.videos,
        out_dir=args.out,
        run_info={**({"checkpoint": args.checkpoint, "inference_steps": args.inference_steps, "samples": args.samples}
                     if args.policy == "checkpoint" else {"policy": "expert", "noise": args.noise, "horizon": args.horizon}),
                  **({"objects": args.objects} if args.objects is not None else {})},
    )
    print(json.dumps({"success": results["success"], "average": results["average"], "out": args.out}, indent=2))
    return results


if __name__ == "__main__":
    main()
