"""Is the latent-action probe short of data? Probe a trained latent-action model with many fresh robot episodes.

The module's own probe (``val/probe_r2`` of ``recipes/lam.yaml``) fits on half of the validation stream's 50 robot
episodes. This script renders ``--episodes`` new robot-tier episodes (a seed the pyramid never used), holds the last
100 out, and fits the same closed-form ridge probe (``components.codebook_metrics.ridge_probe_r2``) of the true
end-effector displacement (dx, dy summed over the H-step window) from the pre-quantisation latent on a growing
number of the others, for the trained model and for the same architecture with fresh random weights. If the trained
latent's R^2 rose with probe data while the untrained one stayed flat, the module's probe would be data-starved.

It also probes each axis of the displacement alone (``displacement_x``, ``displacement_y``) and, from the same
latents, where the end effector is at t + H (``end_position``) and at t (``start_position``), and the displacement
from the latent together with the start position (``displacement_given_start``). A decoder that repaints x_{t+H}
from x_t needs to know where the robot ends up, not how far it moved: if the latent held the end position linearly
and the displacement only with the start position added, the latent would be absolute, not an action. With
``--mlp`` it also fits a small MLP probe of the displacement (``displacement_mlp``): whether what the linear probe
misses is in the latent at all.

``criterion`` in the output settles whether the latent is learned: it counts as learned when its displacement probe
(the largest ``--fit-episodes``, the best ``--l2``) removes at least two thirds of the variance that random features
of the same architecture leave unexplained, ``(R2_trained - R2_random) / (1 - R2_random) >= 2/3``
(``components.codebook_metrics.latent_learned``). A fixed margin over random weights cannot be met where they
already read 0.80 of the move; this asks for the same share of what is left whatever that is. Prints one JSON
object.

    python benchmarks/lam_probe_episodes.py --checkpoint runs/lam/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional import r2_score  # noqa: E402

from components.codebook_metrics import (  # noqa: E402
    LEARNED_FRACTION,
    latent_learned,
    ridge_probe_r2,
    variance_removed_beyond_random,
)
from envs.tabletop import generate_episodes  # noqa: E402
from lit_modules.latent_action import LatentActionModule  # noqa: E402
from lit_modules.checkpoint import load_module, load_run_config, read_checkpoint  # noqa: E402
from vla_zoo.evaluation import trained_wrist_window  # noqa: E402

HELD_OUT = 100


def windows(episodes, horizon: int, views: list[str]):
    """Every (x_t, x_{t+H}) pair of every episode as uint8 ``[M, V, 3, h, w]`` frames of ``views`` (kept as uint8:
    float copies of ~6,000 pairs would take 4x the memory for nothing), with the net (dx, dy) between them and the end
    effector's (x, y) at t and t + H (the point gripper's state is its EE position)."""
    x_t, x_tH, displacement, start, end, episode = [], [], [], [], [], []
    for i, ep in enumerate(episodes):
        frames = np.stack([ep.frames[view] for view in views], 1)  # [T, V, h, w, 3] uint8, one frame per action
        for t in range(len(frames) - horizon):
            x_t.append(frames[t])
            x_tH.append(frames[t + horizon])
            displacement.append(ep.actions[t:t + horizon, :2].sum(0))
            start.append(ep.state[t, :2])
            end.append(ep.state[t + horizon, :2])
            episode.append(i)
    as_images = lambda xs: torch.from_numpy(np.stack(xs)).permute(0, 1, 4, 2, 3)  # noqa: E731
    as_float = lambda xs: torch.from_numpy(np.stack(xs)).float()  # noqa: E731
    targets = {"displacement": as_float(displacement), "end_position": as_float(end),
               "start_position": as_float(start)}
    # Per axis too: at 64 px the scene camera shows a move along y as the whole gantry bar moving, and one along x
    # only as the few-pixel carriage sliding on it (benchmarks/RESULTS.md, issue 5).
    targets |= {f"displacement_{axis}": targets["displacement"][:, i:i + 1] for i, axis in enumerate("xy")}
    return as_images(x_t), as_images(x_tH), targets, torch.tensor(episode)


def trained_cameras(checkpoint: str) -> tuple[list[str], float]:
    """The views the model was trained on, in its order, and its pyramid's wrist window, from the run config the
    CLI embeds in the checkpoint (so a probe cannot silently render other cameras than the training data's)."""
    config = load_run_config(checkpoint)
    data = config["data"]["init_args"]
    source_views = (data.get("val_sources") or data["sources"])[0].get("views") or ["scene"]
    views = [source_views[i] for i in config["model"]["init_args"].get("view_indices", [0])]
    return views, trained_wrist_window(config)


def untrained_model(checkpoint: str) -> torch.nn.Module:
    """The checkpoint's architecture with fresh weights, built by its constructor from the saved hyperparameters."""
    from lightning.pytorch.cli import instantiate_module

    hparams = read_checkpoint(checkpoint, mmap=True)["hyper_parameters"]
    torch.manual_seed(0)
    module = instantiate_module(LatentActionModule, {k: v for k, v in hparams.items() if k != "_instantiator"})
    return module.model.eval()


@torch.no_grad()
def latents(model, x_t: torch.Tensor, x_tH: torch.Tensor) -> torch.Tensor:  # uint8 frames -> [M, N * D]
    as_float = lambda x: x.float() / 255  # noqa: E731  (the model takes frames in [0, 1])
    return torch.cat([model.encode(as_float(x_t[i:i + 512]), as_float(x_tH[i:i + 512])).flatten(1)
                      for i in range(0, len(x_t), 512)])


def mlp_probe_r2(x: torch.Tensor, y: torch.Tensor, episode: torch.Tensor, fit: torch.Tensor, held_out: torch.Tensor,
                 steps: int = 3000, seed: int = 0) -> float:
    """Held-out R^2 of a small MLP probe ``y ~ x``: is what the ridge probe misses in the latent, nonlinearly?

    Fitted on the ``fit`` windows minus their last tenth of episodes, which pick the step to stop at (the MLP
    overfits 4,000 windows); scored like ``ridge_probe_r2`` (variance-weighted over columns) on ``held_out``.
    """
    torch.manual_seed(seed)
    fit_episodes = episode[fit].unique()
    stop_episodes = fit_episodes[-max(1, len(fit_episodes) // 10):]
    stop = fit & torch.isin(episode, stop_episodes)
    train = fit & ~stop
    mx, sx = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
    my, sy = y[train].mean(0), y[train].std(0).clamp_min(1e-8)
    xs, ys = (x - mx) / sx, (y - my) / sy
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                              torch.nn.GELU(), torch.nn.Linear(256, y.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    r2 = lambda rows: float(r2_score(net(xs[rows]) * sy + my, y[rows], multioutput="variance_weighted"))  # noqa: E731
    train_idx, best = train.nonzero().squeeze(1), (-float("inf"), float("nan"))
    for step in range(steps):
        batch = train_idx[torch.randint(len(train_idx), (256,))]
        loss = torch.nn.functional.mse_loss(net(xs[batch]), ys[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                best = max(best, (r2(stop), r2(held_out)))  # (stopping score, held-out score at that step)
    return round(best[1], 3)


def criterion(result: dict, fit_episodes: int) -> dict:
    """The latent-action criterion on the displacement probe fitted on ``fit_episodes`` episodes, best l2 each."""
    best = {name: max(result[name]["displacement"][f"fit_{fit_episodes}_episodes"].values())
            for name in ("trained", "untrained")}
    return {"r2_trained": best["trained"], "r2_random": best["untrained"],
            "fraction_removed": round(variance_removed_beyond_random(best["trained"], best["untrained"]), 3),
            "threshold": round(LEARNED_FRACTION, 4), "learned": latent_learned(best["trained"], best["untrained"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/lam/checkpoints/last.ckpt")
    parser.add_argument("--episodes", type=int, default=500, help="robot episodes rendered (the last 100 held out)")
    parser.add_argument("--fit-episodes", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    # Relative ridge (components.codebook_metrics.ridge_probe_r2). With 400 episodes (~4,300 windows) and 128 latent
    # features the fit is well posed: the best l2 measured so far is the smallest (benchmarks/RESULTS.md, issue 5).
    parser.add_argument("--l2", type=float, nargs="+", default=[1e-5, 1e-3, 0.1, 1.0])
    parser.add_argument("--seed", type=int, default=777, help="episode seed (the pyramid's robot tier uses 0)")
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--views", nargs="+", default=None,
                        help="the views the model was trained on, in its order (default: read from the checkpoint)")
    parser.add_argument("--wrist-window", type=float, default=None,
                        help="table units the wrist camera sees (default: the training pyramid's, from the checkpoint)")
    parser.add_argument("--mlp", action="store_true",
                        help="also fit an MLP probe of the displacement on the largest --fit-episodes")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.episodes <= HELD_OUT or max(args.fit_episodes) > args.episodes - HELD_OUT:
        parser.error(f"--episodes must exceed {HELD_OUT} (held out) + the largest --fit-episodes")

    trained = load_module(LatentActionModule, args.checkpoint, map_location="cpu").model.eval()
    views, wrist_window = trained_cameras(args.checkpoint)
    args.views = views if args.views is None else args.views
    args.wrist_window = wrist_window if args.wrist_window is None else args.wrist_window
    if len(args.views) != trained.num_views:
        parser.error(f"{args.checkpoint} was trained on {trained.num_views} views; give as many to --views "
                     f"(got {args.views}), e.g. --views scene wrist")
    untrained = untrained_model(args.checkpoint)

    start = time.perf_counter()
    # Rendered at the model's own resolution (a latent model may be trained on a 128 px pyramid).
    episodes = generate_episodes("robot", args.episodes, seed=args.seed, image_size=trained.image_size,
                                 wrist_window=args.wrist_window)
    x_t, x_tH, targets, episode = windows(list(episodes), args.horizon, args.views)
    held_out = episode >= args.episodes - HELD_OUT
    result = {"checkpoint": args.checkpoint, "episodes": args.episodes, "windows": len(episode),
              "held_out_windows": int(held_out.sum()), "render_s": round(time.perf_counter() - start, 1)}

    def probe(x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float]]:
        return {f"fit_{n}_episodes": {str(l2): round(ridge_probe_r2(x[episode < n], y[episode < n], x[held_out],
                                                                     y[held_out], l2), 3) for l2 in args.l2}
                for n in args.fit_episodes}

    for name, model in (("trained", trained), ("untrained", untrained)):
        z = latents(model, x_t, x_tH)
        result[name] = {target: probe(z, y) for target, y in targets.items()}
        result[name]["displacement_given_start"] = probe(torch.cat([z, targets["start_position"]], 1),
                                                         targets["displacement"])
        if args.mlp:
            fit = episode < max(args.fit_episodes)
            result[name]["displacement_mlp"] = mlp_probe_r2(z.float(), targets["displacement"], episode, fit,
                                                            held_out)
    result["criterion"] = criterion(result, max(args.fit_episodes))
    # What the start position alone says about the coming displacement (the expert heads for the objects).
    result["start_position_only"] = {"displacement": probe(targets["start_position"], targets["displacement"])}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
