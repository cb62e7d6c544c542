"""Parameter counts of the GR00T recipes (``recipes/groot/*.yaml``) next to the published totals; prints JSON.

The recipe's backbone and action head are built on the meta device (shapes only: no memory, no weights), so the
N1-size modules count in seconds on a CPU. The backbone is the recipe's random build, whose architecture the
recipe spells out (vision tower, connector, LM cut at ``select_layer``, output projector). ``total_with_uncut_llm``
counts the LM with all its layers, as the VLM was released before GR00T cuts it.

    python benchmarks/groot_params.py                      # both recipes
    python benchmarks/groot_params.py --out benchmarks/results/groot_params.json
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from components.embodiment import EmbodimentLinear

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"n1": REPO / "recipes" / "groot" / "n1.yaml", "n1_5": REPO / "recipes" / "groot" / "n1_5.yaml"}
# REFERENCE.md section 1 (paper) and the released checkpoints' names
PUBLISHED = {
    "n1": {"total": 2.2e9, "backbone": 1.34e9, "action_head": 855e6, "head_embodiment_adapters": 315e6},
    "n1_5": {"total": 3.0e9},
}


def _build(spec: dict[str, Any]) -> nn.Module:
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def _count(*modules: nn.Module | None) -> int:
    seen: set[int] = set()  # tied weights (an LM's embeddings and head) count once
    total = 0
    for module in modules:
        for p in module.parameters() if module is not None else ():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def recipe_counts(path: Path) -> dict[str, int]:
    """Parameters of the recipe's backbone and head, by part."""
    model = yaml.safe_load(path.read_text())["model"]["init_args"]
    with torch.device("meta"):
        backbone, head = _build(model["backbone"]), _build(model["action_head"])
    adapters = [m for m in head.modules() if isinstance(m, EmbodimentLinear)]
    dit = [head.timestep_embedding, head.blocks, head.norm_out, head.proj_out]
    vl = [head.vl_norm, head.vl_blocks]
    parts = backbone.tunable_parts()
    counts = {
        "backbone_vision": _count(*parts["visual"]),
        "backbone_llm": _count(*parts["llm"]),
        "backbone_connector_and_projector": _count(*parts["projector"]),
        "backbone": _count(backbone),
        "head_embodiment_adapters": _count(*adapters),
        "head_dit": _count(*dit),
        "head_vl_self_attention": _count(*vl),
        "head_position_and_future_tokens": _count(head) - _count(*adapters, *dit, *vl),
        "action_head": _count(head),
    }
    counts["total"] = counts["backbone"] + counts["action_head"]
    # the VLM as released before GR00T cuts its LM at select_layer (what a model name may count)
    full = {**model["backbone"], "init_args": {**model["backbone"]["init_args"],
                                               "select_layer": model["backbone"]["init_args"]["lm_layers"]}}
    with torch.device("meta"):
        counts["total_with_uncut_llm"] = _count(_build(full)) + counts["action_head"]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    result = {}
    for name in args.recipes:
        counts = recipe_counts(RECIPES[name])
        published = PUBLISHED[name]
        result[name] = {
            "recipe": str(RECIPES[name].relative_to(REPO)),
            "counts": counts,
            "published": published,
            "ratio_to_published": {k: round(counts[k] / v, 4) for k, v in published.items()},
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
