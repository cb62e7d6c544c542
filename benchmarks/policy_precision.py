"""Inference with bf16 weights (``Policy(precision=...)``, cast once) against fp32; prints JSON.

Four policies over the same weights answer the same observations from the same noise:

- ``fp32``: ``precision="32-true"``;
- ``bf16_mixed``: ``precision="bf16-mixed"``, the linear layers' weights cast to bf16 once, calls under autocast;
- ``bf16_true``: ``precision="bf16-true"``, every weight cast to bf16 once, no autocast;
- ``autocast``: fp32 weights, each call under ``torch.autocast(bf16)`` (every weight cast again on every call).

Reported: median latency of a full call (System 2 + System 1, ``system2_period=1``) and of a System 1 call alone
(cached VL tokens), the arms interleaved call by call; and the action error of bf16 and autocast against fp32, in
robot units, next to two yardsticks: how much the fp32 actions vary across observations, and how far two fp32
samples from different noise lie apart (the flow's own sampling spread).

The model is a checkpoint (``--checkpoint``, trained: the meaningful error) or, by default, the recipe's model with
random weights and a synthetic data spec, as ``benchmarks/policy_latency.py`` builds it.

    python benchmarks/policy_precision.py --checkpoint runs/pretrain/checkpoints/last.ckpt --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import numpy as np
import torch

from benchmarks.policy_latency import recipe_policy_module
from vla_zoo.machine import describe
from vla_zoo.policy import Policy


def observations(policy: Policy, count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    meta = policy.metadata()["embodiments"]
    out = []
    for i in range(count):
        name = sorted(meta)[i % len(meta)]
        e = meta[name]
        h, w = e["image_size"]
        out.append({"embodiment": name, "instruction": f"put the red cube in the blue bowl {i}",
                    "state": rng.uniform(-1, 1, e["state_dim"]).astype(np.float32),
                    "images": {v: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for v in e["image_keys"]}})
    return out


class Arm:
    def __init__(self, policy: Policy, autocast: bool = False) -> None:
        self.policy, self.autocast = policy, autocast

    def act(self, obs: dict, seed: int) -> np.ndarray:
        self.policy.seed = seed
        self.policy.reset()  # the same noise for every arm
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            return self.policy.get_action(obs)["actions"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--recipe", default="recipes/pretrain.yaml", help="without --checkpoint: random weights")
    parser.add_argument("--observations", type=int, default=16)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per arm and kind")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = Policy.from_checkpoint(args.checkpoint) if args.checkpoint else Policy(recipe_policy_module(args.recipe))
    arms = {"fp32": Arm(fp32), "bf16_mixed": Arm(Policy(fp32.module, precision="bf16-mixed")),
            "bf16_true": Arm(Policy(fp32.module, precision="bf16-true")),
            "autocast": Arm(Policy(fp32.module), autocast=True)}
    obs = observations(fp32, args.observations)

    # Action error against fp32, from the same noise; and fp32 against itself from other noise.
    actions = {name: np.stack([arm.act(o, seed=i) for i, o in enumerate(obs)]) for name, arm in arms.items()}
    other_noise = np.stack([arms["fp32"].act(o, seed=10_000 + i) for i, o in enumerate(obs)])
    ref = actions["fp32"]
    error = {name: {"mean_abs": float(np.abs(a - ref).mean()), "max_abs": float(np.abs(a - ref).max()),
                    "rms": float(np.sqrt(np.square(a - ref).mean()))}
             for name, a in actions.items() if name != "fp32"}

    # Latency: full calls (System 2 + 1) and System 1 calls (cached tokens), arms interleaved call by call.
    times = {(name, kind): [] for name in arms for kind in ("full", "system1")}
    for arm in arms.values():
        arm.act(obs[0], 0)  # warm-up
    for i in range(args.calls):
        o = obs[i % len(obs)]
        for name, arm in arms.items():
            for kind, period in (("full", 1), ("system1", 10**9)):
                arm.policy.system2_period = period
                if kind == "system1":
                    arm.act(o, i)  # fills the System 2 cache, untimed
                    start = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=arm.autocast):
                        arm.policy.get_action(o)
                else:
                    start = time.perf_counter()
                    arm.act(o, i)
                times[(name, kind)].append(time.perf_counter() - start)
    latency = {name: {kind: 1e3 * statistics.median(times[(name, kind)]) for kind in ("full", "system1")}
               for name in arms}
    report = dict(
        machine=describe(), load_average=os.getloadavg()[0], checkpoint=args.checkpoint,
        model=None if args.checkpoint else f"{args.recipe} (random weights)", observations=len(obs),
        parameters=sum(p.numel() for p in fp32.module.parameters()),
        latency_ms_median=latency,
        speedup_over_fp32={name: {kind: latency["fp32"][kind] / latency[name][kind] for kind in ("full", "system1")}
                           for name in arms if name != "fp32"},
        action_error_vs_fp32=error,
        fp32_action_std_across_observations=float(ref.std(0).mean()),
        fp32_other_noise_mean_abs=float(np.abs(other_noise - ref).mean()),
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
