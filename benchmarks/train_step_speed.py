"""What the Meta-World recipe's training step costs, and what each of its speed-ups buys, measured in one process.

The model is the 50-demo MT10 recipe's (``recipes/metaworld/*`` + the conv-tower ablation): a ComposedBackbone with
the random ResNet tower and a 2-layer Llama, and the flow-matching DiT head, at batch 32 x 2 views of 64 px.
Every comparison is a ratio of two arms timed alternately (best of ``--repeats``), because this machine is shared:

- ``conv_tower``: the tower's forward + backward with NCHW weights and input against channels-last (NHWC), which
  ``ComposedBackbone`` now uses for conv towers;
- ``optimizer``: one full training step (backbone + head forward, backward, AdamW step) with AdamW's default
  per-parameter loop on CPU against ``foreach=True`` and ``fused=True`` (``recipes/pretrain.yaml`` sets fused; at
  these 163 tensors the three measure level on this CPU, so it is kept for GPUs, where fused is the fast path);
- ``head_dropout``: one full training step (foreach AdamW) with the DiT head's dropout at the recipes' 0.1
  against 0.0 (the same weights; dropout draws a Bernoulli mask for every FFN and residual activation, forward and
  backward, and on this CPU that is a large share of a small model's step);
- ``ema_update``: the weight average's per-step update as Lightning's ``EMAWeightAveraging`` does it (three ops
  per tensor in a Python loop) against ``vla_zoo.callbacks.ForeachEMAWeightAveraging``'s ``_foreach_lerp_``, with
  the largest difference between the two averages after the timed updates;
- ``tower_width``: one full training step (foreach AdamW, no head dropout) with the recipe's conv tower at 64
  channels against the same model with a 32-channel tower (``vision_hidden_size: 32``, what
  ``recipes/explore/metaworld/mt10_conv32.yaml`` trains) and with 32 channels in the first stage only (``[32, 64]``), each
  model's forward + backward FLOPs from
  ``torch.utils.flop_counter``: the tower is most of the step's compute, and on a slow CPU its width decides
  whether the MT10 recipe trains in the hour.

The data side (decoded-in-memory sources against streaming the tars) is in ``benchmarks/data_throughput.py``.
Run: ``PYTHONPATH=. python benchmarks/train_step_speed.py`` (prints JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

from components.action_head import FlowMatchingActionHead
from components.backbones import ComposedBackbone
from vla_zoo.machine import describe

INSTRUCTIONS = ["push the puck to the goal", "open the drawer", "reach the goal", "close the window"]


def alternate(arms: dict, repeats: int) -> dict[str, float]:
    """Best wall-clock seconds of each arm over ``repeats`` rounds, the arms run in turn within every round."""
    for fn in arms.values():  # warm-up: allocator, oneDNN kernels, prompt cache
        fn()
    best = {name: float("inf") for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    B, V = args.batch, 2

    def recipe_backbone(tower_width: int | list[int]) -> ComposedBackbone:
        return ComposedBackbone(vision_model_type="resnet", lm_model_type="llama", select_layer=2, project_to=128,
                                image_size=64, scale_factor=2, vision_hidden_size=tower_width, vision_layers=2,
                                lm_hidden_size=128, lm_layers=4, tune_llm=True).train()

    backbone = recipe_backbone(64)
    head = FlowMatchingActionHead(num_embodiments=4, max_state_dim=8, max_action_dim=8, horizon=16, hidden_dim=128,
                                  num_layers=4, num_heads=4, cross_attention_dim=128, embodiment_hidden_dim=128,
                                  dropout=0.1).train()
    images = torch.randint(0, 256, (B, V, 3, 64, 64), dtype=torch.uint8)
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(B)]
    state, actions = torch.randn(B, 8), torch.randn(B, 16, 8)
    action_mask = torch.zeros(B, 16, 8, dtype=torch.bool)
    action_mask[..., :4] = True
    embodiment = torch.zeros(B, dtype=torch.long)

    # The conv tower alone: our channels-last module against an NCHW copy of the same weights.
    nhwc = backbone.vision_model
    nchw = copy.deepcopy(nhwc).to(memory_format=torch.contiguous_format)
    pixels = torch.randn(B * V, 3, 64, 64)
    pixels_nhwc = pixels.contiguous(memory_format=torch.channels_last)
    tower = alternate({
        "nchw": lambda: nchw(pixel_values=pixels).last_hidden_state.sum().backward(),
        "channels_last": lambda: nhwc(pixel_values=pixels_nhwc).last_hidden_state.sum().backward(),
    }, args.repeats)

    # A full training step under each AdamW implementation (same model; the state is per optimiser).
    params = list(backbone.parameters()) + list(head.parameters())
    optimizers = {name: torch.optim.AdamW(params, lr=1e-5, betas=(0.95, 0.999), weight_decay=1e-5, **kw)
                  for name, kw in (("for_loop", {"foreach": False}), ("foreach", {"foreach": True}),
                                   ("fused", {"fused": True}))}

    def step(opt: torch.optim.Optimizer, backbone: ComposedBackbone = backbone) -> None:
        tokens, mask = backbone(images, instructions)
        loss = head.loss(tokens, mask, state, actions, action_mask, embodiment)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    steps = alternate({name: (lambda o=o: step(o)) for name, o in optimizers.items()}, args.repeats)

    # The head's dropout: the same model and optimiser, dropout probability set on every nn.Dropout in turn.
    def set_head_dropout(p: float) -> None:
        for m in head.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = p

    def step_with_dropout(p: float) -> None:
        set_head_dropout(p)
        step(optimizers["foreach"])

    dropout = alternate({"p0.1": lambda: step_with_dropout(0.1), "p0.0": lambda: step_with_dropout(0.0)},
                        args.repeats)

    # The conv tower's width: the recipe's 64 channels against 32 and 32-then-64, the rest of the model shared, head
    # dropout off.
    set_head_dropout(0.0)
    towers = {"64": backbone, "32": recipe_backbone(32), "32-64": recipe_backbone([32, 64])}
    width_opts = {w: torch.optim.AdamW(list(bb.parameters()) + list(head.parameters()), lr=1e-5,
                                       betas=(0.95, 0.999), weight_decay=1e-5, foreach=True)
                  for w, bb in towers.items()}
    width_flops = {}
    for w, bb in towers.items():
        with FlopCounterMode(display=False) as counter:
            tokens, mask = bb(images, instructions)
            head.loss(tokens, mask, state, actions, action_mask, embodiment)["loss"].backward()
        width_flops[w] = counter.get_total_flops()
    width = alternate({w: (lambda w=w: step(width_opts[w], towers[w])) for w in towers}, args.repeats)

    # The EMA callback's update after every step, on the same weights (buffers included, as the callback does).
    model = torch.nn.ModuleList([backbone, head])
    averages = {"per_tensor": AveragedModel(model, avg_fn=get_ema_avg_fn(0.999), use_buffers=True),
                "foreach": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)}

    def ema_update(average: AveragedModel) -> None:
        for _ in range(10):
            average.update_parameters(model)

    ema = alternate({name: (lambda a=a: ema_update(a)) for name, a in averages.items()}, args.repeats)
    ema_gap = max(float((a - b).abs().max()) for a, b in zip(averages["per_tensor"].parameters(),
                                                              averages["foreach"].parameters()))
    print(json.dumps({
        "machine": describe(), "batch": B, "views": V, "image_size": 64, "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in params), "param_tensors": len(params),
        "conv_tower_fwd_bwd_ms": {k: round(v * 1e3, 1) for k, v in tower.items()},
        "conv_tower_speedup_channels_last": round(tower["nchw"] / tower["channels_last"], 2),
        "train_step_ms": {k: round(v * 1e3, 1) for k, v in steps.items()},
        "train_step_speedup_over_for_loop": {k: round(steps["for_loop"] / v, 2) for k, v in steps.items()},
        "train_step_ms_head_dropout": {k: round(v * 1e3, 1) for k, v in dropout.items()},
        "train_step_speedup_without_head_dropout": round(dropout["p0.1"] / dropout["p0.0"], 2),
        "ema_update_ms": {k: round(v * 1e3 / 10, 2) for k, v in ema.items()},
        "ema_update_speedup_foreach": round(ema["per_tensor"] / ema["foreach"], 2),
        "ema_update_share_of_foreach_step": round(ema["per_tensor"] / 10 / steps["foreach"], 3),
        "ema_max_abs_difference": ema_gap,
        "train_step_ms_tower_width": {k: round(v * 1e3, 1) for k, v in width.items()},
        "train_step_gflop_tower_width": {k: round(v / 1e9, 2) for k, v in width_flops.items()},
        "train_step_speedup_tower_width_over_64": {k: round(width["64"] / v, 2) for k, v in width.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
