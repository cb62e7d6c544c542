"""Held-out action R^2 of the inverse dynamics model against training episodes and steps.

The slow test's protocol (``vla_zoo/idm_protocol.py``, shared with ``tests/components/test_inverse_dynamics.py``: the same model, optimiser, data seeds and
held-out episodes, H = 2, single flow samples) at sizes a test cannot afford. Prints one JSON line per seed:
held-out and training R^2 (variance-weighted, normalised units), training time, and with ``--samples n`` the
held-out R^2 of n-sample means.

    python benchmarks/idm_heldout.py --episodes 400 --steps 12000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from vla_zoo import idm_protocol as protocol  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=protocol.EPISODES, help="training episodes (robot tier)")
    parser.add_argument("--steps", type=int, default=protocol.STEPS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--samples", type=int, default=1, help="also score means of this many flow samples")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    train_data, heldout_data, _, _ = protocol.robot_splits(args.episodes)
    train_subset = tuple(x[:2000] for x in train_data)
    for seed in args.seeds:
        start = time.perf_counter()
        model = protocol.train_idm(train_data, args.steps, seed)
        train_s = time.perf_counter() - start
        score = lambda data, n=1: round(protocol.heldout_r2(model, data, num_samples=n), 3)  # noqa: E731
        row = {"episodes": args.episodes, "steps": args.steps, "seed": seed, "heldout_r2": score(heldout_data),
               "train_r2": score(train_subset), "train_s": round(train_s, 1), "threads": torch.get_num_threads()}
        if args.samples > 1:
            row[f"heldout_r2_mean_of_{args.samples}"] = score(heldout_data, args.samples)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
