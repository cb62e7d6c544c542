"""Whole Isaac-GR00T checkpoints: the Eagle backbone, metadata.json and the head in, a servable policy out, and back.

The synthetic folders (``groot_synthetic.py``) hold transformers' own SigLIP / Llama / Qwen3 modules and the Eagle
connector under the reference's key names, at tiny sizes. Parity is module by module: the reference lays its prompt
out in its own chat template (``<img>`` markers around each image's tokens), ours in the LM's, so whole prompts
differ by design; given the same token sequence, the two compute the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from components.action_head import FlowMatchingActionHead
from components.backbones import ComposedBackbone
from vla_zoo.groot import head_kwargs
from vla_zoo.groot.cli import IMPORT_KEY, main
from vla_zoo.groot.metadata import METADATA

from . import groot_synthetic as synthetic

MODEL_TYPES = ["gr00t_n1", "gr00t_n1_5"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Per model type: the reference modules, the source folder and its imported checkpoint (+ recipe)."""
    root = tmp_path_factory.mktemp("groot")
    out = {}
    for model_type in MODEL_TYPES:
        src = root / model_type
        reference = synthetic.write(src, model_type)
        ckpt, recipe = root / f"{model_type}.ckpt", root / f"{model_type}.yaml"
        assert main(["import", str(src), str(ckpt), "--eagle-config", str(src / "eagle_config.json"),
                     "--recipe", str(recipe)]) == 0
        out[model_type] = (reference, src, ckpt, recipe)
    return out


def _policy_kwargs(ckpt: Path) -> tuple[dict, dict]:
    info = torch.load(ckpt, weights_only=True)[IMPORT_KEY]
    return info["backbone"], info["action_head"]


def _our_backbone(ckpt: Path) -> ComposedBackbone:
    backbone = ComposedBackbone(**_policy_kwargs(ckpt)[0]).eval()
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    return backbone


def eagle_pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Eagle's pixel shuffle written out element by element: output token (r, c) of the (g/s)^2 grid holds, channel
    block (i, j), the patch at row s*r + i, column s*c + j of the raster-ordered g x g patch grid."""
    n, p, d = x.shape
    g = int(p**0.5)
    out = torch.empty(n, (g // scale) ** 2, d * scale * scale)
    for r in range(g // scale):
        for c in range(g // scale):
            for i in range(scale):
                for j in range(scale):
                    block = (i * scale + j) * d
                    out[:, r * (g // scale) + c, block:block + d] = x[:, (scale * r + i) * g + scale * c + j]
    return out


# ------------------------------------------------------------------------------------------- module-level parity
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mapped_backbone_modules_compute_what_the_reference_modules_compute(imported, model_type):
    reference, _, ckpt, _ = imported[model_type]
    ours = _our_backbone(ckpt)
    scale = 2 if model_type == "gr00t_n1" else 1
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 16, 16, generator=g)
    with torch.no_grad():
        patches = reference.vision(pixel_values=pixels).last_hidden_state  # [3, 16, 16]: post-normed last layer
        torch.testing.assert_close(ours.vision_model(pixel_values=pixels).last_hidden_state, patches, rtol=0, atol=0)
        expected_images = reference.mlp1(eagle_pixel_shuffle(patches, scale))  # Eagle's extract_feature
        torch.testing.assert_close(ours.connector(patches), expected_images, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours._embed_images(pixels), expected_images, rtol=1e-6, atol=1e-6)

        embeds = torch.randn(2, 7, ours.language_model.config.hidden_size, generator=g)
        mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
        # what the reference reads: hidden_states[select_layer] of the truncated LM (its last, normed state)
        hidden = reference.lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states
        expected = hidden[synthetic.SELECT_LAYER]
        got = ours.language_model(inputs_embeds=embeds, attention_mask=mask.bool()).last_hidden_state
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.projector(expected), reference.linear(expected), rtol=1e-6, atol=1e-6)

        # the whole backbone on our prompt = the reference's modules on the same token sequence
        images = torch.randint(0, 256, (2, 2, 3, 16, 16), dtype=torch.uint8, generator=g)
        instructions = ["pick up the red block", "open the drawer"]
        tokens, token_mask = ours(images, instructions)
        ids, is_image, prompt_mask = ours._tokenize(instructions, 2, "cpu")
        prompt = reference.lm.get_input_embeddings()(ids)
        image_embeds = reference.mlp1(eagle_pixel_shuffle(
            reference.vision(pixel_values=ours._pixels(images.flatten(0, 1))).last_hidden_state, scale))
        prompt = prompt.masked_scatter(is_image[..., None], image_embeds)
        states = reference.lm(inputs_embeds=prompt, attention_mask=prompt_mask.long(), output_hidden_states=True)
        expected_tokens = reference.linear(states.hidden_states[synthetic.SELECT_LAYER])
    assert torch.equal(token_mask, prompt_mask)
    torch.testing.assert_close(tokens[token_mask], expected_tokens[token_mask], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- policy and serving
def _observation(rng: np.random.Generator, state: np.ndarray) -> dict:
    return {"embodiment": "new_embodiment", "instruction": "put the cube in the bowl", "state": state,
            "images": {v: rng.integers(0, 256, (16, 20, 3), dtype=np.uint8) for v in ("front", "wrist")}}


def test_policy_from_an_imported_checkpoint_acts_in_robot_units(imported):
    """Actions come back in metadata.json's units: the state is normalised and the head's output un-normalised with
    GR00T's min-max formula over each key's statistics, concatenated in the metadata's key order."""
    from vla_zoo.policy import Policy

    _, src, ckpt, _ = imported["gr00t_n1_5"]
    policy = Policy.from_checkpoint(ckpt)
    meta = policy.metadata()
    assert meta["horizon"] == 4 and sorted(meta["embodiments"]) == ["gr1", "new_embodiment"]
    assert meta["embodiments"]["new_embodiment"] == {"state_dim": 4, "action_dim": 4, "image_keys": ["front", "wrist"],
                                                     "image_size": [16, 20]}
    stats = json.loads((src / METADATA).read_text())["new_embodiment"]["statistics"]

    def concat(kind: str, field: str) -> np.ndarray:
        return np.concatenate([stats[kind][key][field] for key in ("single_arm", "gripper")])

    rng = np.random.default_rng(0)
    state = rng.uniform(concat("state", "min"), concat("state", "max")).astype(np.float32)
    observation = _observation(rng, state)
    actions = policy.get_action(observation)["actions"]
    assert actions.shape == (4, 4) and actions.dtype == np.float32

    lo, hi = concat("state", "min"), concat("state", "max")
    padded = torch.zeros(1, 6)
    padded[0, :4] = torch.as_tensor(np.clip(2 * (state - lo) / (hi - lo) - 1, -1, 1))  # GR00T's min_max
    with torch.no_grad():
        tokens, mask = policy.encode_observation(policy.observation_images(observation), [observation["instruction"]])
        y = policy.module.action_head.sample(tokens, mask, padded, torch.tensor([31]),
                                             generator=torch.Generator().manual_seed(0))[0, :, :4].clamp(-1, 1).numpy()
    lo, hi = concat("action", "min"), concat("action", "max")
    np.testing.assert_allclose(actions, (y + 1) / 2 * (hi - lo) + lo, rtol=1e-5, atol=1e-5)
    assert (actions >= lo - 1e-5).all() and (actions <= hi + 1e-5).all()


