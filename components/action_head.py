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

The VL attention mask is honoured (the released N1 code ignores it; ``use_vl_mask=False`` reproduces that). A sample whose VL mask is all False gets a zero
cross-attention output in every cross block (its actions then depend on state and time only) and never NaN.

GR00T N1.5 is configuration of the same head: ``vl_layer_norm`` and ``vl_self_attention_layers`` process the VL
tokens (LayerNorm, then self-attention blocks without time conditioning, masked like the cross blocks) once per call,
before the DiT, and ``num_future_tokens`` learned tokens sit between the state token and the action tokens:
``[state, future_1..F, action_1..H]``. The options ``time_code_layout``, ``time_frequency_shift``,
``output_norm_eps`` and ``max_seq_len`` reproduce Isaac-GR00T's numerics for imported weights (``vla_zoo.groot``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from diffusers.models.embeddings import TimestepEmbedding as DiffusersTimestepEmbedding
from diffusers.models.embeddings import Timesteps
from torch.utils.checkpoint import checkpoint

from components.embodiment import (
    ActionDecoder,
    ActionEncoder,
    EmbodimentGroups,
    StateEncoder,
    expand_embodiments,
)
from components.lora import LoRA, add_lora

#: The DiT linears that ``lora`` wraps unless told otherwise: attention projections and the feed-forward.
DIT_LORA_TARGETS = ("to_q", "to_kv", "to_out", "ff.0", "ff.3")


class TimestepEmbedding(nn.Module):
    """Discretised flow time -> sinusoidal code -> MLP -> ``[B, width]`` (the adaLN conditioning vector).

    diffusers' ``Timesteps`` gives the code ``[cos(b f), sin(b f)]``, ``f_i = 10000^(-i / (half - frequency_shift))``,
    and its ``TimestepEmbedding`` the MLP ``linear_1 -> SiLU -> linear_2``. Isaac-GR00T's DiT uses
    ``frequency_shift = 1``.
    """

    def __init__(self, width: int, frequency_dim: int = 256, frequency_shift: float = 0.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_proj = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=frequency_shift)
        self.timestep_embedder = DiffusersTimestepEmbedding(frequency_dim, width)

    def forward(self, time_bucket: torch.Tensor) -> torch.Tensor:  # [B] -> [B, width]
        code = self.time_proj(time_bucket).to(self.timestep_embedder.linear_1.weight.dtype)  # [B, frequency_dim]
        return self.timestep_embedder(code)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints written before the diffusers modules name the MLP ``mlp.0`` / ``mlp.2``
        for old, new in (("mlp.0.", "timestep_embedder.linear_1."), ("mlp.2.", "timestep_embedder.linear_2.")):
            for name in ("weight", "bias"):
                if prefix + old + name in state_dict:
                    state_dict[prefix + new + name] = state_dict.pop(prefix + old + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
    """adaLN -> one attention (cross to VL tokens, or self over state+action tokens) -> LN -> FFN 4x GELU(tanh).

    ``time_conditioned=False`` makes it a plain pre-LN transformer block (affine LayerNorms, no adaLN): N1.5's
    self-attention over the VL tokens.
    """

    def __init__(self, dim: int, num_heads: int, cross_attention_dim: int | None = None, dropout: float = 0.0,
                 ff_mult: int = 4, time_conditioned: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.is_cross = cross_attention_dim is not None
        self.time_conditioned = time_conditioned
        self.norm1 = AdaLayerNorm(dim) if time_conditioned else nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(cross_attention_dim or dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not time_conditioned)
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
                scale_shift: torch.Tensor | None = None, self_attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, N, D], temb [B, D] (or the adaLN scale_shift [B, 2D] computed beforehand);
        # self_attn_mask [B, 1, 1, N] bool (keys a self-attention may read), None = all
        h = self.norm1(x, temb, scale_shift) if self.time_conditioned else self.norm1(x)
        q = self._heads(self.to_q(h))
        if self.is_cross:
            k, v = cached_kv if cached_kv is not None else self.keys_values(context.tokens)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=context.attn_mask) * context.has_tokens
        else:
            k, v = self.keys_values(h)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=self_attn_mask)
        x = x + self.dropout(self.to_out(a.transpose(1, 2).flatten(2)))
        return x + self.dropout(self.ff(self.norm2(x)))


