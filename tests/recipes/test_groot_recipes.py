"""recipes/groot/*.yaml: GR00T N1 / N1.5 at the published sizes, and weight-compatible with the released heads."""

from __future__ import annotations

import pytest
import yaml

from benchmarks.groot_params import RECIPES, recipe_counts
from vla_zoo.groot import head_kwargs, reference_config


@pytest.fixture(scope="module")
def counts():
    return {name: recipe_counts(path) for name, path in RECIPES.items()}


def test_n1_recipe_has_the_published_parameter_counts(counts):
    n1 = counts["n1"]
    assert n1["action_head"] == pytest.approx(855e6, rel=0.01)
    assert n1["head_embodiment_adapters"] == pytest.approx(315e6, rel=0.01)
    assert n1["backbone"] == pytest.approx(1.34e9, rel=0.01)
    assert n1["total"] == pytest.approx(2.2e9, rel=0.01)


def test_n1_5_recipe_is_n1_plus_its_configuration(counts):
    n1, n1_5 = counts["n1"], counts["n1_5"]
    assert n1["head_vl_self_attention"] == 0 and n1_5["head_vl_self_attention"] > 200e6  # 4 blocks at 2048
    assert n1_5["head_embodiment_adapters"] == n1["head_embodiment_adapters"]
    # the DiT's cross blocks read 2048-wide VL tokens instead of 1536-wide ones: 8 blocks x (K, V) x 512 x 1536 more
    assert n1_5["head_dit"] - n1["head_dit"] == 8 * 2 * 512 * 1536
    assert n1_5["total_with_uncut_llm"] == pytest.approx(3.0e9, rel=0.1)  # "3B": the VLM before its LM is cut


@pytest.mark.parametrize("name, model_type", [("n1", "gr00t_n1"), ("n1_5", "gr00t_n1_5")])
def test_recipe_head_is_the_released_head(name, model_type):
    """The recipe's head converts to a reference config and back unchanged: released weights load into it."""
    head = yaml.safe_load(RECIPES[name].read_text())["model"]["init_args"]["action_head"]["init_args"]
    config = reference_config(head)
    assert config["model_type"] == model_type
    rebuilt = head_kwargs(config)
    assert {k: rebuilt[k] for k in head if k != "gradient_checkpointing"} == {
        k: v for k, v in head.items() if k != "gradient_checkpointing"}


@pytest.mark.parametrize("name, model_type, backbone_cfg", [
    ("n1", "gr00t_n1", {"select_layer": 12, "projector_dim": 2048}),
    ("n1_5", "gr00t_n1_5", {"select_layer": 12, "project_to_dim": None}),  # nvidia/GR00T-N1.5-3B's config.json
])
def test_recipe_backbone_is_the_released_eagle_backbone(name, model_type, backbone_cfg):
    """The recipe's backbone is what `python -m vla_zoo.groot import` builds for the released checkpoint, so the
    imported weights load into it (init_from) and compute what the reference computes."""
    from vla_zoo.groot.backbone import RELEASED_EAGLE, backbone_kwargs

    init_args = yaml.safe_load(RECIPES[name].read_text())["model"]["init_args"]
    head, backbone = init_args["action_head"]["init_args"], init_args["backbone"]["init_args"]
    config = {**reference_config(head), "backbone_cfg": backbone_cfg}
    imported = backbone_kwargs(config, RELEASED_EAGLE[model_type], head_kwargs(config))
    training = ("tune_llm", "tune_visual", "tune_projector")  # how it trains, not what it computes
    assert {k: v for k, v in imported.items() if k not in training and k != "vision_config_overrides"} == {
        k: backbone[k] for k in imported if k not in training and k != "vision_config_overrides"}
    assert {k: v for k, v in imported["vision_config_overrides"].items() if k != "num_channels"} == \
        backbone["vision_config_overrides"]
