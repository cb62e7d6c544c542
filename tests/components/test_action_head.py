"""The flow-matching DiT action head (and its regression baseline): learning, masking, caching, determinism."""

import pytest
import torch

from components.action_head import AdaLayerNorm, FlowMatchingActionHead
from components.regression_head import RegressionActionHead

SEED = 0  # thresholds below were calibrated over seeds 0, 1, 2
N1_5 = dict(vl_layer_norm=True, vl_self_attention_layers=2, vl_self_attention_heads=4, num_future_tokens=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_head(**overrides) -> FlowMatchingActionHead:
    cfg = dict(num_embodiments=3, max_state_dim=4, max_action_dim=4, horizon=4, hidden_dim=32, num_layers=4,
               num_heads=2, cross_attention_dim=16, dropout=0.0, embodiment_hidden_dim=32)
    return FlowMatchingActionHead(**{**cfg, **overrides})


def random_inputs(head, B=6, S=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    vl = torch.randn(B, S, head.cross_attention_dim, generator=g)
    mask = torch.rand(B, S, generator=g) > 0.4
    mask[:, 0] = True
    state = torch.randn(B, head.max_state_dim, generator=g)
    ids = torch.randint(0, head.num_embodiments, (B,), generator=g)
    return vl, mask, state, ids


def train(model, make_batch, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model.loss(*make_batch())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_flow_head_fits_both_modes_that_regression_averages():
    """Actions are +1 or -1 (whole chunk) with equal probability, independent of the conditioning."""
    torch.manual_seed(SEED)
    H, A, D = 4, 2, 16

    def batch(n=64):
        sign = torch.randint(0, 2, (n,)).float() * 2 - 1
        actions = sign[:, None, None].expand(n, H, A).contiguous()
        return (torch.randn(n, 3, D), torch.ones(n, 3, dtype=torch.bool), torch.zeros(n, 2), actions,
                torch.ones(n, H, A, dtype=torch.bool), torch.zeros(n, dtype=torch.long))

    flow = train(FlowMatchingActionHead(1, 2, A, H, hidden_dim=32, num_layers=2, num_heads=2, cross_attention_dim=D,
                                        dropout=0.0, embodiment_hidden_dim=32), batch, steps=400)
    regression = train(RegressionActionHead(1, 2, A, H, cross_attention_dim=D, hidden_dim=32,
                                            embodiment_hidden_dim=32), batch, steps=200)
    vl, mask, state, _, _, ids = batch(400)
    chunk_mean = flow.sample(vl, mask, state, ids, generator=torch.Generator().manual_seed(1)).mean(dim=(1, 2))
    # seeds 0-2: each mode 0.40-0.58, middle <= 0.05
    assert (chunk_mean > 0.5).float().mean() > 0.3
    assert (chunk_mean < -0.5).float().mean() > 0.3
    assert (chunk_mean.abs() < 0.5).float().mean() < 0.15
    # regression collapses onto the mean of the modes (seeds 0-2: |mean| <= 0.05)
    assert regression.sample(vl, mask, state, ids).mean(dim=(1, 2)).abs().max() < 0.25


def test_mixed_embodiment_batch_trains_both_embodiments():
    """Two embodiments with different state/action dims share every batch; each one's loss must fall a lot."""
    torch.manual_seed(SEED)
    head = tiny_head(num_embodiments=2, num_layers=2)
    dims = {0: (2, 2), 1: (3, 4)}  # embodiment: (state dim, action dim)
    maps = {e: torch.randn(s, a) for e, (s, a) in dims.items()}
    ramp = torch.linspace(0.5, 1.0, head.horizon)[:, None]

    def batch(n=32, generator=None):
        ids = torch.arange(n) % 2
        state = torch.zeros(n, head.max_state_dim)
        actions = torch.zeros(n, head.horizon, head.max_action_dim)
        mask = torch.zeros_like(actions, dtype=torch.bool)
        for e, (s, a) in dims.items():
            rows = ids == e
            state[rows, :s] = torch.rand(int(rows.sum()), s, generator=generator) * 2 - 1
            actions[rows, :, :a] = ramp * (state[rows, :s] @ maps[e])[:, None]  # [n_e, H, a]
            mask[rows, :, :a] = True
        return torch.randn(n, 3, 16, generator=generator), torch.ones(n, 3, dtype=torch.bool), state, actions, mask, ids

    g = torch.Generator().manual_seed(123)
    eval_batch = batch(64, generator=g)
    eval_noise, eval_t = torch.randn(64, head.horizon, head.max_action_dim, generator=g), torch.rand(64, generator=g)

    def per_embodiment_loss():
        with torch.no_grad():
            per_sample = head.loss(*eval_batch, noise=eval_noise, t=eval_t)["per_sample"]
        return [per_sample[eval_batch[-1] == e].mean().item() for e in dims]

    before = per_embodiment_loss()
    train(head, batch, steps=300)
    after = per_embodiment_loss()
    for e in dims:  # seeds 0-2: after/before 0.06-0.08 (embodiment 0), 0.11-0.19 (embodiment 1)
        assert after[e] < 0.35 * before[e], (e, before, after)


@pytest.mark.parametrize("config", [{}, N1_5], ids=["n1", "n1_5"])
def test_padded_vl_tokens_do_not_change_the_output(config):
    torch.manual_seed(SEED)
    head = tiny_head(**config).eval()
    vl, mask, state, ids = random_inputs(head)
    mask[2] = False  # a sample with no valid VL token at all
    noisy, t = torch.randn(6, head.horizon, head.max_action_dim), torch.rand(6)
    out = head(noisy, t, vl, mask, state, ids)
    assert torch.isfinite(out).all()
    scrambled = torch.where(mask[..., None], vl, torch.randn_like(vl) * 100)
    torch.testing.assert_close(head(noisy, t, scrambled, mask, state, ids), out, rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(3)
    sample = head.sample(vl, mask, state, ids, generator=g)
    assert torch.isfinite(sample).all()
    torch.testing.assert_close(head.sample(scrambled, mask, state, ids, generator=g.manual_seed(3)), sample,
                               rtol=0, atol=1e-5)
    # ... while the real tokens do matter (otherwise the check above could not fail)
    changed = torch.where(mask[..., None], torch.randn_like(vl), vl)
    assert (head(noisy, t, changed, mask, state, ids) - out).abs().amax(dim=(1, 2))[mask.any(1)].min() > 1e-3


def test_without_the_vl_mask_the_head_attends_to_padded_tokens_as_the_released_code_does():
    torch.manual_seed(SEED)
    masked = tiny_head().eval()
    unmasked = tiny_head(use_vl_mask=False).eval()
    unmasked.load_state_dict(masked.state_dict())
    vl, mask, state, ids = random_inputs(masked)
    noisy, t = torch.randn(6, masked.horizon, masked.max_action_dim), torch.rand(6)
    everything = torch.ones_like(mask)
    torch.testing.assert_close(unmasked(noisy, t, vl, mask, state, ids), masked(noisy, t, vl, everything, state, ids),
                               rtol=0, atol=0)
    g = torch.Generator()
    torch.testing.assert_close(unmasked.sample(vl, mask, state, ids, generator=g.manual_seed(3)),
                               masked.sample(vl, everything, state, ids, generator=g.manual_seed(3)), rtol=0, atol=0)
    assert not torch.allclose(unmasked(noisy, t, vl, mask, state, ids), masked(noisy, t, vl, mask, state, ids))


def test_compile_backend_compiles_the_dit_blocks_in_place_with_the_same_state_dict_keys():
    eager, compiled = tiny_head(), tiny_head(compile_backend="eager")  # eager: dynamo's tracing, no codegen
    assert all(b._compiled_call_impl is not None for b in compiled.blocks)
    assert all(b._compiled_call_impl is None for b in eager.blocks)
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_head_without_state_ignores_the_state():
    """``use_state=False`` (the no-proprioception ablation): velocity and samples do not move with the state."""
    vl, mask, state, ids = random_inputs(tiny_head())
    noisy, t = torch.randn(6, 4, 4), torch.rand(6)
    other = torch.randn_like(state) * 10
    for use_state in (False, True):
        torch.manual_seed(SEED)
        head = tiny_head(use_state=use_state).eval()
        moved = (head(noisy, t, vl, mask, other, ids) - head(noisy, t, vl, mask, state, ids)).abs().amax()
        sampled = [head.sample(vl, mask, s, ids, generator=torch.Generator().manual_seed(1)) for s in (state, other)]
        if use_state:  # the same head with its state token does move, so the check below can fail
            assert moved > 1e-2 and (sampled[0] - sampled[1]).abs().amax() > 1e-2
        else:
            assert moved == 0 and torch.equal(sampled[0], sampled[1])


@pytest.mark.parametrize("config", [dict(interleave=True), dict(interleave=False), dict(interleave=True, **N1_5)],
                         ids=["interleave", "cross_only", "n1_5"])
def test_kv_cache_gives_the_same_actions(config):
    torch.manual_seed(SEED)
    interleave = config["interleave"]
    head = tiny_head(**config).eval()
    assert sum(b.is_cross for b in head.blocks) == (2 if interleave else 4)
    vl, mask, state, ids = random_inputs(head)
    cached = head.sample(vl, mask, state, ids, generator=torch.Generator().manual_seed(5), use_kv_cache=True)
    uncached = head.sample(vl, mask, state, ids, generator=torch.Generator().manual_seed(5), use_kv_cache=False)
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_kv_cache,config", [(True, {}), (False, {}), (True, N1_5)], ids=["cache", "no_cache", "n1_5"])
def test_sampling_is_euler_integration_of_the_forward_velocity(use_kv_cache, config):
    """sample() precomputes the adaLN time conditioning of all K steps; it must equal K calls of forward()."""
    torch.manual_seed(SEED)
    head = tiny_head(**config).eval()
    for module in head.modules():  # adaLN starts at zero (time would not matter): give it weights
        if isinstance(module, AdaLayerNorm):
            torch.nn.init.normal_(module.modulation.weight, std=0.3)
            torch.nn.init.normal_(module.modulation.bias, std=0.3)
    vl, mask, state, ids = random_inputs(head)
    K, B = 4, vl.shape[0]
    x = torch.randn(B, head.horizon, head.max_action_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for k in range(K):
            x = x + head(x, torch.full((B,), k / K), vl, mask, state, ids) / K
    sampled = head.sample(vl, mask, state, ids, num_steps=K, generator=torch.Generator().manual_seed(5),
                          use_kv_cache=use_kv_cache)
    torch.testing.assert_close(sampled, x, rtol=1e-5, atol=1e-6)
    x0 = torch.randn(B, head.horizon, head.max_action_dim, generator=torch.Generator().manual_seed(5))
    assert torch.equal(head.sample(vl, mask, state, ids, num_steps=K, initial_noise=x0, use_kv_cache=use_kv_cache),
                       sampled)
    coarse = head.sample(vl, mask, state, ids, num_steps=2, generator=torch.Generator().manual_seed(5))
    assert (coarse - sampled).abs().max() > 1e-3, "the time conditioning should matter once adaLN has weights"


def test_sampling_is_deterministic_under_a_seeded_generator():
    torch.manual_seed(SEED)
    head = tiny_head().eval()
    vl, mask, state, ids = random_inputs(head)
    a = head.sample(vl, mask, state, ids, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(999)  # the global RNG must not matter
    b = head.sample(vl, mask, state, ids, generator=torch.Generator().manual_seed(7))
    c = head.sample(vl, mask, state, ids, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert head.sample(vl, mask, None, ids, num_steps=2, generator=torch.Generator().manual_seed(7)).shape == a.shape


def test_masked_action_dims_and_steps_do_not_contribute_to_the_loss():
    torch.manual_seed(SEED)
    head = tiny_head().eval()
    vl, mask, state, ids = random_inputs(head)
    actions = torch.randn(6, head.horizon, head.max_action_dim)
    action_mask = torch.ones_like(actions, dtype=torch.bool)
    action_mask[:, :, 3:] = False  # padded action dim
    action_mask[0, 2:] = False  # padded horizon steps (past the episode end)
    action_mask[1] = False  # an actionless sample
    noise, t = torch.randn_like(actions), torch.rand(6)
    out = head.loss(vl, mask, state, actions, action_mask, ids, noise=noise, t=t)
    garbage = torch.where(action_mask, actions, torch.randn_like(actions) * 50)
    garbage[1, 0, 0] = float("nan")
    out2 = head.loss(vl, mask, state, garbage, action_mask, ids, noise=noise, t=t)
    torch.testing.assert_close(out2["loss"], out["loss"], rtol=0, atol=0)
    assert out["per_sample"][1] == 0
    # the loss is the mean over the real entries only
    clean = actions.masked_fill(~action_mask, 0)
    tt = t[:, None, None]
    pred = head(tt * clean + (1 - tt) * noise, t, vl, mask, state, ids)
    expected = (pred - (clean - noise))[action_mask].square().mean()
    torch.testing.assert_close(out["loss"], expected)
    # ... and a real entry does count
    moved = actions.clone()
    moved[0, 0, 0] += 1.0
    assert head.loss(vl, mask, state, moved, action_mask, ids, noise=noise, t=t)["loss"] != out["loss"]


@pytest.mark.parametrize("config", [{}, N1_5], ids=["n1", "n1_5"])
def test_gradient_checkpointing_gives_the_same_gradients(config):
    torch.manual_seed(SEED)
    head = tiny_head(dropout=0.2, **config)  # dropout on: checkpointing must replay the same masks
    vl, mask, state, ids = random_inputs(head)
    actions, action_mask = torch.randn(6, 4, 4), torch.ones(6, 4, 4, dtype=torch.bool)
    noise, t = torch.randn_like(actions), torch.rand(6)
    grads = []
    for flag in (False, True):
        head.gradient_checkpointing = flag
        head.zero_grad()
        torch.manual_seed(1)
        head.loss(vl, mask, state, actions, action_mask, ids, noise=noise, t=t)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_checkpointing_frees_block_activations():
    """The flag must actually do something: fewer tensors are kept for backward."""
    head = tiny_head(num_layers=6)
    vl, mask, state, ids = random_inputs(head)
    actions, action_mask = torch.randn(6, 4, 4), torch.ones(6, 4, 4, dtype=torch.bool)
    saved = []
    for flag in (False, True):
        head.gradient_checkpointing = flag
        count = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda x: count.__setitem__(0, count[0] + 1) or x, lambda x: x):
            head.loss(vl, mask, state, actions, action_mask, ids)
        saved.append(count[0])
    assert saved[1] < saved[0] / 2, saved


def test_flow_time_follows_the_shifted_beta():
    from scipy import stats

    head = tiny_head()
    torch.manual_seed(SEED)
    t = head.sample_time(4000, "cpu").double()
    assert 0 <= t.min() and t.max() <= head.noise_s
    u = 1 - t / head.noise_s  # paper: (s - t)/s ~ Beta(1.5, 1)
    assert stats.kstest(u.numpy(), stats.beta(1.5, 1.0).cdf).pvalue > 1e-3


def test_new_embodiment_on_trained_head_leaves_old_ones_unchanged():
    torch.manual_seed(SEED)
    head = tiny_head().eval()
    vl, mask, state, ids = random_inputs(head)
    before = head.sample(vl, mask, state, ids, generator=torch.Generator().manual_seed(0))
    head.expand_embodiments(5)
    assert head.num_embodiments == 5
    assert torch.equal(head.sample(vl, mask, state, ids, generator=torch.Generator().manual_seed(0)), before)


def test_bad_inputs_name_the_problem():
    head = tiny_head()
    vl, mask, state, ids = random_inputs(head)
    with pytest.raises(ValueError, match="vl_mask must be a bool"):
        head.sample(vl, mask.float(), state, ids)
    with pytest.raises(ValueError, match="backbone's out_dim"):
        head.sample(vl[..., :8], mask, state, ids)
    with pytest.raises(ValueError, match="max_state_dim"):
        head.sample(vl, mask, state[:, :2], ids)
    with pytest.raises(IndexError, match="expand_embodiments"):
        head.sample(vl, mask, state, ids + 10)
    with pytest.raises(ValueError, match=r"initial_noise must have shape \[B, horizon, max_action_dim\] = \[6, 4, 4\]"):
        head.sample(vl, mask, state, ids, initial_noise=torch.zeros(6, 4, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_head(max_seq_len=2)


def test_n1_5_options_add_their_modules_and_future_tokens_matter():
    torch.manual_seed(SEED)
    head = tiny_head(**N1_5).eval()
    assert len(head.vl_blocks) == 2 and head.vl_norm is not None and head.future_tokens.shape == (3, 32)
    assert not any(b.time_conditioned for b in head.vl_blocks)
    vl, mask, state, ids = random_inputs(head)
    noisy, t = torch.randn(6, 4, 4), torch.rand(6)
    out = head(noisy, t, vl, mask, state, ids)
    with torch.no_grad():
        head.future_tokens.add_(torch.randn_like(head.future_tokens))  # not a constant: the norms would remove it
    assert (head(noisy, t, vl, mask, state, ids) - out).abs().max() > 1e-3
    # the defaults build none of it (the N1 head's parameters are unchanged)
    assert not any(k.startswith(("vl_", "future_tokens")) for k in tiny_head().state_dict())


def test_time_embedding_default_is_unchanged_and_old_checkpoints_load():
    """The DiT time embedding is diffusers' Timesteps + TimestepEmbedding; by default it computes the code this head
    always used (cos | sin, f_i = 10000^(-i/half)), and state dicts that name its MLP ``mlp.0``/``mlp.2`` load."""
    import math

    head = tiny_head().eval()
    emb = head.timestep_embedding
    buckets = torch.tensor([0, 1, 250, 999])
    half = emb.frequency_dim // 2
    angles = buckets.float()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    assert torch.equal(emb.time_proj(buckets), torch.cat([angles.cos(), angles.sin()], dim=-1))
    old = {k.replace("timestep_embedding.timestep_embedder.linear_1.", "timestep_embedding.mlp.0.")
            .replace("timestep_embedding.timestep_embedder.linear_2.", "timestep_embedding.mlp.2."): v
           for k, v in head.state_dict().items()}
    assert "timestep_embedding.mlp.0.weight" in old
    torch.manual_seed(1)
    other = tiny_head()
    other.load_state_dict(old)
    assert torch.equal(other.timestep_embedding(buckets), emb(buckets))
