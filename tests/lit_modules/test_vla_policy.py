"""VLAPolicy end to end on the embedded world: it trains on a mixed-embodiment mixture, its checkpoint restores a
deployable Policy that reproduces its actions in robot units, and dual-rate control reuses System 2 tokens."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from components.action_head import FlowMatchingActionHead
from components.backbones import SmolVLMBackbone
from components.embodiment import EmbodimentLinear
from datamodules.mixture import MixtureDataModule
from envs.tabletop import TabletopEnv, TabletopPyramid
from lit_modules.checkpoint import DATA_SPEC_KEY, read_checkpoint
from lit_modules.vla_policy import InitFrom, VLAPolicy, shuffled_vl_loss
from tests.lit_modules.test_latent_action import OneThread
from vla_zoo.policy import Policy


def tiny_policy(compile_backend: str | None = None, **head_kwargs) -> VLAPolicy:
    backbone = SmolVLMBackbone(select_layer=1, project_to=64, tune_llm=True, image_size=32, patch_size=8,
                               vision_hidden_size=32, vision_layers=1, vision_heads=2, lm_hidden_size=64,
                               lm_layers=2, lm_heads=2)
    head = FlowMatchingActionHead(num_embodiments=2, max_state_dim=4, max_action_dim=4, horizon=8, hidden_dim=64,
                                  num_layers=2, num_heads=2, cross_attention_dim=64, embodiment_hidden_dim=64,
                                  dropout=0.0, compile_backend=compile_backend, **head_kwargs)
    return VLAPolicy(backbone=backbone, action_head=head,
                     optimizer=partial(torch.optim.AdamW, lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-5))


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pyramid")
    TabletopPyramid(root=str(root), image_size=32, horizon=8, num_workers=1,
                    episodes={"robot": 8, "robot_b": 8, "sim": 0, "human": 0, "neural": 0}).prepare()
    return root


def mixture(root: Path, batch_size: int = 16, batches: int = 40) -> MixtureDataModule:
    return MixtureDataModule(
        sources=[
            {"name": "robot", "shards": str(root / "robot"), "embodiment": "point_gripper", "weight": 0.5},
            {"name": "robot_b", "shards": str(root / "robot_b"), "embodiment": "two_link_arm", "weight": 0.5},
        ],
        embodiments={"point_gripper": 0, "two_link_arm": 1}, horizon=8, max_state_dim=4, max_action_dim=4,
        batch_size=batch_size, batches_per_epoch=batches, seed=0,
    )


def sampled_action_error(model: VLAPolicy, batch: dict) -> dict[int, float]:
    """Per embodiment slot: masked MSE between sampled chunks (K=4, fixed noise) and the demonstrations."""
    model.eval()
    with torch.no_grad():
        tokens, mask = model.backbone(batch["images"][:, 0], list(batch["instruction"]))
        pred = model.action_head.sample(tokens, mask, batch["state"], batch["embodiment_id"],
                                        generator=torch.Generator().manual_seed(0))
    err = (pred - batch["actions"]) ** 2 * batch["action_mask"]
    out = {}
    for e in batch["embodiment_id"].unique().tolist():
        sel = batch["embodiment_id"] == e
        out[e] = float(err[sel].sum() / batch["action_mask"][sel].sum())
    model.train()
    return out


@pytest.fixture(scope="module")
def trained(pyramid, tmp_path_factory):
    """A tiny policy trained for 160 steps on point_gripper + two_link_arm; its held-out error and checkpoint."""
    seed_everything(0)
    out = tmp_path_factory.mktemp("run")
    model, data = tiny_policy(), mixture(pyramid)
    data.setup()
    # A fixed batch from a stream the training run never draws (another epoch of the seeded mixture).
    held_out = next(iter(data.make_dataset(0, 1, epoch=10_000)))
    model.configure_model()
    before = sampled_action_error(model, held_out)
    trainer = Trainer(max_steps=160, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=out, enable_checkpointing=False)
    trainer.fit(model, data)
    after = sampled_action_error(model, held_out)
    ckpt = out / "policy.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, (before, after), ckpt


def test_mixed_embodiment_batches_train_both_embodiments(trained) -> None:
    _, (before, after), _ = trained
    assert set(before) == {0, 1}, "the held-out batch should mix both embodiments"
    for e in (0, 1):
        assert after[e] < 0.5 * before[e], f"embodiment {e}: sampled-action MSE {before[e]:.3f} -> {after[e]:.3f}"


def _observation(env: TabletopEnv, seed: int) -> dict:
    obs, _ = env.reset(seed=seed)
    return {**obs, "embodiment": env.embodiment}


def test_checkpoint_restores_policy_that_reproduces_actions(trained) -> None:
    model, _, ckpt = trained
    assert DATA_SPEC_KEY in read_checkpoint(ckpt)
    env = TabletopEnv("two_link_arm", image_size=32)
    obs = _observation(env, 3)
    expected = Policy(model.eval()).predict_action(obs, generator=torch.Generator().manual_seed(7))
    # Restored through the checkpoint alone: VLAPolicy.load_from_checkpoint inside Policy.from_checkpoint.
    restored = VLAPolicy.load_from_checkpoint(ckpt, backbone=model._backbone_factory, action_head=model._head_factory)
    assert torch.equal(restored.action_head.position_embedding, model.action_head.position_embedding)
    got = Policy(restored.eval()).predict_action(obs, generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Actions come back in the arm's own dimension and units (joint deltas in [-1, 1], grip in [0, 1]).
    assert got.shape == (8, 3)
    assert np.all(got >= -1.0 - 1e-5) and np.all(got <= 1.0 + 1e-5)


def test_sampling_is_deterministic_given_a_seeded_generator(trained) -> None:
    model, _, _ = trained
    obs = _observation(TabletopEnv("point_gripper", image_size=32), 5)
    policy = Policy(model.eval())
    a = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))
    b = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))
    c = policy.predict_action(obs, generator=torch.Generator().manual_seed(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c), "different noise seeds should give different samples of the flow"


def test_averaging_flow_samples_shrinks_sampling_noise(trained) -> None:
    """``num_samples=n`` returns the mean of n draws: across noise seeds its chunks spread ~1/sqrt(n) as much as
    single draws do, around the same centre; n=1 is exactly the single draw."""
    model, _, _ = trained
    policy = Policy(model.eval())
    obs = _observation(TabletopEnv("point_gripper", image_size=32), 5)
    tokens, mask = policy.encode_observation(policy.observation_images(obs), [obs["instruction"]])

    def chunks(n: int) -> torch.Tensor:  # [seeds, H, A]
        return torch.cat([policy.act(tokens, mask, obs["state"], "point_gripper",
                                     generator=torch.Generator().manual_seed(s), num_samples=n) for s in range(24)])

    single, averaged = chunks(1), chunks(8)
    np.testing.assert_array_equal(single[3].numpy(), policy.predict_action(obs, generator=torch.Generator().manual_seed(3)))
    spread_1, spread_8 = single.std(0).mean().item(), averaged.std(0).mean().item()
    assert spread_1 > 1e-3, "the trained flow should still sample: no spread to shrink"
    assert spread_8 < 0.6 * spread_1, f"spread {spread_1:.4f} -> {spread_8:.4f}; expected ~1/sqrt(8) = 0.35x"
    centre_gap = (single.mean(0) - averaged.mean(0)).abs().mean().item()
    assert centre_gap < 0.5 * spread_1, f"the mean of draws moved by {centre_gap:.4f} (single-draw spread {spread_1:.4f})"
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        Policy(model, num_samples=0)


def test_dual_rate_policy_reuses_system2_tokens(trained) -> None:
    model, _, _ = trained
    calls = {"n": 0}
    handle = model.backbone.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        policy = Policy(model, system2_period=3, seed=0)
        env = TabletopEnv("point_gripper", image_size=32)
        obs = _observation(env, 11)
        for _ in range(6):
            policy.get_action(obs)
        assert calls["n"] == 2  # System 2 ran on calls 1 and 4 only
        obs_b = {**obs, "instruction": obs["instruction"] + " now"}
        policy.get_action(obs_b)
        assert calls["n"] == 3  # a new instruction always refreshes the tokens
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="unknown embodiment 'spot'"):
        policy.get_action({**obs, "embodiment": "spot"})
    md = policy.metadata()
    assert md["embodiments"]["two_link_arm"]["action_dim"] == 3 and md["horizon"] == 8


def test_in_process_observation_errors_name_the_key(trained) -> None:
    """``Policy.get_action`` checks an observation as the server does, so errors name the key, not a tensor."""
    model, _, _ = trained
    policy = Policy(model)
    obs = _observation(TabletopEnv("point_gripper", image_size=32), 2)
    images = obs["images"]
    small_wrist = {**images, "wrist": images["wrist"][::2, ::2]}
    with pytest.raises(ValueError, match=r"views differ in size \{'scene': \[32, 32\], 'wrist': \[16, 16\]\}"):
        policy.get_action({**obs, "images": small_wrist})
    grey = {**images, "scene": images["scene"].mean(-1).astype(np.uint8)}
    with pytest.raises(ValueError, match=r"\['images'\]\['scene'\] must be a uint8 array.*\[32, 32\]; a greyscale"):
        policy.get_action({**obs, "images": grey})
    with pytest.raises(ValueError, match=r"observation is missing \['instruction'\]"):
        policy.get_action({k: v for k, v in obs.items() if k != "instruction"})
    with pytest.raises(ValueError, match=r"observation\['state'\] holds NaN or inf at dims"):
        policy.get_action({**obs, "state": np.full_like(obs["state"], np.nan)})
    # Another size than the training frames, shared by every view, is resized by the backbone as before.
    large = {view: np.repeat(np.repeat(frame, 2, 0), 2, 1) for view, frame in images.items()}
    assert policy.get_action({**obs, "images": large})["actions"].shape == (8, 3)
def test_bf16_policies_cast_a_copy_once_and_act_like_fp32(trained) -> None:
    model, _, _ = trained
    obs = _observation(TabletopEnv("point_gripper", image_size=32), 13)
    policies = {p: Policy(model, seed=4, precision=p) for p in ("32-true", "bf16-mixed", "bf16-true")}
    # Weights cast once, into copies: the module being trained stays fp32.
    assert policies["32-true"].module is model and {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in policies["bf16-true"].module.parameters()} == {torch.bfloat16}
    mixed = policies["bf16-mixed"].module.action_head
    assert mixed.blocks[0].to_q.weight.dtype == mixed.action_decoder.layer1.weights[0].dtype == torch.bfloat16
    assert mixed.position_embedding.dtype == torch.float32  # what is not a matmul weight stays fp32
    errors = {p: [] for p in ("bf16-mixed", "bf16-true")}
    for _ in range(3):
        expected = policies["32-true"].get_action(obs)["actions"]
        for p in errors:
            got = policies[p].get_action(obs)["actions"]
            assert got.dtype == np.float32 and got.shape == expected.shape == (8, 3)
            errors[p].append(np.abs(got - expected).max())
    # The same flow from the same noise, actions in [-1, 1]: bf16 rounding only, and far less of it with the norms
    # and the residual stream in fp32.
    assert max(errors["bf16-mixed"]) < 0.02 and max(errors["bf16-true"]) < 0.1, errors
    with pytest.raises(ValueError, match=r"precision must be one of \['32-true', 'bf16-mixed', 'bf16-true'\]"):
        Policy(model, precision="bf16")


def test_compiled_blocks_train_and_keep_their_state_dict_keys(pyramid) -> None:
    torch.manual_seed(0)
    eager, compiled = tiny_policy(), tiny_policy(compile_backend="eager")  # eager: dynamo's tracing, no codegen
    compiled.load_state_dict(eager.state_dict())
    for model in (eager, compiled):
        model.configure_model()
        model.configure_model()  # idempotent, as Lightning may call it again
    blocks = compiled.action_head.blocks
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert all(b._compiled_call_impl is None for b in eager.action_head.blocks)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints load either way
    data = mixture(pyramid)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    losses = []
    for model in (eager, compiled):
        model.data_spec = data.data_spec()
        model.log = lambda *args, **kwargs: None
        torch.manual_seed(1)  # the same flow times and noise
        loss = model.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0])
    assert blocks[0].to_q.weight.grad is not None


def test_backbone_and_head_width_mismatch_is_reported() -> None:
    backbone = SmolVLMBackbone(select_layer=1, project_to=32, image_size=32, patch_size=8, vision_hidden_size=32,
                               vision_layers=1, vision_heads=2, lm_hidden_size=64, lm_layers=2, lm_heads=2)
    head = FlowMatchingActionHead(num_embodiments=1, max_state_dim=4, max_action_dim=4, horizon=8, hidden_dim=32,
                                  num_layers=1, num_heads=2, cross_attention_dim=64, embodiment_hidden_dim=32)
    with pytest.raises(ValueError, match="project_to.*cross_attention_dim"):
        VLAPolicy(backbone=backbone, action_head=head).configure_model()


def test_init_from_missing_checkpoint_names_the_key(tmp_path) -> None:
    model = tiny_policy()
    with pytest.raises(FileNotFoundError, match="init_from"):
        model._load_initial_weights(InitFrom(str(tmp_path / "nope.ckpt")))


def test_image_augmentation_applies_to_training_steps_only(pyramid) -> None:
    seen = []

    class Record(torch.nn.Module):
        def forward(self, images):
            seen.append(images.shape)
            return images

    model = tiny_policy()
    model.image_augmentation = Record()
    model.configure_model()
    dm = mixture(pyramid, batch_size=4, batches=1)
    dm.setup("fit")
    model.data_spec = dm.data_spec()
    batch = next(iter(dm.train_dataloader()))
    model.train()
    model.training_step(batch, 0)
    assert len(seen) == 1 and seen[0][:2] == batch["images"][:, 0].shape[:2]
    model.eval()
    with torch.no_grad():
        model.validation_step(batch, 0)
    assert len(seen) == 1, "validation must see the images unaugmented"


def test_init_from_a_checkpoint_with_fewer_embodiment_slots_keeps_them_and_adds_fresh_ones(tmp_path) -> None:
    torch.manual_seed(0)
    pretrained = tiny_policy()  # 2 embodiment slots
    pretrained.configure_model()
    path = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": pretrained.state_dict()}, path)

    torch.manual_seed(1)
    grown = tiny_policy()
    grown.action_head.expand_embodiments(3)  # as a recipe with num_embodiments: 3 builds it
    fresh = {k: v.clone() for k, v in grown.state_dict().items()}
    grown._load_initial_weights(InitFrom(str(path)))
    after, before = grown.state_dict(), pretrained.state_dict()
    added = set(after) - set(before)
    assert added and all(k.rpartition(".")[0].endswith(("weights", "biases")) and k.endswith(".2") for k in added)
    assert all(isinstance(grown.get_submodule(k.rsplit(".", 2)[0]), EmbodimentLinear) for k in added)
    for key, value in after.items():
        if key in added:
            assert torch.equal(value, fresh[key]), key  # the new robot, freshly initialised
        else:
            assert torch.equal(value, before[key]), key  # the pretrained robots (and everything else), bit-identical


class SaveState(Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


def test_ddp_trains_mixed_embodiments_and_leaves_absent_slots_untouched(pyramid, tmp_path) -> None:
    """Two gloo processes, each drawing its own mixed batches: per-slot adapter weights stay in sync, the slots
    present train, and a slot absent from every batch is neither updated nor decayed."""
    seed_everything(0)
    model = tiny_policy()
    model.action_head.expand_embodiments(3)  # slot 2 has no data
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(strategy="ddp_spawn_find_unused_parameters_true", devices=2, accelerator="cpu", max_steps=4,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
                      callbacks=[OneThread(), SaveState(tmp_path)])
    trainer.fit(model, mixture(pyramid, batch_size=4, batches=4))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), f"{key} differs across ranks"
    slot_keys = [k for k in initial if k.rpartition(".")[0].endswith(("weights", "biases"))]
    assert slot_keys
    for key in slot_keys:
        moved = not torch.equal(ranks[0][key], initial[key])
        assert moved == (not key.endswith(".2")), key


def test_plain_ddp_is_refused_with_the_strategy_that_works(pyramid, tmp_path, in_process_ddp) -> None:
    trainer = Trainer(strategy="ddp", devices=1, accelerator="cpu", max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        trainer.fit(tiny_policy(), mixture(pyramid, batch_size=4, batches=2))


def _vl_task(B: int, g: torch.Generator):
    """Actions are +-0.8 by a sign every VL token carries in feature 0: only the VL input tells which."""
    sign = torch.randint(0, 2, (B,), generator=g).float() * 2 - 1
    tokens = torch.randn(B, 5, 16, generator=g)
    tokens[:, :, 0] += 2 * sign[:, None]
    mask = torch.ones(B, 5, dtype=torch.bool)
    actions = (0.8 * sign)[:, None, None].expand(B, 4, 4).clone()
    return tokens, mask, torch.zeros(B, 4), actions, torch.ones_like(actions, dtype=torch.bool), torch.zeros(B, dtype=torch.long)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vl_gain_is_zero_for_a_blind_head_and_large_for_one_that_reads_its_input(seed) -> None:
    torch.manual_seed(seed)
    head = FlowMatchingActionHead(num_embodiments=1, max_state_dim=4, max_action_dim=4, horizon=4, hidden_dim=32,
                                  num_layers=2, num_heads=2, cross_attention_dim=16, embodiment_hidden_dim=32,
                                  dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    held_out = _vl_task(64, g)

    def gain() -> float:
        shuffled = shuffled_vl_loss(head, *held_out)  # restores the random state: the next call draws the same noise
        return float(shuffled - head.loss(*held_out)["loss"])

    blind = {n: p.detach().clone() for n, p in head.named_parameters() if "blocks.0.to_out" in n}
    with torch.no_grad():
        for n, p in head.named_parameters():
            if n in blind:
                p.zero_()  # block 0 is the only cross-attention block: the head now cannot see VL tokens
        assert gain() == 0.0, "with the same noise and flow times, a head blind to VL must gain exactly 0"
        for n, p in head.named_parameters():
            if n in blind:
                p.copy_(blind[n])
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(150):
        loss = head.loss(*_vl_task(32, g))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gain() > 1.0  # 3.3-4.6 after 150 steps over seeds 0-5; an ignored input would give ~0


def test_privileged_head_trains_the_backbone_and_stays_out_of_inference(pyramid) -> None:
    from components.privileged_head import PrivilegedStateHead
    from datamodules import schema

    torch.manual_seed(0)
    model = tiny_policy()
    model.privileged_head = PrivilegedStateHead(64, 2, num_queries=2, num_heads=2, hidden_dim=64)
    model.configure_model()
    dm = mixture(pyramid, batch_size=16, batches=1)
    dm.setup("fit")
    model.data_spec = dm.data_spec()
    batch = next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="privileged"):  # the head without data that carries the targets
        model.training_step(batch, 0)
    # The gripper's position is in the images too; as a privileged target the backbone must find it there.
    xy = batch[schema.STATE][:, :2]
    batch[schema.PRIVILEGED] = (xy - xy.mean(0)) / xy.std(0)
    batch[schema.PRIVILEGED_MASK] = torch.ones_like(xy, dtype=torch.bool)
    model.train()
    tokens, mask = model._vl_tokens(batch)
    model._privileged_loss(tokens, mask, batch, "train").backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    opt = torch.optim.Adam(list(model.backbone.parameters()) + list(model.privileged_head.parameters()), lr=1e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = model._privileged_loss(*model._vl_tokens(batch), batch, "train")
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses[::10]  # 1.10 -> 0.46 measured (seed 0)
    # The training step adds it to the action loss with its weight.
    model.privileged_head.loss_weight = 0.0
    torch.manual_seed(1)
    without = float(model.training_step(batch, 0))
    model.privileged_head.loss_weight = 1.0
    torch.manual_seed(1)
    assert float(model.training_step(batch, 0)) == pytest.approx(without + losses[-1], rel=0.2)
    # A policy built without the head (deployment) loads the checkpoint and drops the readout's weights.
    checkpoint = {"state_dict": model.state_dict(), DATA_SPEC_KEY: model.data_spec.to_dict()}
    deployed = tiny_policy()
    deployed.configure_model()
    deployed.on_load_checkpoint(checkpoint)
    deployed.load_state_dict(checkpoint["state_dict"])
