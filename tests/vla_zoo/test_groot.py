"""Isaac-GR00T checkpoints: the imported head reproduces the reference's own outputs; bad folders fail clearly.

The parity fixtures (``shared/fixtures/groot/*``: config.json, model.safetensors, io.safetensors) were produced by
running the reference implementation; their README describes every tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from components.action_head import FlowMatchingActionHead
from vla_zoo.groot import (
    GrootCheckpointError,
    head_kwargs,
    head_state_from_reference,
    head_state_to_reference,
    load_groot_action_head,
    read_config,
    read_tensors,
    reference_config,
    save_groot_action_head,
)
from vla_zoo.groot.cli import IMPORT_KEY, main
from vla_zoo.groot.head import head_links

REPO = Path(__file__).resolve().parents[2]


def _fixture_root() -> Path | None:
    """``shared/fixtures/groot`` beside the checkout; for a git worktree, beside the main checkout too."""
    candidates = [Path(os.environ["VLA_ZOO_GROOT_FIXTURES"])] if "VLA_ZOO_GROOT_FIXTURES" in os.environ else []
    candidates += [REPO / "shared" / "fixtures" / "groot", REPO.parent / "shared" / "fixtures" / "groot"]
    git = REPO / ".git"
    if git.is_file():  # a worktree: ".git" holds "gitdir: <main>/.git/worktrees/<name>"
        gitdir = Path(git.read_text().split("gitdir:", 1)[-1].strip())
        main = gitdir.parents[2] if gitdir.parent.name == "worktrees" else None
        if main is not None:
            candidates.append(main.parent / "shared" / "fixtures" / "groot")
    return next((c for c in candidates if c.is_dir()), None)


FIXTURES = _fixture_root()
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "io.safetensors").is_file()) if FIXTURES else []
needs_fixtures = pytest.mark.skipif(FIXTURES is None, reason="parity fixtures not found: expected ../shared/fixtures/groot "
                                    "beside the repository (or VLA_ZOO_GROOT_FIXTURES)")


pytestmark = pytest.mark.usefixtures("one_thread")


def fixture_io(name: str) -> dict[str, torch.Tensor]:
    io = load_file(str(FIXTURES / name / "io.safetensors"))
    io["state"] = io["state"][:, 0]  # [B, 1, S] -> [B, S]
    io["backbone_attention_mask"] = io["backbone_attention_mask"].bool()
    io["action_mask"] = io["action_mask"].bool()
    return io


def velocity(head: FlowMatchingActionHead, io: dict[str, torch.Tensor]) -> torch.Tensor:
    t = io["t"][:, None, None]
    x_t = (1 - t) * io["noise"] + t * io["action"]
    return head(x_t, io["t"], io["backbone_features"], io["backbone_attention_mask"], io["state"], io["embodiment_id"])


# ----------------------------------------------------------------------------------------------------- parity
def test_fixtures_are_found():
    if FIXTURES is None:
        pytest.skip("parity fixtures not found (../shared/fixtures/groot)")
    assert {"n1_head_tiny", "n1_5_head_tiny"} <= set(FIXTURE_NAMES)


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_imported_head_reproduces_the_reference(name):
    head = load_groot_action_head(FIXTURES / name)
    assert isinstance(head, FlowMatchingActionHead) and not head.training
    io = fixture_io(name)
    torch.testing.assert_close(velocity(head, io), io["expected_velocity"], rtol=0, atol=1e-5)
    loss = head.loss(io["backbone_features"], io["backbone_attention_mask"], io["state"], io["action"],
                     io["action_mask"], io["embodiment_id"], noise=io["noise"], t=io["t"])["loss"]
    torch.testing.assert_close(loss, io["expected_loss"][0], rtol=0, atol=1e-5)
    sample = head.sample(io["backbone_features"], io["backbone_attention_mask"], io["state"], io["embodiment_id"],
                         initial_noise=io["initial_noise"])
    torch.testing.assert_close(sample, io["expected_action_pred"], rtol=0, atol=1e-5)


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_each_reference_convention_is_needed(name):
    """Each numerical option the import sets changes the output: with our default instead, parity is lost."""
    config = read_config(FIXTURES / name)
    theirs, _ = read_tensors(FIXTURES / name, "action_head.")
    io = fixture_io(name)

    def error(**change) -> float:
        head = FlowMatchingActionHead(**{**head_kwargs(config), **change})
        head.load_state_dict(head_state_from_reference(head, theirs))
        return (velocity(head.eval(), io) - io["expected_velocity"]).abs().max().item()

    exact = error()
    assert exact < 1e-6
    assert error(time_code_layout="cos_sin") > 1e-2
    assert error(time_frequency_shift=0.0) > 1e-4
    assert error(output_norm_eps=1e-5) > 4 * exact  # a small effect, still far above fp32 noise


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_export_writes_the_reference_tensors_back_bit_identically(name, tmp_path):
    head = load_groot_action_head(FIXTURES / name)
    original = load_file(str(FIXTURES / name / "model.safetensors"))
    exported = {"action_head." + k: v for k, v in head_state_to_reference(head).items()}
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    # ... and as a folder: the written config describes the same head
    kwargs = head_kwargs(read_config(FIXTURES / name))
    save_groot_action_head(head, kwargs, tmp_path / "out")
    assert head_kwargs(read_config(tmp_path / "out")) == kwargs
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(written[k], original[k]) for k in original)


@needs_fixtures
def test_imported_n1_5_head_still_honours_the_vl_mask():
    """The reference ignores the VL mask; ours does not, in the VL self-attention as in the DiT's cross blocks."""
    name = "n1_5_head_tiny"
    head = load_groot_action_head(FIXTURES / name)
    io = fixture_io(name)
    mask = io["backbone_attention_mask"].clone()
    mask[:, 7:] = False
    vl = io["backbone_features"]
    args = (io["state"], io["embodiment_id"])
    out = head.sample(vl, mask, *args, initial_noise=io["initial_noise"])
    scrambled = torch.where(mask[..., None], vl, 100 * torch.randn_like(vl))
    torch.testing.assert_close(head.sample(scrambled, mask, *args, initial_noise=io["initial_noise"]), out,
                               rtol=0, atol=1e-5)
    full = head.sample(scrambled, io["backbone_attention_mask"], *args, initial_noise=io["initial_noise"])
    assert (full - out).abs().max() > 5e-4  # the padded tokens would matter if attended (100x the tolerance above)


