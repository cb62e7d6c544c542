"""Forward+backward time of the default (random, small) backbones at the CPU pretrain batch: 32 x 2 views of 64x64.

Prints JSON. The machine is shared, so every timing is the best of several runs, taken next to a 1024^3 fp32 matmul
timed the same way in the same process (``ratio_to_matmul`` is the number to compare across machines and runs), and
once more on one thread with CPU time, which other processes barely disturb.
Run: ``PYTHONPATH=. python benchmarks/backbone_speed.py``
"""

from __future__ import annotations

import json
import time

import torch

from components.backbones import ComposedBackbone, SmolVLMBackbone
from vla_zoo.machine import describe

INSTRUCTIONS = [
    "pick up the red block and place it in the green bowl",
    "push the blue button",
    "open the top drawer",
    "move the yellow cube to the left of the plate",
]


def _best(fn, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def main(batch: int = 32, views: int = 2, size: int = 64, repeats: int = 8) -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, views, 3, size, size), dtype=torch.uint8)
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)]
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    threads = torch.get_num_threads()
    runs = []
    for cls in (SmolVLMBackbone, ComposedBackbone):
        for flags in ({}, {"tune_llm": True}, {"tune_visual": False}):
            backbone = cls(**flags).train()

            def step():
                tokens, mask = backbone(images, instructions)
                tokens[mask].square().mean().backward()

            def forward():
                with torch.no_grad():
                    backbone(images, instructions)

            step()  # warm-up: prompt cache, allocator
            row = {
                "backbone": cls.__name__,
                "tune": backbone.tune,
                "tokens": int(backbone(images, instructions)[1].shape[1]),
                "params": sum(p.numel() for p in backbone.parameters()),
            }
            for n in (threads, 1):
                torch.set_num_threads(n)
                clock = time.perf_counter if n == threads else time.thread_time
                matmul = _best(lambda: a @ b, 5, clock)
                seconds = _best(step, repeats, clock)
                key = f"{n}_threads_{'wall' if n == threads else 'cpu'}"
                row[key] = {
                    "fwd_bwd_ms": round(seconds * 1e3, 1),
                    "fwd_no_grad_ms": round(_best(forward, repeats, clock) * 1e3, 1),
                    "matmul_1024_ms": round(matmul * 1e3, 2),
                    "ratio_to_matmul": round(seconds / matmul, 1),
                }
            torch.set_num_threads(threads)
            runs.append(row)
    print(json.dumps({"machine": describe(), "batch": batch, "views": views, "image_size": size, "threads": threads, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
