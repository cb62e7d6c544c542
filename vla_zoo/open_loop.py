"""Open-loop evaluation: run a policy over recorded episodes and compare its actions with the recorded ones.

The first thing to look at when a policy "has low loss but the robot idles or jitters": for every episode, the
policy is queried every ``execute_every`` steps on the recorded observation, the first ``execute_every`` actions of
each chunk are kept, and the resulting trajectory is compared with the recorded actions. Outputs in ``out_dir``:

- ``open_loop.json``: per-dimension action MSE (per episode and per embodiment, in the embodiment's raw units),
  plus per-dimension standard deviations of predicted and recorded actions: a predicted std far below the recorded
  one is the signature of a policy that idles;
- ``episode_XXXX.png``: predicted (one segment per chunk, so jumps between chunks show) against recorded actions
  over time, one panel per action dimension.

Command::

    python -m vla_zoo.open_loop --checkpoint last.ckpt --shards data/robot --out eval/robot
    python -m vla_zoo.open_loop --checkpoint last.ckpt --lerobot ~/datasets/so100 --embodiment so100 --out eval/so100
    python -m vla_zoo.open_loop --replay data/robot --shards data/robot --out eval/check   # MSE 0: checks the tool
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.episode import Episode
from vla_zoo.deploy.validation import validate_observation


def episode_observation(episode: Episode, t: int) -> dict[str, Any]:
    """The policy observation an environment would have produced at step ``t`` of a recorded episode."""
    return {
        "images": {view: frames[t] for view, frames in episode.frames.items()},
        "state": episode.state[t],
        "instruction": episode.instruction,
        "embodiment": episode.embodiment,
    }


def predict_episode(policy: Any, episode: Episode, execute_every: int, metadata: Mapping[str, Any]) -> np.ndarray:
    """Actions ``[T, A]`` the policy would have executed, re-planning every ``execute_every`` steps."""
    if hasattr(policy, "reset"):
        policy.reset()
    predicted = np.zeros_like(episode.actions, dtype=np.float32)
    for t in range(0, episode.length, execute_every):
        observation = episode_observation(episode, t)
        validate_observation(observation, metadata)
        chunk = np.asarray(policy.get_action(observation)["actions"])  # [H, A]
        n = min(execute_every, episode.length - t)
        if chunk.ndim != 2 or chunk.shape[0] < n or chunk.shape[1] != episode.actions.shape[1]:
            raise ValueError(
                f"policy returned actions of shape {list(chunk.shape)} for embodiment {episode.embodiment!r}; expected "
                f"[H >= {n}, {episode.actions.shape[1]}] (execute_every={execute_every})"
            )
        predicted[t : t + n] = chunk[:n]
    return predicted


def plot_episode(
    path: Path, predicted: np.ndarray, recorded: np.ndarray, names: Sequence[str], execute_every: int, title: str
) -> Any:
    """One panel per action dimension: recorded (black) and predicted (one orange segment per executed chunk).
    Saves it to ``path`` and returns the matplotlib figure."""
    # Figure + Agg canvas directly: no pyplot global state, no display needed, safe in worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, dims = recorded.shape
    fig = Figure(figsize=(9, 1.6 * dims + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(dims, 1, sharex=True, squeeze=False)[:, 0]
    time = np.arange(steps)
    for d, ax in enumerate(axes):
        ax.plot(time, recorded[:, d], color="black", lw=1.5, label="recorded")
        for k, start in enumerate(range(0, steps, execute_every)):
            segment = slice(start, min(start + execute_every, steps))
            ax.plot(time[segment], predicted[segment, d], color="tab:orange", lw=1.2, label="predicted" if k == 0 else None)
        ax.set_ylabel(f"{names[d]}\nMSE {np.mean((predicted[:, d] - recorded[:, d]) ** 2):.3g}", fontsize="small")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize="small")
    axes[0].set_title(title, fontsize="medium")
    axes[-1].set_xlabel(f"step (re-planned every {execute_every})")
    fig.savefig(path, dpi=80)
    return fig


def open_loop_eval(
    policy: Any,
    episodes: Iterable[Episode],
    out_dir: str | Path,
    max_episodes: int | None = None,
    execute_every: int | None = None,
    action_names: Mapping[str, Sequence[str]] | None = None,
    on_plot: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``policy`` open-loop on ``episodes``; writes ``open_loop.json`` and one PNG per episode.

    ``execute_every`` defaults to the policy's horizon (execute whole chunks); ``action_names`` maps an embodiment
    to names for the plot panels (default ``a0, a1, ...``). Actionless episodes are skipped and counted.
    ``on_plot(name, figure)`` receives each episode's figure (``vla_zoo.callbacks.OpenLoopEvalCallback`` logs it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = policy.metadata()
    horizon = int(metadata["horizon"])
    execute_every = horizon if execute_every is None else execute_every
    if not 1 <= execute_every <= horizon:
        raise ValueError(f"execute_every must be in [1, horizon={horizon}], got {execute_every}")

    per_episode: list[dict[str, Any]] = []
    sums: dict[str, dict[str, Any]] = {}  # embodiment -> running sums over all steps
    skipped = 0
    for index, episode in enumerate(episodes):
        if max_episodes is not None and len(per_episode) >= max_episodes:
            break
        if episode.actions is None or episode.state is None:
            skipped += 1
            continue
        recorded = episode.actions.astype(np.float64)
        predicted = predict_episode(policy, episode, execute_every, metadata).astype(np.float64)
        mse = ((predicted - recorded) ** 2).mean(axis=0)  # [A]
        names = list((action_names or {}).get(episode.embodiment) or [f"a{d}" for d in range(recorded.shape[1])])
        plot = f"episode_{index:04d}.png"
        title = f"episode {index} ({episode.embodiment}): {episode.instruction} | MSE {mse.mean():.4g}"
        figure = plot_episode(out_dir / plot, predicted, recorded, names, execute_every, title)
        if on_plot is not None:
            on_plot(plot[: -len(".png")], figure)
        per_episode.append({
            "index": index, "embodiment": episode.embodiment, "instruction": episode.instruction,
            "length": episode.length, "mse_per_dim": mse.tolist(), "mse": float(mse.mean()), "plot": plot,
        })
        acc = sums.setdefault(episode.embodiment, {"names": names, "n": 0, "episodes": 0, "se": 0.0, "p": 0.0,
                                                   "p2": 0.0, "r": 0.0, "r2": 0.0})
        acc["n"] += episode.length
        acc["episodes"] += 1
        acc["se"] = acc["se"] + ((predicted - recorded) ** 2).sum(0)
        for key, x in (("p", predicted), ("r", recorded)):
            acc[key] = acc[key] + x.sum(0)
            acc[key + "2"] = acc[key + "2"] + (x**2).sum(0)

    def std(total: np.ndarray, total_sq: np.ndarray, n: int) -> list[float]:
        return np.sqrt(np.maximum(total_sq / n - (total / n) ** 2, 0.0)).tolist()

    embodiments = {
        name: {
            "action_names": acc["names"], "episodes": acc["episodes"], "steps": acc["n"],
            "mse_per_dim": (acc["se"] / acc["n"]).tolist(), "mse": float((acc["se"] / acc["n"]).mean()),
            "predicted_std": std(acc["p"], acc["p2"], acc["n"]), "recorded_std": std(acc["r"], acc["r2"], acc["n"]),
        }
        for name, acc in sums.items()
    }
    result = {
        "execute_every": execute_every, "horizon": horizon, "embodiments": embodiments, "episodes": per_episode,
        "skipped_actionless": skipped,
    }
    (out_dir / "open_loop.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from vla_zoo.deploy.loading import add_policy_arguments, policy_from_args

    parser = argparse.ArgumentParser(prog="python -m vla_zoo.open_loop", description=__doc__.split("\n\n")[0])
    add_policy_arguments(parser)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--shards", help="a shard directory written by datamodules.shards.write_source")
    data.add_argument("--lerobot", help="a local LeRobot dataset folder (holds meta/info.json)")
    parser.add_argument("--embodiment", help="with --lerobot: the embodiment name the policy knows this robot by")
    parser.add_argument("--views", help="with --lerobot: comma-separated camera views (default: the policy's)")
    parser.add_argument("--out", required=True, help="output folder for open_loop.json and the plots")
    parser.add_argument("--max-episodes", type=int, default=None)
    parser.add_argument("--execute-every", type=int, default=None, help="re-plan every K steps (default: horizon)")
    args = parser.parse_args(argv)
    if args.lerobot and not args.embodiment:
        parser.error("--lerobot needs --embodiment")

    policy = policy_from_args(args, replay_stride=args.execute_every)
    if args.shards:
        from datamodules.episode import Modality
        from datamodules.shards import load_sidecars, read_episodes

        sidecars = load_sidecars(args.shards)
        episodes = read_episodes(args.shards)
        action_names = {sidecars["source"]["embodiment"]: Modality.from_dict(sidecars["modality"]).action_names}
    else:
        from datamodules.lerobot import load_lerobot_episodes

        spec = policy.metadata()["embodiments"].get(args.embodiment)
        if spec is None:
            parser.error(f"the policy does not know embodiment {args.embodiment!r}; it knows {sorted(policy.metadata()['embodiments'])}")
        episodes, report = load_lerobot_episodes(
            args.lerobot, embodiment=args.embodiment, views=args.views.split(",") if args.views else spec["image_keys"],
            image_size=spec["image_size"][0],
        )
        action_names = {args.embodiment: report.modality.action_names} if report.modality else None
    result = open_loop_eval(policy, episodes, args.out, args.max_episodes, args.execute_every, action_names)
    print(json.dumps({"out": args.out, "embodiments": result["embodiments"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