# ------------------------------------------------------------------------------------- synthetic checkpoints
def tiny_config(model_type: str = "gr00t_n1_5") -> dict:
    dit = {"num_attention_heads": 2, "attention_head_dim": 8, "output_dim": 12, "num_layers": 2, "dropout": 0.2,
           "final_dropout": True, "interleave_self_attention": True, "norm_type": "ada_norm",
           "positional_embeddings": None}
    head_cfg = {"diffusion_model_cfg": dit, "input_embedding_dim": 16, "hidden_size": 12, "max_seq_len": 8,
                "action_dim": 3, "action_horizon": 4, "num_inference_timesteps": 4, "max_num_embodiments": 3,
                "max_state_dim": 5}
    if model_type == "gr00t_n1_5":
        dit["cross_attention_dim"] = 10
        head_cfg.update(backbone_embedding_dim=10, use_vlln=True, num_target_vision_tokens=2, vl_self_attention_cfg={
            "num_attention_heads": 2, "attention_head_dim": 5, "output_dim": 10, "num_layers": 1, "dropout": 0.2,
            "final_dropout": True, "positional_embeddings": None})
    return {"model_type": model_type, "action_head_cfg": head_cfg, "action_horizon": 4, "action_dim": 3}


def write_synthetic(folder: Path, model_type: str = "gr00t_n1_5", shards: int = 1) -> FlowMatchingActionHead:
    """A reference-layout checkpoint of a random head (one file, or ``shards`` shards with an index)."""
    torch.manual_seed(0)
    kwargs = head_kwargs(tiny_config(model_type))
    head = FlowMatchingActionHead(**kwargs).eval()
    save_groot_action_head(head, kwargs, folder)
    if shards > 1:
        tensors = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        keys = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in keys[i::shards]}
            save_file(part, str(folder / name))
            weight_map.update(dict.fromkeys(part, name))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return head


