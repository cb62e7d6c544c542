"""System 1 of GR00T N1: a flow-matching Diffusion Transformer (DiT) action head (paper Sec. 2.1).

Token sequence: ``[state token, H action tokens]``. The state goes through the embodiment's state encoder; the noisy
action chunk and its flow time through the embodiment's action encoder, plus a learned position per horizon step.
Each DiT block has ONE attention: with ``interleave=True`` even blocks cross-attend to the vision-language (VL)
tokens and odd blocks self-attend over the state and action tokens (Flamingo/VIMA style); ``interleave=False``
cross-attends in every block (an ablation; tokens then never see each other). The flow time conditions every block
through adaLN on the attention norm, and the output norm is modulated too. The embodiment's action decoder maps the
last H tokens to a velocity ``[B, H, A_max]``.

Flow matching (t = 1 is the clean chunk, t = 0 pure noise):
    A^t = t A + (1 - t) eps,  eps ~ N(0, I)
    target velocity  dA^t/dt = A - eps
    L = E_t || V(phi, A^t, q) - (A - eps) ||^2   (mean over real action dims and real horizon steps only)
The paper's Eq. 1 writes the target as eps - A, which contradicts its own Euler update below; A - eps is the
velocity that the update integrates, as in the released code.
    t = s (1 - u), u ~ Beta(1.5, 1), s = 0.999   (paper: p(t) = Beta((s - t)/s; 1.5, 1); favours the noisy end,
    never samples t > s; the released code's (s - u)/s differs slightly and can give t < 0)
Sampling: A^0 ~ N(0, I);  A^{t + 1/K} = A^t + (1/K) V(phi, A^t, q) for t = 0, 1/K, ..., (K-1)/K.

The VL attention mask is honoured (the released N1 code ignores it). A sample whose VL mask is all False gets a zero
cross-attention output in every cross block (its actions then depend on state and time only) and never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from components.embodiment import (
    ActionDecoder,
    ActionEncoder,
    EmbodimentGroups,
    StateEncoder,
    expand_embodiments,
    sinusoidal_embedding,
)


class TimestepEmbedding(nn.Module):
    """Discretised flow time -> sinusoidal code -> MLP -> ``[B, width]`` (the adaLN conditioning vector)."""

    def __init__(self, width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, time_bucket: torch.Tensor) -> torch.Tensor:  # [B] -> [B, width]
        code = sinusoidal_embedding(time_bucket, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(code)


class AdaLayerNorm(nn.Module):
    """``LN(x) (1 + scale) + shift`` with ``(scale, shift) = Linear(SiLU(c))``; starts as a plain LayerNorm."""

    def __init__(self, dim: int, cond_dim: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.modulation = nn.Linear(cond_dim or dim, 2 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def scale_shift(self, cond: torch.Tensor) -> torch.Tensor:  # cond [..., C] -> [..., 2D]
        return self.modulation(F.silu(cond))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, scale_shift: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, N, D], cond [B, C]; or scale_shift [B, 2D] computed beforehand (then cond is not read)
        if scale_shift is None:
            scale_shift = self.scale_shift(cond)
        scale, shift = scale_shift[:, None].chunk(2, dim=-1)  # [B, 1, D] each
        return self.norm(x) * (1 + scale) + shift


@dataclass
class VLContext:
    """The VL conditioning of one forward/sample call, prepared once for all blocks (and all Euler steps)."""

    tokens: torch.Tensor  # [B, S, D_vl]
    attn_mask: torch.Tensor  # [B, 1, 1, S] bool, True = attend; rows with no valid token attend everywhere ...
    has_tokens: torch.Tensor  # [B, 1, 1, 1] ... and their attention output is zeroed by this gate
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None  # per block cached cross (K, V), or None

    @classmethod
    def build(cls, tokens: torch.Tensor, mask: torch.Tensor) -> VLContext:
        if mask.shape != tokens.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(
                f"vl_mask must be a bool tensor of shape [B, S] = {tuple(tokens.shape[:2])}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        has_tokens = mask.any(dim=1)  # [B]
        # An all-False row would make softmax 0/0; let it attend to everything and gate the result to zero.
        attn_mask = (mask | ~has_tokens[:, None])[:, None, None, :]
        return cls(tokens, attn_mask, has_tokens[:, None, None, None].to(tokens.dtype))


class DiTBlock(nn.Module):
    """adaLN -> one attention (cross to VL tokens, or self over state+action tokens) -> LN -> FFN 4x GELU(tanh)."""

    def __init__(self, dim: int, num_heads: int, cross_attention_dim: int | None = None, dropout: float = 0.0, ff_mult: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.is_cross = cross_attention_dim is not None
        self.norm1 = AdaLayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(cross_attention_dim or dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, heads, N, D/heads]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # source [B, N, D_src] -> K, V [B, heads, N, D/heads]
        k, v = self.to_kv(source).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None, context: VLContext | None = None,
                cached_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                scale_shift: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, N, D], temb [B, D] (or the adaLN scale_shift [B, 2D] computed beforehand)
        h = self.norm1(x, temb, scale_shift)
        q = self._heads(self.to_q(h))
        if self.is_cross:
            k, v = cached_kv if cached_kv is not None else self.keys_values(context.tokens)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=context.attn_mask) * context.has_tokens
        else:
            k, v = self.keys_values(h)
            a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.dropout(self.to_out(a.transpose(1, 2).flatten(2)))
        return x + self.dropout(self.ff(self.norm2(x)))


class FlowMatchingActionHead(nn.Module):
    """GR00T N1's System 1: embodiment adapters around a flow-matching DiT (module docstring has the equations).

    N1 sizes: ``hidden_dim=1536, num_layers=16, num_heads=32, horizon=16, max_state_dim=64, max_action_dim=32,
    num_embodiments=32, embodiment_hidden_dim=1024``. ``cross_attention_dim`` is the width of the VL tokens.
    """

    def __init__(
        self,
        num_embodiments: int,
        max_state_dim: int,
        max_action_dim: int,
        horizon: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        cross_attention_dim: int,
        interleave: bool = True,
        dropout: float = 0.2,
        embodiment_hidden_dim: int = 1024,
        num_inference_steps: int = 4,
        noise_beta_alpha: float = 1.5,
        noise_beta_beta: float = 1.0,
        noise_s: float = 0.999,
        num_timestep_buckets: int = 1000,
        gradient_checkpointing: bool = False,
        use_state: bool = True,
    ) -> None:
        super().__init__()
        # False: no state token; the head acts on what it sees and is told only (the "no proprioception" ablation:
        # with few demonstrations the hand's path can tell which demonstration to copy, so the scene gets ignored).
        self.use_state = use_state
        self.max_state_dim, self.max_action_dim, self.horizon = max_state_dim, max_action_dim, horizon
        self.cross_attention_dim = cross_attention_dim
        self.num_inference_steps = num_inference_steps
        self.noise_beta_alpha, self.noise_beta_beta, self.noise_s = noise_beta_alpha, noise_beta_beta, noise_s
        self.num_timestep_buckets = num_timestep_buckets
        self.gradient_checkpointing = gradient_checkpointing

        self.state_encoder = StateEncoder(num_embodiments, max_state_dim, embodiment_hidden_dim, hidden_dim)
        self.action_encoder = ActionEncoder(num_embodiments, max_action_dim, hidden_dim)
        self.position_embedding = nn.Parameter(torch.randn(horizon, hidden_dim) * 0.02)  # [H, D]
        self.timestep_embedding = TimestepEmbedding(hidden_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_dim, num_heads, cross_attention_dim if (not interleave or i % 2 == 0) else None, dropout)
            for i in range(num_layers)
        )
        self.norm_out = AdaLayerNorm(hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, embodiment_hidden_dim)
        self.action_decoder = ActionDecoder(num_embodiments, embodiment_hidden_dim, embodiment_hidden_dim, max_action_dim)

    @property
    def num_embodiments(self) -> int:
        return self.action_decoder.layer2.num_embodiments

    def expand_embodiments(self, num_embodiments: int) -> None:
        """Add fresh embodiment slots (e.g. a new robot on a trained checkpoint); existing slots stay bit-identical."""
        expand_embodiments(self, num_embodiments)

    # ---------------------------------------------------------------------------------------------------------
    def time_bucket(self, t: torch.Tensor) -> torch.Tensor:
        """Flow time in [0, 1] -> integer bucket in [0, num_timestep_buckets) used by both time embeddings."""
        return (t * self.num_timestep_buckets).long().clamp_(0, self.num_timestep_buckets - 1)

    def sample_time(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """t = s (1 - u), u ~ Beta(alpha, beta): the paper's p(t) = Beta((s - t)/s; 1.5, 1)."""
        beta = torch.distributions.Beta(
            torch.tensor(self.noise_beta_alpha, device=device), torch.tensor(self.noise_beta_beta, device=device)
        )
        return self.noise_s * (1.0 - beta.sample((batch_size,)))

    def _check_inputs(self, vl_tokens, state, embodiment_id) -> None:
        B = vl_tokens.shape[0]
        if vl_tokens.dim() != 3 or vl_tokens.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"vl_tokens must be [B, S, cross_attention_dim = {self.cross_attention_dim}], got "
                f"{tuple(vl_tokens.shape)}: set the head's cross_attention_dim to the backbone's out_dim"
            )
        if embodiment_id.shape != (B,):
            raise ValueError(f"embodiment_id must have shape [B] = [{B}], got {tuple(embodiment_id.shape)}")
        if state is not None and state.shape != (B, self.max_state_dim):
            raise ValueError(
                f"state must have shape [B, max_state_dim] = [{B}, {self.max_state_dim}] (zero-padded) or be None, "
                f"got {tuple(state.shape)}"
            )

    def _state_token(self, state: torch.Tensor | None, groups: EmbodimentGroups) -> torch.Tensor | None:
        # state [B, S_max] | None -> [B, 1, D] | None
        if state is None or not self.use_state:
            return None
        return self.state_encoder(state[:, None], groups)

    def _velocity(self, noisy_actions: torch.Tensor, time_bucket: torch.Tensor, state_token: torch.Tensor | None,
                  context: VLContext, groups: EmbodimentGroups,
                  scale_shifts: list[torch.Tensor] | None = None) -> torch.Tensor:
        # noisy_actions [B, H, A_max], time_bucket [B], state_token [B, 1, D] | None -> velocity [B, H, A_max]
        # scale_shifts: per block (then the output norm) the adaLN [B, 2D] of this time, if computed beforehand
        H = noisy_actions.shape[1]
        temb = self.timestep_embedding(time_bucket) if scale_shifts is None else None  # [B, D]
        x = self.action_encoder(noisy_actions, time_bucket, groups) + self.position_embedding[:H]  # [B, H, D]
        if state_token is not None:
            x = torch.cat([state_token, x], dim=1)  # [B, 1 + H, D]
        for i, block in enumerate(self.blocks):
            cached = context.kv[i] if context.kv is not None else None
            ss = scale_shifts[i] if scale_shifts is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, temb, context, cached, ss, use_reentrant=False)
            else:
                x = block(x, temb, context, cached, ss)
        ss = scale_shifts[-1] if scale_shifts is not None else None
        x = self.proj_out(self.norm_out(x, temb, ss)[:, -H:])  # [B, H, embodiment_hidden]
        return self.action_decoder(x, groups)

    def time_conditioning(self, time_bucket: torch.Tensor) -> list[torch.Tensor]:
        """adaLN scale/shift of every block, then of the output norm, for flow times ``time_bucket`` ``[..., B]``:
        a list of ``[..., B, 2D]``. Sampling computes all K Euler steps' at once: the time grid is known before the
        first step, and one matmul over K rows reads each adaLN weight once instead of K times (batch-1 inference
        is bound by reading weights)."""
        temb = self.timestep_embedding(time_bucket.flatten()).view(*time_bucket.shape, -1)  # [..., B, D]
        return [block.norm1.scale_shift(temb) for block in self.blocks] + [self.norm_out.scale_shift(temb)]

    def forward(self, noisy_actions: torch.Tensor, t: torch.Tensor, vl_tokens: torch.Tensor, vl_mask: torch.Tensor,
                state: torch.Tensor | None, embodiment_id: torch.Tensor) -> torch.Tensor:
        """Predicted velocity ``V(phi, A^t, q)``: ``[B, H, A_max]`` for flow times ``t`` ``[B]``."""
        self._check_inputs(vl_tokens, state, embodiment_id)
        if noisy_actions.shape[1] > self.horizon or noisy_actions.shape[2] != self.max_action_dim:
            raise ValueError(
                f"actions must be [B, H <= {self.horizon}, max_action_dim = {self.max_action_dim}], "
                f"got {tuple(noisy_actions.shape)}"
            )
        groups = EmbodimentGroups.from_ids(embodiment_id)
        state_token = self._state_token(state, groups)
        return self._velocity(noisy_actions, self.time_bucket(t), state_token, VLContext.build(vl_tokens, vl_mask), groups)

    def loss(self, vl_tokens: torch.Tensor, vl_mask: torch.Tensor, state: torch.Tensor | None, actions: torch.Tensor,
             action_mask: torch.Tensor, embodiment_id: torch.Tensor, noise: torch.Tensor | None = None,
             t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Masked flow-matching loss. ``noise`` [B, H, A_max] and ``t`` [B] may be given (tests); else sampled."""
        if action_mask.shape != actions.shape:
            raise ValueError(f"action_mask shape {tuple(action_mask.shape)} != actions shape {tuple(actions.shape)}")
        actions = actions.masked_fill(~action_mask, 0.0)  # padded contents never reach the model
        noise = torch.randn_like(actions) if noise is None else noise
        t = self.sample_time(actions.shape[0], actions.device) if t is None else t
        t_ = t.to(actions.dtype)[:, None, None]
        noisy = t_ * actions + (1 - t_) * noise  # A^t = t A + (1 - t) eps
        target = actions - noise  # dA^t/dt
        pred = self(noisy, t, vl_tokens, vl_mask, state, embodiment_id)
        return masked_mse(pred, target, action_mask)

    @torch.no_grad()
    def sample(self, vl_tokens: torch.Tensor, vl_mask: torch.Tensor, state: torch.Tensor | None,
               embodiment_id: torch.Tensor, num_steps: int | None = None, generator: torch.Generator | None = None,
               use_kv_cache: bool = True) -> torch.Tensor:
        """K-step Euler integration from noise to an action chunk ``[B, H, A_max]`` (call ``eval()`` first).

        With ``use_kv_cache`` the cross-attention keys/values of the VL tokens, which do not depend on the flow
        time, are computed once and reused by all K steps. Either way the time conditioning of all K steps is
        computed up front (``time_conditioning``).
        """
        self._check_inputs(vl_tokens, state, embodiment_id)
        K = num_steps or self.num_inference_steps
        B = vl_tokens.shape[0]
        groups = EmbodimentGroups.from_ids(embodiment_id)
        context = VLContext.build(vl_tokens, vl_mask)
        if use_kv_cache:
            context.kv = [blk.keys_values(vl_tokens) if blk.is_cross else None for blk in self.blocks]
        state_token = self._state_token(state, groups)
        x = torch.randn(B, self.horizon, self.max_action_dim, generator=generator, device=vl_tokens.device,
                        dtype=vl_tokens.dtype)  # A^0 ~ N(0, I)
        t = (torch.arange(K, device=x.device, dtype=torch.float32) / K)[:, None].expand(K, B)  # [K, B]: 0, 1/K, ...
        buckets = self.time_bucket(t)
        scale_shifts = self.time_conditioning(buckets)  # per block [K, B, 2D]
        for k in range(K):
            step_ss = [ss[k] for ss in scale_shifts]
            v = self._velocity(x, buckets[k], state_token, context, groups, step_ss)
            x = x + v / K  # A^{t+1/K} = A^t + V/K
        return x


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean squared error over the True entries of ``mask`` ([B, H, A]): batch ``loss`` and ``per_sample`` [B].

    ``loss`` averages over all real entries of the batch (so samples with more real dims weigh more, as in N1);
    samples without any real entry (actionless) contribute nothing and get ``per_sample = 0``.
    """
    sq = torch.where(mask, (pred - target).square(), 0.0)  # where, not *: NaN in padding must not leak
    sum_per_sample, count = sq.sum(dim=(1, 2)), mask.sum(dim=(1, 2)).to(pred.dtype)
    return {"loss": sq.sum() / count.sum().clamp(min=1), "per_sample": sum_per_sample / count.clamp(min=1)}
