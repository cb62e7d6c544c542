"""Build a policy from command-line arguments: a checkpoint, a replay of recorded shards, or any factory.

Shared by ``python -m vla_zoo.deploy.server`` and ``python -m vla_zoo.open_loop`` so both accept the same three
ways of naming a policy. Heavy imports (torch, the model) happen only for the way actually chosen.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", help="a trained checkpoint, loaded with vla_zoo.policy.Policy.from_checkpoint")
    group.add_argument("--replay", metavar="SHARDS_DIR", help="replay the recorded actions of a shard directory")
    group.add_argument(
        "--policy", metavar="MODULE:FACTORY", help="any callable returning a policy, e.g. my_robot.policies:make_policy"
    )
    parser.add_argument(
        "--policy-kwargs", default="{}", metavar="JSON",
        help='keyword arguments for Policy.from_checkpoint or the --policy factory, '
        'e.g. \'{"device": "cuda", "system2_period": 4}\'',
    )
    parser.add_argument(
        "--precision", choices=["32-true", "bf16-mixed", "bf16-true"], default=None,
        help="with --checkpoint: bf16-mixed / bf16-true store the weights in bf16, cast once at load "
        "(vla_zoo.policy.Policy); default 32-true",
    )


def import_factory(spec: str) -> Any:
    """``"package.module:attribute"`` -> the attribute, with an error that says how to spell it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--policy expects MODULE:FACTORY (e.g. my_pkg.policies:make_policy), got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from --policy {spec!r})") from None


def policy_from_args(args: argparse.Namespace, replay_stride: int | None = None) -> Any:
    kwargs = json.loads(args.policy_kwargs)
    if not isinstance(kwargs, dict):
        raise ValueError(f"--policy-kwargs must be a JSON object, got {args.policy_kwargs!r}")
    precision = getattr(args, "precision", None)
    if precision is not None and not args.checkpoint:
        raise ValueError("--precision applies to --checkpoint policies; give a --policy factory its own option "
                         "through --policy-kwargs")
    if args.checkpoint:
        from vla_zoo.policy import Policy

        if precision is not None:
            kwargs["precision"] = precision
        return Policy.from_checkpoint(args.checkpoint, **kwargs)
    if args.replay:
        from vla_zoo.deploy.replay import ReplayPolicy

        return ReplayPolicy.from_shards(args.replay, stride=replay_stride, **kwargs)
    return import_factory(args.policy)(**kwargs)