class FlowMatchingActionHead(nn.Module):
    """GR00T N1's System 1: embodiment adapters around a flow-matching DiT (module docstring has the equations).

    N1 sizes: ``hidden_dim=1536, num_layers=16, num_heads=32, horizon=16, max_state_dim=64, max_action_dim=32,
    num_embodiments=32, embodiment_hidden_dim=1024``. ``cross_attention_dim`` is the width of the VL tokens.
    N1.5 adds ``vl_layer_norm=True, vl_self_attention_layers=4, vl_self_attention_heads=32, num_future_tokens=32``
    with ``cross_attention_dim=2048`` (``recipes/groot/``).

    Isaac-GR00T numerics (defaults keep this head's own): ``time_code_layout="sin_cos"`` (action encoder's time code),
    ``time_frequency_shift=1`` (DiT time embedding), ``output_norm_eps=1e-6`` (output adaLN), ``max_seq_len``
    (rows of the action position table; default ``horizon``).

    Fine-tuning, as Isaac-GR00T names it: ``tune_projector`` trains the embodiment adapters and the position table,
    ``tune_diffusion_model`` the DiT (time embedding, blocks, output norm and projection); frozen parts stay in eval
    mode. ``lora`` wraps the DiT blocks' linears with peft LoRA adapters (``components.lora``) and needs
    ``tune_diffusion_model=False``: the adapters train, the DiT weights stay as loaded.

    ``use_vl_mask=False`` attends to padded VL tokens too, as the released N1 code does (an ablation, not a
    recommendation). ``compile_backend`` (e.g. ``inductor``) compiles the DiT blocks in place
    (``nn.Module.compile``: state-dict keys and checkpoints unchanged); the embodiment adapters stay eager, as their
    grouping by embodiment depends on the batch's data. None runs everything eagerly.
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
        vl_layer_norm: bool = False,
        vl_self_attention_layers: int = 0,
        vl_self_attention_heads: int | None = None,
        num_future_tokens: int = 0,
        time_code_layout: str = "cos_sin",
        time_frequency_shift: float = 0.0,
        output_norm_eps: float = 1e-5,
        max_seq_len: int | None = None,
        tune_projector: bool = True,
        tune_diffusion_model: bool = True,
        lora: LoRA | None = None,
        use_vl_mask: bool = True,
        compile_backend: str | None = None,
    ) -> None:
        super().__init__()
        if max_seq_len is not None and max_seq_len < horizon:
            raise ValueError(f"max_seq_len ({max_seq_len}) must be >= horizon ({horizon}): one position per action step")
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
        self.action_encoder = ActionEncoder(num_embodiments, max_action_dim, hidden_dim, time_code_layout)
        self.position_embedding = nn.Parameter(torch.randn(max_seq_len or horizon, hidden_dim) * 0.02)  # [>= H, D]
        self.timestep_embedding = TimestepEmbedding(hidden_dim, frequency_shift=time_frequency_shift)
        # N1.5: the VL tokens pass a LayerNorm and self-attention blocks (no time conditioning) before the DiT
        self.vl_norm = nn.LayerNorm(cross_attention_dim) if vl_layer_norm else None
        self.vl_blocks = nn.ModuleList(
            DiTBlock(cross_attention_dim, vl_self_attention_heads or num_heads, None, dropout, time_conditioned=False)
            for _ in range(vl_self_attention_layers)
        )
        # N1.5: learned tokens between the state token and the action tokens
        self.future_tokens = nn.Parameter(torch.randn(num_future_tokens, hidden_dim) * 0.02) if num_future_tokens else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_dim, num_heads, cross_attention_dim if (not interleave or i % 2 == 0) else None, dropout)
            for i in range(num_layers)
        )
        self.norm_out = AdaLayerNorm(hidden_dim, eps=output_norm_eps)
        self.proj_out = nn.Linear(hidden_dim, embodiment_hidden_dim)
        self.action_decoder = ActionDecoder(num_embodiments, embodiment_hidden_dim, embodiment_hidden_dim, max_action_dim)

        self.tune = {"projector": tune_projector, "diffusion_model": tune_diffusion_model}
        for name, parts in self.tunable_parts().items():
            for part in parts:
                part.requires_grad_(self.tune[name])
        if lora is not None:
            if tune_diffusion_model:
                raise ValueError("action head: lora trains adapters on frozen DiT weights; set tune_diffusion_model: "
                                 "false with it (or drop lora to train the whole DiT)")
            add_lora(self.blocks, lora, DIT_LORA_TARGETS)
        self.use_vl_mask = use_vl_mask
        if compile_backend:
            for block in self.blocks:
                block.compile(backend=compile_backend)

    def tunable_parts(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        """What ``tune_projector`` and ``tune_diffusion_model`` switch (the N1.5 VL layers and future tokens always
        train, as in the reference)."""
        return {
            "projector": [self.state_encoder, self.action_encoder, self.action_decoder, self.position_embedding],
            "diffusion_model": [self.timestep_embedding, self.blocks, self.norm_out, self.proj_out],
        }

    def train(self, mode: bool = True) -> FlowMatchingActionHead:
        """Frozen parts without trainable parameters (no LoRA adapters) stay in eval mode: no dropout there."""
        super().train(mode)
        for name, parts in self.tunable_parts().items():
            for part in parts:
                if isinstance(part, nn.Module) and not self.tune[name] and not any(
                        p.requires_grad for p in part.parameters()):
                    part.eval()
        return self

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

    def _run_block(self, block: DiTBlock, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _vl_context(self, vl_tokens: torch.Tensor, vl_mask: torch.Tensor) -> VLContext:
        """The VL conditioning: N1.5's LayerNorm and masked self-attention over the tokens (if configured)."""
        if not self.use_vl_mask:
            vl_mask = torch.ones_like(vl_mask)  # [B, S] all True: padded tokens are attended too
        context = VLContext.build(vl_tokens, vl_mask)
        if self.vl_norm is None and not len(self.vl_blocks):
            return context
        tokens = self.vl_norm(vl_tokens) if self.vl_norm is not None else vl_tokens  # [B, S, D_vl]
        for block in self.vl_blocks:
            tokens = self._run_block(block, tokens, None, None, None, None, context.attn_mask)
        context.tokens = tokens
        return context

    def _velocity(self, noisy_actions: torch.Tensor, time_bucket: torch.Tensor, state_token: torch.Tensor | None,
                  context: VLContext, groups: EmbodimentGroups,
                  scale_shifts: list[torch.Tensor] | None = None) -> torch.Tensor:
        # noisy_actions [B, H, A_max], time_bucket [B], state_token [B, 1, D] | None -> velocity [B, H, A_max]
        # scale_shifts: per block (then the output norm) the adaLN [B, 2D] of this time, if computed beforehand
        B, H = noisy_actions.shape[:2]
        temb = self.timestep_embedding(time_bucket) if scale_shifts is None else None  # [B, D]
        x = self.action_encoder(noisy_actions, time_bucket, groups) + self.position_embedding[:H]  # [B, H, D]
        if self.future_tokens is not None:
            x = torch.cat([self.future_tokens.to(x.dtype).expand(B, -1, -1), x], dim=1)  # [B, F + H, D]
        if state_token is not None:
            x = torch.cat([state_token, x], dim=1)  # [B, 1 (+ F) + H, D]
        for i, block in enumerate(self.blocks):
            cached = context.kv[i] if context.kv is not None else None
            ss = scale_shifts[i] if scale_shifts is not None else None
            x = self._run_block(block, x, temb, context, cached, ss)
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
        return self._velocity(noisy_actions, self.time_bucket(t), state_token, self._vl_context(vl_tokens, vl_mask), groups)

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
               use_kv_cache: bool = True, initial_noise: torch.Tensor | None = None) -> torch.Tensor:
        """K-step Euler integration from noise to an action chunk ``[B, H, A_max]`` (call ``eval()`` first).

        ``initial_noise`` ``[B, H, A_max]`` is ``A^0`` when given (else drawn from N(0, I) with ``generator``).
        With ``use_kv_cache`` the cross-attention keys/values of the VL tokens, which do not depend on the flow
        time, are computed once and reused by all K steps. Either way the time conditioning of all K steps is
        computed up front (``time_conditioning``).
        """
        self._check_inputs(vl_tokens, state, embodiment_id)
        K = num_steps or self.num_inference_steps
        B = vl_tokens.shape[0]
        shape = (B, self.horizon, self.max_action_dim)
        if initial_noise is not None and tuple(initial_noise.shape) != shape:
            raise ValueError(f"initial_noise must have shape [B, horizon, max_action_dim] = {list(shape)}, "
                             f"got {tuple(initial_noise.shape)}")
        groups = EmbodimentGroups.from_ids(embodiment_id)
        context = self._vl_context(vl_tokens, vl_mask)
        if use_kv_cache:
            context.kv = [blk.keys_values(context.tokens) if blk.is_cross else None for blk in self.blocks]
        state_token = self._state_token(state, groups)
        if initial_noise is None:  # A^0 ~ N(0, I)
            x = torch.randn(shape, generator=generator, device=vl_tokens.device, dtype=vl_tokens.dtype)
        else:
            x = initial_noise.to(device=vl_tokens.device, dtype=vl_tokens.dtype)
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
