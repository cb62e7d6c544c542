"""How fast does a latent-action model start to use its latent when things move farther than a patch?

Trains ``components.latent_action.LatentActionModel`` (FSQ 5 x 8, batch 32, AdamW 1e-3) on synthetic frame pairs of
one square moved by up to ``--max-shift`` pixels (``datamodules.synthetic.moving_square_pairs``), and every
``--eval-every`` steps reports, on 512 held-out pairs, the reconstruction gain over copying ``x_t``, the shuffle
ratio (error with latents rolled across the batch / error; 1.0 = the latent is unused) and the held-out ridge probe
R^2 of the move from the pre-quantisation latent. At 32 px with moves of up to 6 px (less than the 8 px patch) both
decoders learn within 600 steps (the slow tests); at 64 px with moves of up to 16 px, as on the embedded world, the
start is the question. Prints one JSON object.

    python benchmarks/lam_moving_squares.py --decoder motion --steps 2000
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from vector_quantize_pytorch import FSQ  # noqa: E402

from components.codebook_metrics import ridge_probe_r2  # noqa: E402
from components.latent_action import LatentActionModel  # noqa: E402
from datamodules.synthetic import moving_square_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder", choices=["transformer", "motion"], default="transformer")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-shift", type=int, default=16, help="largest move in pixels, per axis")
    parser.add_argument("--square", type=int, default=6)
    parser.add_argument("--latent-tokens", type=int, default=16)
    parser.add_argument("--motion-reach", type=int, default=4, help="motion decoder: largest move in 4 px cells")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.manual_seed(args.seed)
    pairs = dict(image_size=args.image_size, square=args.square, max_shift=args.max_shift)
    x0, x1, shift = moving_square_pairs(2048, seed=args.seed, **pairs)
    v0, v1, v_shift = moving_square_pairs(512, seed=args.seed + 100, **pairs)
    model = LatentActionModel(image_size=args.image_size, patch_size=8, width=64, depth=2, heads=4,
                              num_latent_tokens=args.latent_tokens, latent_dim=8, quantizer=FSQ(levels=[5] * 8),
                              decoder=args.decoder, motion_reach=args.motion_reach)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        i = torch.randint(0, len(x0), (32,))
        loss = F.mse_loss(model(x0[i], x1[i])["recon"], x1[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                out = model(v0, v1)
                recon = F.mse_loss(out["recon"], v1)
                shuffled = F.mse_loss(model.decode(v0, out["z_q"].roll(1, 0)), v1)
                probe = ridge_probe_r2(model.encode(x0[:1024], x1[:1024]), shift[:1024], model.encode(v0, v1), v_shift)
            model.train()
            curve.append({"step": step, "recon_gain": round(float(F.mse_loss(v0, v1) / recon), 3),
                          "shuffle_ratio": round(float(shuffled / recon), 3), "probe_r2": round(probe, 3),
                          "seconds": round(time.perf_counter() - start, 1)})
    print(json.dumps({**vars(args), "curve": curve}))


if __name__ == "__main__":
    main()
