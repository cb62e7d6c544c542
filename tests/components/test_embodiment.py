"""Embodiment adapters: grouped per-embodiment matmuls equal the per-sample gather, slots can be added safely."""

import pytest
import torch

from components.embodiment import ActionEncoder, EmbodimentGroups, EmbodimentLinear, StateEncoder, expand_embodiments


def gather_reference(layer: EmbodimentLinear, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """What the released code does: one weight copy per sample."""
    weight, bias = (torch.stack(list(p)) for p in (layer.weights, layer.biases))  # [E, in, out], [E, out]
    w, b = weight[ids], bias[ids]  # [B, in, out], [B, out]
    y = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), w) + b[:, None]  # [B, N, out]
    return y.view(*x.shape[:-1], -1)


@pytest.mark.parametrize("lead", [(), (5,)])
def test_grouped_matmul_matches_per_sample_gather_forward_and_backward(lead):
    torch.manual_seed(0)
    layer = EmbodimentLinear(5, 7, 3)
    ids = torch.tensor([3, 0, 3, 1, 4, 0, 3, 2, 2])
    x = torch.randn(len(ids), *lead, 7, requires_grad=True)
    y = layer(x, ids)
    ref_layer = EmbodimentLinear(5, 7, 3)
    ref_layer.load_state_dict(layer.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    y_ref = gather_reference(ref_layer, x_ref, ids)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for mine, ref in zip(layer.parameters(), ref_layer.parameters()):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-6)
    # slot 4 appears once, and slots absent from a batch get no gradient at all (so AdamW leaves them untouched)
    y2 = layer(x[:2].detach(), ids[:2])
    layer.zero_grad(set_to_none=True)
    y2.sum().backward()
    for e in range(5):
        assert (layer.weights[e].grad is None) == (e in (1, 2, 4)), e
    assert all(layer.weights[e].grad.abs().sum() > 0 for e in (0, 3))


def test_single_embodiment_batch_uses_that_slot():
    torch.manual_seed(0)
    layer = EmbodimentLinear(3, 4, 2)
    x = torch.randn(6, 4)
    ids = torch.full((6,), 2)
    torch.testing.assert_close(layer(x, ids), x @ layer.weights[2] + layer.biases[2])


def test_groups_are_shared_across_layers_and_undo_the_sort():
    ids = torch.tensor([2, 0, 2, 1])
    groups = EmbodimentGroups.from_ids(ids)
    assert groups.slots == (0, 1, 2) and groups.counts == (1, 1, 2)
    assert torch.equal(ids[groups.order][groups.inverse], ids)
    enc = StateEncoder(3, 4, 8, 6)
    s = torch.randn(4, 4)
    torch.testing.assert_close(enc(s, groups), enc(s, ids))


def test_expanding_embodiments_keeps_old_slots_bit_identical():
    torch.manual_seed(0)
    enc = ActionEncoder(2, 3, 8)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    a, tb = torch.randn(4, 5, 3), torch.tensor([0, 250, 999, 10])
    ids = torch.tensor([0, 1, 1, 0])
    out_before = enc(a, tb, ids)
    expand_embodiments(enc, 5)
    assert enc.layer1.num_embodiments == 5
    after = enc.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    for name in ("layer1", "layer2", "layer3"):
        assert f"{name}.weights.4" in after and f"{name}.weights.5" not in after
        assert not torch.equal(after[f"{name}.weights.2"], after[f"{name}.weights.3"]), "new slots must be fresh"
    assert torch.equal(enc(a, tb, ids), out_before)
    out_new = enc(a, tb, torch.tensor([0, 1, 4, 0]))  # the new slot is usable in a mixed batch
    assert torch.equal(out_new[[0, 1, 3]], out_before[[0, 1, 3]])


def test_out_of_range_slot_names_the_fix():
    layer = EmbodimentLinear(2, 3, 3)
    with pytest.raises(IndexError, match="expand_embodiments"):
        layer(torch.randn(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shrink"):
        layer.expand(1)


def test_grouped_backward_passes_gradcheck():
    torch.manual_seed(0)
    layer = EmbodimentLinear(4, 5, 3).double()
    ids = torch.tensor([0, 3, 3, 1, 0, 1])
    x = torch.randn(6, 2, 5, dtype=torch.double, requires_grad=True)
    # gradcheck perturbs the parameters in place, so the closure sees the perturbed values
    assert torch.autograd.gradcheck(lambda x, *params: layer(x, ids), (x, *layer.parameters()))


def test_post_training_one_slot_leaves_the_other_slots_bit_identical_under_adamw():
    torch.manual_seed(0)
    layer = EmbodimentLinear(3, 4, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        layer(torch.randn(8, 4), torch.full((8,), 1)).square().mean().backward()
        opt.step()
    after = layer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"weights.1", "biases.1"}


def test_dense_layout_checkpoints_load_into_per_slot_parameters():
    torch.manual_seed(0)
    layer = EmbodimentLinear(3, 4, 2)
    weight, bias = layer.dense()  # [3, 4, 2], [3, 2]: the layout checkpoints had before per-slot parameters
    fresh = EmbodimentLinear(3, 4, 2)
    fresh.load_state_dict({"weight": weight, "bias": bias})
    x, ids = torch.randn(5, 4), torch.tensor([0, 2, 1, 2, 0])
    assert torch.equal(fresh(x, ids), layer(x, ids))
