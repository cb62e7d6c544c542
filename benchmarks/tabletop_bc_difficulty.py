"""How many demonstrations does the embedded world need? A calibration of its difficulty, not a vla-zoo model.

Trains a small convolutional behaviour-cloning policy (both views stacked as channels, FiLM-conditioned on a
bag-of-words instruction embedding, state concatenated, MSE on the 16-step chunk) on ``N`` expert demonstrations of
the ``robot`` tier, then rolls it out closed loop with the evaluator's seeds (disjoint from the demonstrations).
A conv net is the strongest inductive bias for this 64 px world that trains in minutes on a CPU, so its curve over
``N`` is a floor on the data a from-scratch VLA needs here. Prints JSON: success per task family plus
failure-mode figures (how close the gripper came to the target object, whether it grasped it).
``--wrist-windows`` trains and evaluates once per wrist-camera width (table units the end-effector-centred view
spans; the pyramid's default is 0.4), same demonstrations and seeds otherwise, to measure what the camera is worth.

    python benchmarks/tabletop_bc_difficulty.py --demos 50 400 1200 --steps 8000 [--wrist-windows 0.4 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envs.tabletop import WRIST_WINDOW
from envs.tabletop.env import make_env as make_tabletop_env
from envs.tabletop.tiers import generate_episodes
from vla_zoo.evaluation import evaluate_closed_loop


class Vocabulary:
    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str) -> list[int]:
        return [self.ids.setdefault(w, len(self.ids) + 1) for w in re.findall(r"[a-z]+", text.lower())]


class ConvBCPolicy(nn.Module):
    """images [B, 6, 64, 64] uint8 (scene | wrist), state [B, 3], word ids [B, L] -> chunk [B, H, 3]."""

    def __init__(self, horizon: int, vocab_size: int = 256) -> None:
        super().__init__()
        self.horizon = horizon
        self.stem = nn.Sequential(nn.Conv2d(6, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU())
        self.trunk = nn.Sequential(nn.Conv2d(64, 64, 3, 2, 1), nn.GELU(), nn.Conv2d(64, 128, 3, 2, 1), nn.GELU())
        self.words = nn.EmbeddingBag(vocab_size, 128, padding_idx=0)
        self.film = nn.Linear(128, 2 * 64)  # instruction -> per-channel scale and shift of the stem features
        self.head = nn.Sequential(nn.Linear(128 * 16 + 3 + 128, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(),
                                  nn.Linear(512, horizon * 3))

    def forward(self, images: torch.Tensor, state: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        text = self.words(words)  # [B, 128]
        scale, shift = self.film(text)[:, :, None, None].chunk(2, dim=1)
        h = self.stem(images.float() / 255 - 0.5) * (1 + scale) + shift
        h = self.trunk(h).flatten(1)  # [B, 128 * 4 * 4]
        return self.head(torch.cat([h, state, text], -1)).view(-1, self.horizon, 3)


def dataset(num_demos: int, horizon: int, vocab: Vocabulary, wrist_window: float = WRIST_WINDOW):
    images, states, words, chunks = [], [], [], []
    for ep in generate_episodes("robot", num_demos, seed=0, wrist_window=wrist_window):
        frames = np.concatenate([ep.frames["scene"], ep.frames["wrist"]], -1)  # [T, h, w, 6]
        ids = vocab(ep.instruction)
        for t in range(ep.length):
            images.append(frames[t])
            states.append(ep.state[t])
            words.append(ids)
            chunks.append(ep.actions[np.minimum(np.arange(t, t + horizon), ep.length - 1)])  # hold the last action
    width = max(map(len, words))
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.stack(states)),
            torch.tensor([w + [0] * (width - len(w)) for w in words]), torch.from_numpy(np.stack(chunks)))


class _BCPolicy:
    """The conv net behind the evaluator's policy interface (``get_action(obs) -> {"actions": [H, A]}``)."""

    def __init__(self, net: ConvBCPolicy, vocab: Vocabulary) -> None:
        self.net, self.vocab = net, vocab

    def get_action(self, obs: dict) -> dict:
        images = np.concatenate([obs["images"]["scene"], obs["images"]["wrist"]], -1)
        with torch.no_grad():
            chunk = self.net(torch.from_numpy(images).permute(2, 0, 1)[None], torch.from_numpy(obs["state"])[None],
                             torch.tensor([self.vocab(obs["instruction"])]))[0]
        return {"actions": chunk.numpy()}


