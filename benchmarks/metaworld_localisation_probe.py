"""Where are the puck and the goal? A held-out linear probe of their positions from a Meta-World policy's VL tokens.

The goal tasks (reach, push, pick-place) put a puck and a goal marker at fresh random places every episode, and
our policies score 0.1-0.3 on them while solving the fixed-layout tasks. This asks whether the vision-language
tokens the action head attends to say where those things are, on scenes the policy never saw:

- fresh scripted-expert episodes (``--seed``; training caches use 0) are rendered with the policy's views and size,
  keeping Meta-World's privileged observation of each frame (hand, puck, goal positions);
- every ``--every``-th frame goes through the policy's backbone (System 2: images + the task's instruction; no
  proprioceptive state reaches it) and the VL tokens are flattened into one feature vector;
- a closed-form ridge probe (``components.codebook_metrics.ridge_probe_r2``) fits hand, puck and goal positions on
  the first episodes and is scored (R^2) on the last ``--held-out`` episodes of each task, so no scene is on both
  sides. The same backbone with fresh random weights gives the floor that a probe reaches from untrained features.

Prints one JSON object: per task, per target, the held-out R^2 for each ``--l2`` and the best one.

    python benchmarks/metaworld_localisation_probe.py --checkpoint RUN/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

import multiprocessing  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.codebook_metrics import ridge_probe_r2  # noqa: E402
from envs.metaworld.generate import demo_seed  # noqa: E402
from envs.metaworld.tasks import instruction_for, resolve_tasks  # noqa: E402
from vla_zoo.policy import Policy  # noqa: E402

# Meta-World v3's 39-D observation: hand xyz [0:3], puck (first object) xyz [4:7], goal xyz [36:39].
TARGETS = {"hand": slice(0, 3), "puck": slice(4, 7), "goal": slice(36, 39)}


def render_task(job: tuple[str, int, int, int, tuple[str, ...], int]) -> dict[str, np.ndarray]:
    """Successful expert episodes of one task: every ``every``-th frame's images and privileged observation."""
    from envs.metaworld.env import MetaWorldEnv
    from envs.metaworld.experts import MetaWorldExpertPolicy

    task, episodes, seed, size, views, every = job
    env = MetaWorldEnv(task, size, views, max_steps=300)
    images: dict[str, list] = {v: [] for v in views}
    raw, episode_ids = [], []
    try:
        kept, slot = 0, 0
        while kept < episodes:
            s = demo_seed(seed, task, "probe", slot, 0)
            slot += 1
            expert = MetaWorldExpertPolicy(env, seed=s)
            obs, _ = env.reset(seed=s)
            frames, success = [], False
            for t in range(env.max_steps):
                if t % every == 0:
                    frames.append(({v: obs["images"][v] for v in views}, env.raw_observation.copy()))
                obs, _, success, truncated, _ = env.step(expert.get_action(obs)["actions"][0])
                if success or truncated:
                    break
            if not success:
                continue
            for imgs, r in frames:
                for v in views:
                    images[v].append(imgs[v])
                raw.append(r)
                episode_ids.append(kept)
            kept += 1
    finally:
        env.close()
    return {"images": np.stack([np.stack(images[v]) for v in views], 1),  # [N, V, h, w, 3]
            "raw": np.stack(raw), "episode": np.asarray(episode_ids)}


@torch.no_grad()
def vl_features(module, images: np.ndarray, instruction: str) -> torch.Tensor:
    """uint8 ``[N, V, h, w, 3]`` -> the flattened VL tokens ``[N, S * D]`` (positions the mask keeps)."""
    out = []
    for i in range(0, len(images), 64):
        batch = torch.as_tensor(images[i:i + 64]).permute(0, 1, 4, 2, 3).contiguous()
        tokens, mask = module.backbone(batch, [instruction] * len(batch))
        if not getattr(module.action_head, "use_vl_mask", True):  # as the action head reads them
            mask = torch.ones_like(mask)
        out.append((tokens * mask[..., None]).flatten(1))
    return torch.cat(out)


def untrained_like(module) -> torch.nn.Module:
    """The checkpoint's architecture with fresh weights, built by its constructor from the saved hyperparameters."""
    from lightning.pytorch.cli import instantiate_module

    hparams = {k: v for k, v in module.hparams.items() if k not in ("_instantiator", "init_from")}
    torch.manual_seed(0)
    fresh = instantiate_module(type(module), hparams)
    fresh.configure_model()
    fresh.data_spec = module.data_spec
    return fresh.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tasks", default="reach-v3,push-v3,pick-place-v3")
    parser.add_argument("--episodes", type=int, default=80, help="fresh expert episodes per task")
    parser.add_argument("--held-out", type=int, default=20, help="of which the last ones score the probe")
    parser.add_argument("--every", type=int, default=5, help="probe every n-th frame")
    parser.add_argument("--seed", type=int, default=999)
    parser.add_argument("--l2", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0, 1000.0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-untrained", action="store_true", help="skip the random-weights floor")
    args = parser.parse_args()
    if args.held_out >= args.episodes:
        parser.error("--held-out must be below --episodes")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    policy = Policy.from_checkpoint(args.checkpoint)
    trained = policy.module
    spec = next(iter(policy.metadata()["embodiments"].values()))
    views, size = tuple(spec["image_keys"]), int(spec["image_size"][0])
    models = {"trained": trained}
    if not args.no_untrained:
        models["untrained"] = untrained_like(trained)
    tasks = resolve_tasks(args.tasks)

    start = time.perf_counter()
    jobs = [(task, args.episodes, args.seed, size, views, args.every) for task in tasks]
    with multiprocessing.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
        data = dict(zip(tasks, pool.map(render_task, jobs)))
    result = {"checkpoint": args.checkpoint, "episodes": args.episodes, "held_out": args.held_out,
              "every": args.every, "seed": args.seed, "render_s": round(time.perf_counter() - start, 1), "tasks": {}}
    for task, d in data.items():
        held = d["episode"] >= args.episodes - args.held_out
        fit = torch.as_tensor(~held)
        entry = {"frames_fit": int((~held).sum()), "frames_held_out": int(held.sum())}
        for name, module in models.items():
            x = vl_features(module, d["images"], instruction_for(task))
            entry[name] = {}
            for target, cols in TARGETS.items():
                y = torch.as_tensor(d["raw"][:, cols], dtype=torch.float64)
                scores = {str(l2): round(ridge_probe_r2(x[fit], y[fit], x[~fit], y[~fit], l2), 3) for l2 in args.l2}
                entry[name][target] = {"best": max(scores.values()), "by_l2": scores}
        result["tasks"][task] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
