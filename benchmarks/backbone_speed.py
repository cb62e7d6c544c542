"""Forward+backward time of the default (random, small) backbones at the CPU pretrain batch: 32 x 2 views of 64x64.

Prints JSON. The machine is shared, so each timing comes with the time of a 1024^3 fp32 matmul measured in the
same process right before it; ``ratio_to_matmul`` is the machine-independent number to compare across runs.
Run: ``PYTHONPATH=. python benchmarks/backbone_speed.py``
"""

from __future__ import annotations

import json
import time

import torch

from components.backbones import ComposedBackbone, SmolVLMBackbone

INSTRUCTIONS = [
    "pick up the red block and place it in the green bowl",
    "push the blue button",
    "open the top drawer",
    "move the yellow cube to the left of the plate",
]


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(batch: int = 32, views: int = 2, size: int = 64, repeats: int = 10) -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, views, 3, size, size), dtype=torch.uint8)
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)]
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    results = {"batch": batch, "views": views, "image_size": size, "threads": torch.get_num_threads(), "runs": []}
    for cls in (SmolVLMBackbone, ComposedBackbone):
        for flags in ({}, {"tune_llm": True}, {"tune_visual": False}):
            backbone = cls(**flags).train()

            def step():
                tokens, mask = backbone(images, instructions)
                tokens[mask].square().mean().backward()

            step()  # warm-up: prompt cache, allocator
            matmul = _best_of(lambda: a @ b, 5)
            seconds = _best_of(step, repeats)
            with torch.no_grad():
                forward = _best_of(lambda: backbone(images, instructions), repeats)
            results["runs"].append(
                {
                    "backbone": cls.__name__,
                    "flags": backbone.tune,
                    "tokens": int(backbone(images, instructions)[1].shape[1]),
                    "params": sum(p.numel() for p in backbone.parameters()),
                    "fwd_bwd_ms": round(seconds * 1e3, 1),
                    "fwd_no_grad_ms": round(forward * 1e3, 1),
                    "matmul_1024_ms": round(matmul * 1e3, 2),
                    "ratio_to_matmul": round(seconds / matmul, 1),
                }
            )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
