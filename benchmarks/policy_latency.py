"""Dual-rate control latency: a full ``Policy.get_action`` (System 2 + System 1) against a System 1 call alone.

The model is the one ``recipes/pretrain.yaml`` builds (random weights; latency does not depend on them), with a
synthetic data spec. Prints JSON: median / p90 milliseconds per call and the full/System-1 ratio, i.e. how much a
``system2_period`` > 1 saves per call.

    python benchmarks/policy_latency.py [--calls 50] [--recipe recipes/pretrain.yaml] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from datamodules.spec import DataSpec, EmbodimentSpec
from lit_modules.vla_policy import VLAPolicy
from vla_zoo.policy import Policy
from vla_zoo.machine import describe


def build(spec: dict) -> torch.nn.Module:
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def recipe_policy_module(recipe: str) -> VLAPolicy:
    """The recipe's VLAPolicy (its ``${...}`` references resolved) with random weights and a data spec for one 3-dim
    embodiment with two 64 px views."""
    spec = OmegaConf.to_container(OmegaConf.load(recipe), resolve=True)["model"]["init_args"]
    head = spec["action_head"]["init_args"]
    module = VLAPolicy(backbone=build(spec["backbone"]), action_head=build(spec["action_head"]))
    stats = {"min": [-1.0] * 3, "max": [1.0] * 3}
    module.data_spec = DataSpec(
        embodiments={"point_gripper": EmbodimentSpec(id=0, state_dim=3, action_dim=3, has_action=True, normalizer={
            "mode": "min_max", "stats": {"state": stats, "actions": stats}})},
        views=["scene", "wrist"], image_size=[64, 64], horizon=head["horizon"],
        max_state_dim=head["max_state_dim"], max_action_dim=head["max_action_dim"],
    )
    return module


def timed(fn, calls: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/pretrain.yaml")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = recipe_policy_module(args.recipe)
    rng = np.random.default_rng(0)
    obs = {"embodiment": "point_gripper", "instruction": "put the red cube in the blue bowl", "state": np.zeros(3),
           "images": {v: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for v in ("scene", "wrist")}}

    full = Policy(model, system2_period=1)
    system1 = Policy(model, system2_period=10**9)
    system1.get_action(obs)  # fills the System 2 cache once
    head = model.action_head
    tokens, mask = full.encode_observation(full.observation_images(obs), [obs["instruction"]])
    state = torch.zeros(1, model.data_spec.max_state_dim)
    eid = torch.zeros(1, dtype=torch.long)
    results = {
        "threads": args.threads,
        "horizon": model.data_spec.horizon,
        "num_inference_steps": head.num_inference_steps,
        "full_call": timed(lambda: full.get_action(obs), args.calls),
        "system1_call": timed(lambda: system1.get_action(obs), args.calls),
        "head_sample_kv_cache": timed(lambda: head.sample(tokens, mask, state, eid, use_kv_cache=True), args.calls),
        "head_sample_no_cache": timed(lambda: head.sample(tokens, mask, state, eid, use_kv_cache=False), args.calls),
    }
    results["full_over_system1"] = results["full_call"]["median_ms"] / results["system1_call"]["median_ms"]
    results["kv_cache_speedup"] = results["head_sample_no_cache"]["median_ms"] / results["head_sample_kv_cache"]["median_ms"]
    print(json.dumps({"machine": describe(), **results}, indent=1))


if __name__ == "__main__":
    main()