class _FailureModes(gym.Wrapper):
    """Per episode: the gripper's closest approach to the target object, and whether it ever held it."""

    def __init__(self, env: gym.Env, log: list[dict]) -> None:
        super().__init__(env)
        self.log = log

    def reset(self, **kwargs):
        out = super().reset(**kwargs)
        self.log.append({"closest": np.inf, "grasped": False})
        return out

    def step(self, action):
        out = super().step(action)
        w, episode = self.env.unwrapped.world, self.log[-1]
        episode["closest"] = min(episode["closest"], float(np.linalg.norm(w.obj_pos[w.scene.target_obj] - w.ee)))
        episode["grasped"] |= w.held == w.scene.target_obj
        return out


def evaluate(net: ConvBCPolicy, vocab: Vocabulary, episodes: int, execute_steps: int, seed: int = 1000,
             wrist_window: float = WRIST_WINDOW) -> dict:
    """``vla_zoo.evaluation.evaluate_closed_loop`` (the evaluator's seeds and protocol) plus failure-mode figures."""
    logs: dict[str, list[dict]] = {}

    def make_env(task: str, env_seed: int) -> gym.Env:
        env = make_tabletop_env(task, env_seed, wrist_window=wrist_window)
        return _FailureModes(env, logs.setdefault(task, []))

    results = evaluate_closed_loop(_BCPolicy(net, vocab), make_env, ["pick_place", "push"], episodes, seed=seed,
                                   execute_steps=execute_steps)
    return {
        task: {"success": results["success"][task],
               "median_closest_to_target": float(np.median([e["closest"] for e in log])),
               "grasped_target": float(np.mean([e["grasped"] for e in log]))}
        for task, log in logs.items()
    }


def train_and_evaluate(n: int, wrist_window: float, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    vocab = Vocabulary()
    images, states, words, chunks = dataset(n, 16, vocab, wrist_window)
    policy = ConvBCPolicy(horizon=16)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=args.steps, pct_start=0.05)
    start = time.perf_counter()
    for _ in range(args.steps):
        i = torch.randint(len(images), (args.batch_size,))
        loss = F.mse_loss(policy(images[i], states[i], words[i]), chunks[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    train_s = time.perf_counter() - start
    policy.eval()
    return {"demos": n, "wrist_window": wrist_window, "samples": len(images), "steps": args.steps,
            "final_train_loss": loss.item(), "train_seconds": round(train_s, 1),
            "closed_loop": evaluate(policy, vocab, args.episodes, args.execute_steps, wrist_window=wrist_window)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demos", type=int, nargs="+", default=[50, 400, 1200])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--episodes", type=int, default=20, help="evaluation episodes per task family")
    parser.add_argument("--execute-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wrist-windows", type=float, nargs="+", default=[WRIST_WINDOW],
                        help="wrist-camera widths in table units, one training run each")
    args = parser.parse_args()
    if args.steps < 21:  # OneCycleLR divides by its warm-up length, 0.05 * steps - 1, which must be positive
        parser.error(f"--steps must be at least 21 (the 5% learning-rate warm-up must span more than one step), "
                     f"got {args.steps}")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    report = []
    for window in args.wrist_windows:
        for n in args.demos:
            report.append(train_and_evaluate(n, window, args))
            print(json.dumps(report[-1]), flush=True)
    print(json.dumps({"benchmark": "tabletop_bc_difficulty", "runs": report}, indent=1))


if __name__ == "__main__":
    main()
