"""Embodiment-specific adapters: one set of weights per embodiment slot, many embodiments in one batch.

GR00T N1 gives every embodiment its own state encoder, action encoder and action decoder (paper Sec. 2.1). The
public code runs them by gathering ``W[embodiment_id]`` per sample, which materialises ``B`` copies of every weight
matrix (about 1.2 GB for one N1 layer at batch 128) and as much again for their gradients. Here rows are grouped by
embodiment instead: sort the batch by slot once, run one plain matmul per embodiment present, undo the sort. Memory
then does not grow with the batch beyond the activations, and each matmul is as large as the group.

``torch._grouped_mm`` would do the per-group matmuls in one call, but on CPU in torch 2.14 its backward fails
("Invalid strides/sizes") and its forward was only ~10% faster than the loop (2048x1536 @ 8x1536x3072), so the loop
of ``addmm`` is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EmbodimentGroups:
    """A batch's rows grouped by embodiment slot, computed once per forward and shared by every adapter layer.

    ``order`` sorts the batch by slot, ``inverse`` undoes that sort, ``slots``/``counts`` list the slots present and
    how many rows each has (host-side ints, so building this costs one device sync per forward, not one per layer).
    """

    order: torch.Tensor  # [B] long
    inverse: torch.Tensor  # [B] long
    slots: tuple[int, ...]
    counts: tuple[int, ...]

    @classmethod
    def from_ids(cls, embodiment_id: torch.Tensor) -> EmbodimentGroups:
        if embodiment_id.dim() != 1:
            raise ValueError(f"embodiment_id must be a 1-D [B] tensor of slot indices, got shape {tuple(embodiment_id.shape)}")
        slots, counts = torch.unique(embodiment_id, sorted=True, return_counts=True)
        order = torch.argsort(embodiment_id, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return cls(order, inverse, tuple(slots.tolist()), tuple(counts.tolist()))

    @property
    def single_slot(self) -> int | None:
        """The slot when the whole batch is one embodiment (the common fine-tuning case: no sort needed)."""
        return self.slots[0] if len(self.slots) == 1 else None


def as_groups(embodiment: torch.Tensor | EmbodimentGroups) -> EmbodimentGroups:
    return embodiment if isinstance(embodiment, EmbodimentGroups) else EmbodimentGroups.from_ids(embodiment)


class EmbodimentLinear(nn.Module):
    """``y = x W_e + b_e`` with a weight per embodiment slot ``e``; rows of different slots may share a batch.

    ``weight`` is ``[E, in, out]`` (``x @ W`` layout, so a slot's matrix is a contiguous block) and each slot is
    initialised like ``nn.Linear``.
    """

    def __init__(self, num_embodiments: int, in_features: int, out_features: int) -> None:
        super().__init__()
        if num_embodiments < 1:
            raise ValueError(f"num_embodiments must be >= 1, got {num_embodiments}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_embodiments, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_embodiments, out_features))
        self._init_slots(self.weight.data, self.bias.data)

    @property
    def num_embodiments(self) -> int:
        return self.weight.shape[0]

    def _init_slots(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(weight, -bound, bound)
        nn.init.uniform_(bias, -bound, bound)

    @torch.no_grad()
    def expand(self, num_embodiments: int) -> None:
        """Append freshly initialised slots up to ``num_embodiments``; existing slots stay bit-identical.

        Replaces the parameters, so build the optimizer after expanding.
        """
        old = self.num_embodiments
        if num_embodiments < old:
            raise ValueError(f"cannot shrink EmbodimentLinear from {old} to {num_embodiments} slots")
        if num_embodiments == old:
            return
        extra_w = self.weight.new_empty(num_embodiments - old, self.in_features, self.out_features)
        extra_b = self.bias.new_empty(num_embodiments - old, self.out_features)
        self._init_slots(extra_w, extra_b)
        self.weight = nn.Parameter(torch.cat([self.weight.data, extra_w]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, extra_b]))

    def forward(self, x: torch.Tensor, embodiment: torch.Tensor | EmbodimentGroups) -> torch.Tensor:
        # x [B, ..., in] -> [B, ..., out]
        groups = as_groups(embodiment)
        if groups.slots and (groups.slots[0] < 0 or groups.slots[-1] >= self.num_embodiments):
            bad = groups.slots[0] if groups.slots[0] < 0 else groups.slots[-1]
            raise IndexError(
                f"embodiment slot {bad} out of range: this layer has {self.num_embodiments} slots "
                "(raise num_embodiments or call expand_embodiments)"
            )
        if groups.single_slot is not None:
            e = groups.single_slot
            return torch.matmul(x, self.weight[e]) + self.bias[e]
        lead = x.shape[1:-1]
        # unbind once: its backward stacks the per-slot gradients into one [E, in, out] tensor, where indexing
        # weight[e] per group would allocate a full-size zero gradient per group.
        weights, biases = self.weight.unbind(0), self.bias.unbind(0)
        rows = x.index_select(0, groups.order).split(groups.counts)  # per group [n_e, ..., in]
        out = [
            torch.addmm(biases[e], r.reshape(-1, self.in_features), weights[e]).view(r.shape[0], *lead, self.out_features)
            for e, r in zip(groups.slots, rows)
        ]
        return torch.cat(out).index_select(0, groups.inverse)

    def extra_repr(self) -> str:
        return f"num_embodiments={self.num_embodiments}, in_features={self.in_features}, out_features={self.out_features}"


def sinusoidal_embedding(positions: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal code of (possibly fractional) positions: ``[...]`` -> ``[..., dim]`` (cos | sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * freqs  # [..., half]
    code = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        code = torch.nn.functional.pad(code, (0, 1))
    return code


class StateEncoder(nn.Module):
    """Per-embodiment MLP ``S_max -> hidden -> width`` (ReLU): the DiT's state token."""

    def __init__(self, num_embodiments: int, max_state_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layer1 = EmbodimentLinear(num_embodiments, max_state_dim, hidden_dim)
        self.layer2 = EmbodimentLinear(num_embodiments, hidden_dim, out_dim)

    def forward(self, state: torch.Tensor, embodiment: torch.Tensor | EmbodimentGroups) -> torch.Tensor:
        # state [B, ..., S_max] -> [B, ..., out_dim]
        groups = as_groups(embodiment)
        return self.layer2(torch.relu(self.layer1(state, groups)), groups)


class ActionEncoder(nn.Module):
    """Per-embodiment action encoder that also sees the flow time (paper: "encodes the diffusion timestep together
    with the noised action vector"): ``a -> W1 -> w``; ``[W1 a, sin(tau)] -> W2 -> swish -> W3 -> w``."""

    def __init__(self, num_embodiments: int, max_action_dim: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.layer1 = EmbodimentLinear(num_embodiments, max_action_dim, width)
        self.layer2 = EmbodimentLinear(num_embodiments, 2 * width, width)
        self.layer3 = EmbodimentLinear(num_embodiments, width, width)

    def forward(self, actions: torch.Tensor, time_bucket: torch.Tensor, embodiment: torch.Tensor | EmbodimentGroups) -> torch.Tensor:
        # actions [B, H, A_max], time_bucket [B] (discretised flow time) -> [B, H, width]
        groups = as_groups(embodiment)
        a = self.layer1(actions, groups)  # [B, H, w]
        tau = sinusoidal_embedding(time_bucket, self.width).to(a.dtype)[:, None].expand_as(a)  # [B, H, w]
        h = self.layer2(torch.cat([a, tau], dim=-1), groups)  # [B, H, w]
        return self.layer3(nn.functional.silu(h), groups)


class ActionDecoder(nn.Module):
    """Per-embodiment MLP ``in -> hidden -> A_max`` (ReLU) applied to the DiT's action tokens."""

    def __init__(self, num_embodiments: int, in_dim: int, hidden_dim: int, max_action_dim: int) -> None:
        super().__init__()
        self.layer1 = EmbodimentLinear(num_embodiments, in_dim, hidden_dim)
        self.layer2 = EmbodimentLinear(num_embodiments, hidden_dim, max_action_dim)

    def forward(self, x: torch.Tensor, embodiment: torch.Tensor | EmbodimentGroups) -> torch.Tensor:
        # x [B, H, in] -> [B, H, A_max]
        groups = as_groups(embodiment)
        return self.layer2(torch.relu(self.layer1(x, groups)), groups)


def expand_embodiments(module: nn.Module, num_embodiments: int) -> None:
    """Grow every ``EmbodimentLinear`` inside ``module`` to ``num_embodiments`` slots (old slots bit-identical)."""
    for layer in module.modules():
        if isinstance(layer, EmbodimentLinear):
            layer.expand(num_embodiments)


def grow_embodiment_slots(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make a state dict with fewer embodiment slots than ``module`` loadable into it, in place: each adapter
    tensor's slots fill the first rows bit-identically and the extra rows keep ``module``'s own (fresh) values, as
    ``expand_embodiments`` would leave them. For a robot added at post-training (``num_embodiments`` raised)."""
    for key, theirs in state.items():
        name, _, param = key.rpartition(".")
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            continue  # not in this module: load_state_dict reports it
        if not isinstance(layer, EmbodimentLinear):
            continue
        own = getattr(layer, param)
        if theirs.shape[0] < own.shape[0] and theirs.shape[1:] == own.shape[1:]:
            merged = own.detach().clone()
            merged[: theirs.shape[0]] = theirs
            state[key] = merged
