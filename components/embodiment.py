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

    Each slot is its own parameter (``weights.e`` ``[in, out]``, ``x @ W`` layout; ``biases.e`` ``[out]``),
    initialised like ``nn.Linear``. One ``[E, in, out]`` tensor (the released code's layout) would get a dense
    gradient for every slot on every step: at N1 sizes that is 1.26 GB of zeros stacked per step (a quarter of the
    head's train-step time on CPU, measured by ``benchmarks/action_head.py``), and AdamW would then keep moving the
    weights of robots that are not in the batch. With a parameter per slot, slots absent from the batch get no
    gradient, so post-training one robot leaves every other robot's weights bit-identical. Under DDP that means
    unused parameters: use ``strategy: ddp_find_unused_parameters_true`` (as ``recipes/n1.yaml`` does).

    Checkpoints written with the dense layout (``weight`` ``[E, in, out]``, ``bias`` ``[E, out]``) still load.
    """

    def __init__(self, num_embodiments: int, in_features: int, out_features: int) -> None:
        super().__init__()
        if num_embodiments < 1:
            raise ValueError(f"num_embodiments must be >= 1, got {num_embodiments}")
        self.in_features, self.out_features = in_features, out_features
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.expand(num_embodiments)

    @property
    def num_embodiments(self) -> int:
        return len(self.weights)

    @torch.no_grad()
    def expand(self, num_embodiments: int) -> None:
        """Append freshly initialised slots up to ``num_embodiments``; existing slots stay bit-identical.

        Adds parameters, so build the optimizer after expanding.
        """
        old = self.num_embodiments
        if num_embodiments < old:
            raise ValueError(f"cannot shrink EmbodimentLinear from {old} to {num_embodiments} slots")
        like = self.weights[0] if old else torch.empty(0)
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
        for _ in range(old, num_embodiments):
            w = like.new_empty(self.in_features, self.out_features).uniform_(-bound, bound)
            b = like.new_empty(self.out_features).uniform_(-bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    @torch.no_grad()
    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of all slots in the dense layout: weight ``[E, in, out]``, bias ``[E, out]``."""
        return torch.stack(list(self.weights)), torch.stack(list(self.biases))

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
            return torch.matmul(x, self.weights[e]) + self.biases[e]
        lead = x.shape[1:-1]
        rows = x.index_select(0, groups.order).split(groups.counts)  # per group [n_e, ..., in]
        out = [
            torch.addmm(self.biases[e], r.reshape(-1, self.in_features), self.weights[e]).view(r.shape[0], *lead, self.out_features)
            for e, r in zip(groups.slots, rows)
        ]
        return torch.cat(out).index_select(0, groups.inverse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        split_dense_slots(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_embodiments={self.num_embodiments}, in_features={self.in_features}, out_features={self.out_features}"


def split_dense_slots(state: dict[str, torch.Tensor], prefix: str) -> None:
    """Rewrite an ``EmbodimentLinear``'s dense-layout entries (``prefix + "weight"`` ``[E, in, out]``, ``"bias"``
    ``[E, out]``, as checkpoints before per-slot parameters stored them) into per-slot entries, in place."""
    for dense, per_slot in (("weight", "weights"), ("bias", "biases")):
        tensor = state.pop(prefix + dense, None)
        if tensor is not None:
            for e, slot in enumerate(tensor.unbind(0)):
                state[f"{prefix}{per_slot}.{e}"] = slot.clone()


TIME_CODE_LAYOUTS = ("cos_sin", "sin_cos")


def sinusoidal_embedding(positions: torch.Tensor, dim: int, max_period: float = 10000.0,
                         layout: str = "cos_sin") -> torch.Tensor:
    """Transformer sinusoidal code of (possibly fractional) positions: ``[...]`` -> ``[..., dim]``.

    Frequencies ``f_i = max_period^(-i / half)``, ``i < half = dim // 2``. ``layout="cos_sin"`` gives
    ``[cos(p f), sin(p f)]``; ``"sin_cos"`` gives ``[sin(p f), cos(p f)]`` with ``f_i = exp(-i ln(max_period) / half)``
    rounded in the order Isaac-GR00T's action encoder rounds it (fp32 step first), so imported weights see the same
    code bit for bit.
    """
    half = dim // 2
    steps = torch.arange(half, device=positions.device, dtype=torch.float32)
    if layout == "cos_sin":
        freqs = torch.exp(-math.log(max_period) * steps / half)
    elif layout == "sin_cos":
        freqs = torch.exp(-steps * (torch.log(torch.tensor(max_period)) / half).to(positions.device))
    else:
        raise ValueError(f"sinusoidal layout must be one of {TIME_CODE_LAYOUTS}, got {layout!r}")
    angles = positions.float()[..., None] * freqs  # [..., half]
    pair = (torch.cos(angles), torch.sin(angles)) if layout == "cos_sin" else (torch.sin(angles), torch.cos(angles))
    code = torch.cat(pair, dim=-1)
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
    with the noised action vector"): ``a -> W1 -> w``; ``[W1 a, sin(tau)] -> W2 -> swish -> W3 -> w``.

    ``time_code_layout`` orders the sinusoidal code of tau (``sinusoidal_embedding``); Isaac-GR00T's is ``"sin_cos"``.
    """

    def __init__(self, num_embodiments: int, max_action_dim: int, width: int, time_code_layout: str = "cos_sin") -> None:
        super().__init__()
        if time_code_layout not in TIME_CODE_LAYOUTS:
            raise ValueError(f"time_code_layout must be one of {TIME_CODE_LAYOUTS}, got {time_code_layout!r}")
        self.width, self.time_code_layout = width, time_code_layout
        self.layer1 = EmbodimentLinear(num_embodiments, max_action_dim, width)
        self.layer2 = EmbodimentLinear(num_embodiments, 2 * width, width)
        self.layer3 = EmbodimentLinear(num_embodiments, width, width)

    def forward(self, actions: torch.Tensor, time_bucket: torch.Tensor, embodiment: torch.Tensor | EmbodimentGroups) -> torch.Tensor:
        # actions [B, H, A_max], time_bucket [B] (discretised flow time) -> [B, H, width]
        groups = as_groups(embodiment)
        a = self.layer1(actions, groups)  # [B, H, w]
        tau = sinusoidal_embedding(time_bucket, self.width, layout=self.time_code_layout).to(a.dtype)[:, None].expand_as(a)  # [B, H, w]
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
    """Make a state dict with fewer embodiment slots than ``module`` loadable into it, in place: the slots it has
    load bit-identically and the extra slots keep ``module``'s own (fresh) values, as ``expand_embodiments`` would
    leave them. For a robot added at post-training (``num_embodiments`` raised)."""
    for name, layer in module.named_modules():
        if not isinstance(layer, EmbodimentLinear):
            continue
        prefix = f"{name}." if name else ""
        split_dense_slots(state, prefix)
        if not any(f"{prefix}weights.{e}" in state for e in range(layer.num_embodiments)):
            continue  # this layer is not in the state dict at all: load_state_dict reports it
        for e in range(layer.num_embodiments):
            for per_slot, params in (("weights", layer.weights), ("biases", layer.biases)):
                state.setdefault(f"{prefix}{per_slot}.{e}", params[e].detach().clone())
