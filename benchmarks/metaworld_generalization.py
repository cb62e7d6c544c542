"""Does a Meta-World policy generalise past its demonstrations? Open-loop action error on seen and unseen episodes.

For each task, the policy is queried on recorded expert episodes, re-planning every ``--execute-every`` steps as in
closed loop (``vla_zoo.open_loop.predict_episode``), and its actions are compared with the expert's:

- ``seen``: the first ``--episodes`` demonstrations of the training cache (``--shards``);
- ``unseen``: as many fresh expert episodes rendered with ``--seed`` (object and goal positions the policy never saw).

An unseen error well above the seen one means the policy has memorised its demonstrations rather than learned to
read object and goal positions from the images. ``--instruction-of TASK`` gives every episode TASK's instruction
instead of its own: if the policy reads its instruction, the error rises. Prints one JSON object (MSE in the
action's own units, per task: over all steps and over the first chunk).

    python benchmarks/metaworld_generalization.py --checkpoint RUN/checkpoints/last.ckpt \\
        --shards .cache/vla_zoo/metaworld50/metaworld_robot --tasks reach-v3,push-v3,pick-place-v3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datamodules.shards import read_episodes  # noqa: E402
from envs.metaworld.generate import MetaWorldDemos  # noqa: E402
from envs.metaworld.tasks import instruction_for, resolve_tasks  # noqa: E402
from vla_zoo.open_loop import predict_episode  # noqa: E402
from vla_zoo.policy import Policy  # noqa: E402


def action_errors(policy, episodes, execute_every: int, metadata, instruction: str | None) -> dict[str, float]:
    """Mean over episodes of the action MSE over all steps and over the first chunk."""
    every, first = [], []
    for episode in episodes:
        if instruction is not None:
            episode = dataclasses.replace(episode, instruction=instruction)
        predicted = predict_episode(policy, episode, execute_every, metadata)  # [T, A]
        squared = (predicted - episode.actions) ** 2
        every.append(squared.mean())
        first.append(squared[:execute_every].mean())
    return {"mse": round(float(np.mean(every)), 4), "mse_first_chunk": round(float(np.mean(first)), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", default=".cache/vla_zoo/metaworld50/metaworld_robot",
                        help="the training demonstrations (a MetaWorldDemos robot tier)")
    parser.add_argument("--tasks", default="MT10")
    parser.add_argument("--episodes", type=int, default=8, help="seen and unseen episodes per task")
    parser.add_argument("--seed", type=int, default=999, help="seed of the unseen episodes (training caches use 0)")
    parser.add_argument("--execute-every", type=int, default=8)
    parser.add_argument("--instruction-of", default=None, help="give every episode this task's instruction")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    policy = Policy.from_checkpoint(args.checkpoint)
    metadata = policy.metadata()
    spec = next(iter(metadata["embodiments"].values()))
    views, size = tuple(spec["image_keys"]), int(spec["image_size"][0])
    tasks = resolve_tasks(args.tasks)
    swapped = instruction_for(args.instruction_of) if args.instruction_of else None

    seen: dict[str, list] = {task: [] for task in tasks}
    by_instruction = {instruction_for(task): task for task in tasks}
    for episode in read_episodes(args.shards):
        task = by_instruction.get(episode.instruction)
        if task is not None and len(seen[task]) < args.episodes:
            seen[task].append(episode)
        if all(len(v) >= args.episodes for v in seen.values()):
            break

    result = {"checkpoint": args.checkpoint, "episodes": args.episodes, "unseen_seed": args.seed,
              "execute_every": args.execute_every, "instruction_of": args.instruction_of, "tasks": {}}
    for task in tasks:
        # The demonstration generator's own jobs, under another seed (rendered here, not cached).
        unseen = MetaWorldDemos(tasks=[task], episodes_per_task=args.episodes, seed=args.seed, image_size=size,
                                views=views, max_attempts=5, num_workers=1).iter_episodes("robot")
        result["tasks"][task] = {
            "seen": action_errors(policy, seen[task], args.execute_every, metadata, swapped),
            "unseen": action_errors(policy, [e for e in unseen if e is not None], args.execute_every, metadata,
                                    swapped),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