@pytest.mark.parametrize("model_type", ["gr00t_n1", "gr00t_n1_5"])
def test_links_cover_every_parameter_once(model_type):
    head = FlowMatchingActionHead(**head_kwargs(tiny_config(model_type)))
    ours = [k for link in head_links(head) for k in link.ours]
    assert sorted(ours) == sorted(head.state_dict())
    assert reference_config(head_kwargs(tiny_config(model_type)))["model_type"] == model_type


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    head = write_synthetic(tmp_path / "one")
    write_synthetic(tmp_path / "sharded", shards=3)
    loaded = {name: load_groot_action_head(tmp_path / name) for name in ("one", "sharded")}
    g = torch.Generator().manual_seed(0)
    vl, mask = torch.randn(2, 5, 10, generator=g), torch.ones(2, 5, dtype=torch.bool)
    state, ids, noise = torch.randn(2, 5, generator=g), torch.tensor([0, 2]), torch.randn(2, 4, 3, generator=g)
    outs = [h.sample(vl, mask, state, ids, initial_noise=noise) for h in (head, *loaded.values())]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


# ------------------------------------------------------------------------------------------------ bad input
def test_not_a_checkpoint_folder_names_what_is_missing(tmp_path):
    with pytest.raises(GrootCheckpointError, match="not a folder"):
        load_groot_action_head(tmp_path / "nowhere")
    with pytest.raises(GrootCheckpointError, match="config.json is missing"):
        load_groot_action_head(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(GrootCheckpointError, match=r"config\.json: key 'model_type' is 'llama'"):
        load_groot_action_head(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GrootCheckpointError, match=r"config\.json: cannot read it as JSON"):
        load_groot_action_head(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(GrootCheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_groot_action_head(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(GrootCheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_groot_action_head(tmp_path)


def test_missing_shard_is_named(tmp_path):
    write_synthetic(tmp_path, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(GrootCheckpointError, match=r"index\.json: shard 'model-00002-of-00002\.safetensors' "
                                                   r"\(holding key 'action_head\.[^']+'\) is missing"):
        load_groot_action_head(tmp_path)


def test_key_and_shape_mismatches_name_file_and_key(tmp_path):
    write_synthetic(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    key = "action_head.model.transformer_blocks.1.attn1.to_q.weight"

    save_file({k: v for k, v in tensors.items() if k != key}, str(path))
    with pytest.raises(GrootCheckpointError, match=f"key '{key}' is missing"):
        load_groot_action_head(tmp_path)

    save_file({**tensors, "action_head.extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(GrootCheckpointError, match=r"model\.safetensors: key 'action_head\.extra\.weight' is not part"):
        load_groot_action_head(tmp_path)

    save_file({**tensors, key: torch.zeros(16, 17)}, str(path))
    with pytest.raises(GrootCheckpointError, match=rf"model\.safetensors: key '{key}' has shape \[16, 17\] but "
                                                   r"config\.json's action_head_cfg gives \[16, 16\]"):
        load_groot_action_head(tmp_path)

    config = tiny_config()
    config["action_head_cfg"]["diffusion_model_cfg"]["positional_embeddings"] = "sinusoidal"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GrootCheckpointError, match=r"diffusion_model_cfg: key 'positional_embeddings' is 'sinusoidal'"):
        load_groot_action_head(tmp_path)


def test_export_refuses_a_head_with_the_zoos_own_numerics(tmp_path):
    kwargs = dict(head_kwargs(tiny_config("gr00t_n1")), time_code_layout="cos_sin")
    with pytest.raises(GrootCheckpointError, match="time_code_layout='cos_sin'"):
        save_groot_action_head(FlowMatchingActionHead(**kwargs), kwargs, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


# ------------------------------------------------------------------------------------- the command line
def test_import_then_export_gives_the_checkpoint_back_bit_identically(tmp_path):
    write_synthetic(tmp_path / "src", shards=2)
    original = {}
    for shard in (tmp_path / "src").glob("*.safetensors"):
        original.update(load_file(str(shard)))
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "head.ckpt"), "--embodiment", "my_arm=1",
                 "--embodiment", "other_arm=2"]) == 0
    imported = torch.load(tmp_path / "head.ckpt", weights_only=True)  # tensors and plain data only
    info = imported[IMPORT_KEY]
    assert info["embodiments"] == {"my_arm": 1, "other_arm": 2}
    head = FlowMatchingActionHead(**info["action_head"])  # what init_from loads into (parts: [action_head])
    head.load_state_dict({k.removeprefix("action_head."): v for k, v in imported["state_dict"].items()})
    assert main(["export", str(tmp_path / "head.ckpt"), str(tmp_path / "out")]) == 0
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    assert head_kwargs(read_config(tmp_path / "out")) == info["action_head"]


def test_export_merges_lora_adapters_into_the_reference_weights(tmp_path):
    from components.lora import LoRA

    kwargs = head_kwargs(tiny_config())
    torch.manual_seed(0)
    head = FlowMatchingActionHead(**kwargs, tune_diffusion_model=False, lora=LoRA(rank=2, dropout=0.0)).eval()
    with torch.no_grad():
        for name, p in head.named_parameters():
            if ".lora_B" in name:
                p.normal_()
    info = {"action_head": {**kwargs, "tune_diffusion_model": False, "lora": {"rank": 2, "alpha": 32.0, "dropout": 0.0}}}
    torch.save({"state_dict": {"action_head." + k: v for k, v in head.state_dict().items()}, IMPORT_KEY: info},
               tmp_path / "lora.ckpt")
    assert main(["export", str(tmp_path / "lora.ckpt"), str(tmp_path / "out")]) == 0
    merged = load_groot_action_head(tmp_path / "out")
    g = torch.Generator().manual_seed(0)
    vl, mask = torch.randn(2, 5, 10, generator=g), torch.ones(2, 5, dtype=torch.bool)
    state, ids, x, t = torch.randn(2, 5, generator=g), torch.tensor([0, 2]), torch.randn(2, 4, 3, generator=g), torch.rand(2)
    torch.testing.assert_close(merged(x, t, vl, mask, state, ids), head(x, t, vl, mask, state, ids), rtol=1e-5, atol=1e-5)


def test_command_line_bad_input_exits_non_zero_and_writes_nothing(tmp_path, capsys):
    write_synthetic(tmp_path / "src", shards=2)
    out = tmp_path / "head.ckpt"
    cases = [
        (["import", str(tmp_path / "missing"), str(out)], "not a folder"),
        (["import", str(tmp_path / "src"), str(out), "--embodiment", "unitree_g1"], "unknown embodiment tag 'unitree_g1'"),
        (["import", str(tmp_path / "src"), str(out), "--embodiment", "new_embodiment"], "is slot 31, but this head has 3"),
        (["import", str(tmp_path / "src"), str(tmp_path / "nowhere" / "head.ckpt")], "does not exist"),
        (["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")], "no such checkpoint file"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        assert message in capsys.readouterr().err
    (tmp_path / "src" / "model-00001-of-00002.safetensors").unlink()
    assert main(["import", str(tmp_path / "src"), str(out)]) == 1
    assert "shard 'model-00001-of-00002.safetensors'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written, no partial file


def test_embodiment_tags_map_to_the_released_slots():
    from vla_zoo.groot.tags import embodiment_slot

    assert [embodiment_slot(t) for t in ("new_embodiment", "gr1", "oxe_droid", "agibot_genie1")] == [31, 24, 17, 26]
    assert embodiment_slot("my_robot=5") == 5
    with pytest.raises(GrootCheckpointError, match=r"slot must be an integer in \[0, 32\)"):
        embodiment_slot("my_robot=40")


@pytest.mark.slow  # a fresh interpreter importing torch: ~10-25 s on a loaded 2-core machine
def test_python_dash_m_reports_a_bad_folder_with_status_1(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vla_zoo.groot", "inspect", str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 1
    assert f"{tmp_path} is not an Isaac-GR00T checkpoint: config.json is missing" in proc.stderr


@needs_fixtures
def test_imported_head_starts_a_lora_fit_through_init_from(tmp_path):
    """``import`` writes what ``init_from`` (parts: action_head) loads, also into a head that wraps its DiT with LoRA:
    the adapters start at the identity, so the policy's head computes the reference's velocity."""
    from components.backbones import ComposedBackbone
    from components.lora import LoRA
    from lit_modules.vla_policy import InitFrom, VLAPolicy

    name = "n1_5_head_tiny"
    assert main(["import", str(FIXTURES / name), str(tmp_path / "head.ckpt")]) == 0
    kwargs = head_kwargs(read_config(FIXTURES / name))
    head = FlowMatchingActionHead(**kwargs, tune_diffusion_model=False, lora=LoRA(rank=2))
    policy = VLAPolicy(ComposedBackbone(project_to=kwargs["cross_attention_dim"]), head,
                       init_from=InitFrom(str(tmp_path / "head.ckpt"), ["action_head"]))
    policy._load_initial_weights(policy.init_from)
    io = fixture_io(name)
    torch.testing.assert_close(velocity(policy.action_head.eval(), io), io["expected_velocity"], rtol=0, atol=1e-5)
    assert any(".lora_" in n for n, p in policy.action_head.named_parameters() if p.requires_grad)