def test_the_policy_server_loads_an_imported_checkpoint(imported):
    from vla_zoo.deploy.loading import policy_from_args
    from vla_zoo.deploy.server import PolicyServer

    ckpt = imported["gr00t_n1"][2]
    args = argparse.Namespace(checkpoint=str(ckpt), replay=None, policy=None, policy_kwargs='{"system2_period": 2}')
    server = PolicyServer(policy_from_args(args))  # what `python -m vla_zoo.deploy.server --checkpoint` builds
    assert server._metadata["embodiments"]["gr1"]["image_keys"] == ["front", "wrist"]
    actions = server.policy.get_action(_observation(np.random.default_rng(1), np.zeros(4, np.float32)))["actions"]
    assert actions.shape == (4, 4) and np.isfinite(actions).all()


def test_init_from_an_imported_checkpoint_starts_a_lora_fit_and_exports_merged(imported, tmp_path):
    """The recipe ``--recipe`` writes rebuilds the model; ``init_from`` restores backbone and head into a policy whose
    LM and DiT carry LoRA adapters (identity at the start); the fit's checkpoint exports with the adapters merged."""
    from components.lora import LoRA
    from lit_modules.vla_policy import VLAPolicy

    _, _, ckpt, recipe = imported["gr00t_n1_5"]
    init_args = yaml.safe_load(recipe.read_text())["model"]["init_args"]
    assert init_args["init_from"] == str(ckpt)
    backbone_kw, head_kw = init_args["backbone"]["init_args"], init_args["action_head"]["init_args"]
    policy = VLAPolicy(ComposedBackbone(**backbone_kw, llm_lora=LoRA(rank=2)),
                       FlowMatchingActionHead(**head_kw, tune_diffusion_model=False, lora=LoRA(rank=2)),
                       init_from=str(ckpt))
    policy._load_initial_weights(str(ckpt))
    plain = _our_backbone(ckpt)
    images = torch.randint(0, 256, (1, 2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(policy.backbone.eval()(images, ["stack the blocks"])[0],
                                   plain(images, ["stack the blocks"])[0], rtol=0, atol=0)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert any("language_model" in n and ".lora_" in n for n in trainable)
    assert not any("language_model" in n and ".lora_" not in n for n in trainable)  # the LM itself stays frozen

    # After "training" (adapters moved) on a vla-zoo dataset of its own name in slot 31, export merges the adapters
    # and writes GR00T's layout: the new_embodiment tag, per-key statistics from our Modality's groups.
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_B" in name:
                p.normal_(0, 0.1)
    spec = torch.load(ckpt, weights_only=True)["vla_zoo_data_spec"]
    mine = dict(spec["embodiments"]["new_embodiment"])
    mine["modality"] = {k: v for k, v in mine["modality"].items() if k != "groot"}  # as datamodules.lerobot writes it
    spec["embodiments"] = {"so100": mine}
    recipe_text = yaml.safe_dump({"model": {"class_path": "lit_modules.vla_policy.VLAPolicy", "init_args": {
        "init_from": str(ckpt),
        "backbone": {"class_path": "components.backbones.ComposedBackbone",
                     "init_args": {**backbone_kw, "llm_lora": {"rank": 2, "alpha": 32.0, "dropout": 0.05}}},
        "action_head": {"class_path": "components.action_head.FlowMatchingActionHead", "init_args": {
            **head_kw, "tune_diffusion_model": False, "lora": {"rank": 2, "alpha": 32.0, "dropout": 0.05}}}}}})
    torch.save({"state_dict": policy.state_dict(), "vla_zoo_config": recipe_text, "vla_zoo_data_spec": spec},
               tmp_path / "fit.ckpt")
    assert main(["export", str(tmp_path / "fit.ckpt"), str(tmp_path / "out")]) == 0
    metadata = json.loads((tmp_path / "out" / METADATA).read_text())
    assert list(metadata) == ["new_embodiment"] and list(metadata["new_embodiment"]["statistics"]["action"]) == [
        "single_arm", "gripper"]
    # what the fit does not hold (SigLIP's pooling head, the LM head) and config.json's other settings come from the
    # imported checkpoint it started from
    source = ckpt.parent / "gr00t_n1_5"
    assert sorted(load_file(str(tmp_path / "out" / "model.safetensors"))) == sorted(_reference_tensors(source))
    exported, original = (json.loads((folder / "config.json").read_text()) for folder in (tmp_path / "out", source))
    assert head_kwargs(exported) == head_kwargs(original) and exported["backbone_cfg"] == original["backbone_cfg"]
    assert {k: v for k, v in exported.items() if k != "action_head_cfg"} == {
        k: v for k, v in original.items() if k != "action_head_cfg"}
    (tmp_path / "out" / "eagle_config.json").write_text((ckpt.parent / "gr00t_n1_5" / "eagle_config.json").read_text())
    assert main(["import", str(tmp_path / "out"), str(tmp_path / "again.ckpt"), "--eagle-config",
                 str(tmp_path / "out" / "eagle_config.json")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(_our_backbone(tmp_path / "again.ckpt")(images, ["stack the blocks"])[0],
                                   policy.backbone.eval()(images, ["stack the blocks"])[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ export round trip
def _reference_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_import_then_export_gives_tensors_config_and_metadata_back_bit_identically(imported, tmp_path, model_type):
    _, src, ckpt, _ = imported[model_type]
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    original, exported = _reference_tensors(src), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():  # same dtype (bf16) and the same bits
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key].view(torch.int16),
                                                                    tensor.view(torch.int16)), key
    for name in ("config.json", METADATA):
        assert json.loads((tmp_path / "out" / name).read_text()) == json.loads((src / name).read_text()), name


def test_tied_embeddings_saved_under_the_lm_head_name_round_trip(tmp_path):
    src = tmp_path / "src"
    synthetic.write(src, "gr00t_n1_5", shards=1, dtype=torch.float32, tied_under_lm_head=True)
    assert main(["import", str(src), str(tmp_path / "a.ckpt"), "--eagle-config", str(src / "eagle_config.json"),
                 "--embodiment", "new_embodiment"]) == 0
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]
    lm_head = load_file(str(src / "model-00001-of-00001.safetensors"))[
        "backbone.eagle_model.language_model.lm_head.weight"]
    assert torch.equal(state["backbone.language_model.embed_tokens.weight"], lm_head)
    assert main(["export", str(tmp_path / "a.ckpt"), str(tmp_path / "out")]) == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(_reference_tensors(src))
    assert list(json.loads((tmp_path / "out" / METADATA).read_text())) == ["new_embodiment"]


# ------------------------------------------------------------------------------------------------ modality.json
def test_modality_json_orders_the_flat_state_and_actions(imported, tmp_path):
    _, src, _, _ = imported["gr00t_n1_5"]
    modality = {"state": {"gripper": {"start": 3, "end": 4}, "single_arm": {"start": 0, "end": 3}},
                "action": {"gripper": {"start": 3, "end": 4}, "single_arm": {"start": 0, "end": 3}},
                "video": {"front": {"original_key": "observation.images.front"},
                          "wrist": {"original_key": "observation.images.wrist"}}}
    (tmp_path / "modality.json").write_text(json.dumps(modality))
    assert main(["import", str(src), str(tmp_path / "m.ckpt"), "--eagle-config", str(src / "eagle_config.json"),
                 "--embodiment", "gr1", "--modality", str(tmp_path / "modality.json")]) == 0
    spec = torch.load(tmp_path / "m.ckpt", weights_only=True)["vla_zoo_data_spec"]["embodiments"]["gr1"]
    assert spec["id"] == 24 and spec["modality"]["state_groups"] == {"gripper": [0, 1], "single_arm": [1, 4]}
    assert spec["modality"]["state_names"] == ["gripper", "single_arm_0", "single_arm_1", "single_arm_2"]
    stats = json.loads((src / METADATA).read_text())["gr1"]["statistics"]["action"]
    assert spec["normalizer"]["stats"]["actions"]["max"] == stats["gripper"]["max"] + stats["single_arm"]["max"]

    modality["state"]["gripper"] = {"start": 3, "end": 5}
    (tmp_path / "modality.json").write_text(json.dumps(modality))
    assert main(["import", str(src), str(tmp_path / "n.ckpt"), "--eagle-config", str(src / "eagle_config.json"),
                 "--embodiment", "gr1", "--modality", str(tmp_path / "modality.json")]) == 1
    assert not (tmp_path / "n.ckpt").exists()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_whole_checkpoints_exit_1_naming_file_and_key_and_write_nothing(imported, tmp_path, capsys):
    import shutil

    _, good, _, _ = imported["gr00t_n1_5"]
    src = tmp_path / "src"
    shutil.copytree(good, src)
    out, recipe = tmp_path / "out" / "x.ckpt", tmp_path / "out" / "x.yaml"
    out.parent.mkdir()
    eagle = ["--eagle-config", str(src / "eagle_config.json")]
    shard = src / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    vision_key = next(k for k in tensors if k.startswith("backbone.eagle_model.vision_model.vision_model.encoder"))
    metadata = json.loads((src / METADATA).read_text())

    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    def rewrite(shard_tensors: dict) -> None:  # the shard and the index's weight_map, consistently
        save_file(shard_tensors, str(shard))
        weight_map = {k: v for k, v in index["weight_map"].items() if v != shard.name}
        index_path.write_text(json.dumps({**index, "weight_map": {**weight_map, **dict.fromkeys(shard_tensors, shard.name)}}))

    def run(*extra: str) -> str:
        assert main(["import", str(src), str(out), *eagle, "--recipe", str(recipe), *extra]) == 1
        assert list(out.parent.iterdir()) == []  # nothing written, no partial file
        return capsys.readouterr().err

    # not a GR00T folder
    assert main(["import", str(tmp_path / "out"), str(out)]) == 1
    assert "is not an Isaac-GR00T checkpoint: config.json is missing" in capsys.readouterr().err
    # a backbone tensor missing, one too many, one of the wrong shape
    rewrite({k: v for k, v in tensors.items() if k != vision_key})
    assert f"key '{vision_key}' is missing" in run()
    rewrite({**tensors, "backbone.eagle_model.extra.weight": torch.zeros(2)})
    assert f"{shard}: key 'backbone.eagle_model.extra.weight' is not part of the backbone" in run()
    rewrite({**tensors, vision_key: torch.zeros(3, 3)})
    assert f"{shard}: key '{vision_key}' has shape [3, 3]" in run()
    # the released Eagle architecture is not the one of these weights
    rewrite(tensors)
    eagle = []
    err = run()
    assert "the released gr00t_n1_5 Eagle config" in err and "--eagle-config" in err
    eagle = ["--eagle-config", str(src / "eagle_config.json")]
    # an unknown embodiment tag in metadata.json
    (src / METADATA).write_text(json.dumps({**metadata, "unitree_g1": metadata["gr1"]}))
    err = run()
    assert f"{src / METADATA}: key 'unitree_g1': unknown embodiment tag 'unitree_g1'" in err and "TAG=SLOT" in err
    assert main(["import", str(src), str(out), *eagle, "--embodiment", "unitree_g1=30"]) == 0  # its slot given
    out.unlink()
    # statistics that do not fit the layout
    metadata["gr1"]["statistics"]["state"]["gripper"]["max"] = [1.0, 2.0]
    (src / METADATA).write_text(json.dumps(metadata))
    assert "key 'gr1'.statistics.state.gripper: the statistics have different lengths" in run()
    # a missing shard
    shard.unlink()
    assert "shard 'model-00002-of-00002.safetensors'" in run()
