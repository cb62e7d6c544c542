"""Latent-action model: a VQ-VAE over frame pairs (LAPA, as used by GR00T N1 for actionless video; paper Sec. 2.2).

The encoder sees ``(x_t, x_{t+H})`` and emits ``N`` latent tokens of width ``D``; a quantiser snaps them to a
codebook; the decoder sees ``x_t`` and the quantised tokens and reconstructs ``x_{t+H}``. After training the
*pre-quantisation* tokens, normalised by statistics fitted on data, are the flow-matching target of a separate
"latent" embodiment, which is why they are shaped like an action chunk ``[N = H, D <= A_max]``.

The quantiser is injected (``vector_quantize_pytorch.VectorQuantize``, ``FSQ``, or ``None`` for a plain
autoencoder). Anything with ``forward(z [B, N, D]) -> (z_q, indices[, aux_loss])`` works.

``LatentActionObjective`` is the model's training loss, the one used by both the standalone
``lit_modules.latent_action.LatentActionModule`` and the latent-action model co-trained inside a policy's fit
(``components.pseudo_labels.LatentActionLabeler``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from components.distributed import zero_loss
from components.embodiment import EmbodimentLinear


def _transformer(width: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        width, heads, int(width * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)


class PatchEmbed(nn.Module):
    """Frames ``[B, F, C, h, w]`` -> tokens ``[B, F * P, width]`` with learned patch-position and frame embeddings.

    ``F`` indexes views; each gets its own learned embedding so attention can tell one camera from another.
    """

    def __init__(self, image_size: int, patch_size: int, num_frames: int, width: int, in_channels: int = 3) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(1, 1, self.grid**2, width) * 0.02)  # [1, 1, P, W]
        self.frame = nn.Parameter(torch.randn(1, num_frames, 1, width) * 0.02)  # [1, F, 1, W]

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # [B, F, 3, h, w] -> [B, F * P, W]
        b, f = frames.shape[:2]
        x = self.proj(frames.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B * F, P, W]
        x = x.view(b, f, -1, x.shape[-1]) + self.pos + self.frame
        return x.flatten(1, 2)


def shift_matrices(kernels: torch.Tensor, size: int) -> torch.Tensor:
    """1-D displacement distributions ``[..., 2r + 1]`` -> banded ``[..., size, size]`` matrices ``T`` with
    ``T[i, j] = kernel[j - i + r]`` (zero beyond the band): ``T @ x`` moves the content of ``x`` by ``-(tap - r)``
    cells along that axis, and what leaves the map is lost."""
    r = kernels.shape[-1] // 2
    offset = torch.arange(size, device=kernels.device)[None, :] - torch.arange(size, device=kernels.device)[:, None]
    inside = offset.abs() <= r  # [size, size]
    taps = kernels[..., (offset.clamp(-r, r) + r)]  # [..., size, size]
    return taps * inside


def move_by_kernels(feat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Move each sample's maps ``feat [B, C, g, g]`` by each of its K separable kernels, given as 1-D
    distributions over row and column offsets ``rows, cols [B, K, 2r + 1]`` -> ``[B, K, C, g, g]``, zeros entering
    at the edges. Mass 1 at tap ``r + d`` moves content by ``-d`` cells; a spread kernel mixes such moves.

    Separable because a rigid move is (one peak is an outer product), and it makes the move two small matmuls per
    kernel, ``T_rows @ feat @ T_cols^T``: the 2-D depthwise convolution with 17 x 17 kernels it replaces took ~60%
    of the decoder's step on this CPU (its backward alone ~0.3 s at batch 32)."""
    g = feat.shape[-1]
    t_rows, t_cols = shift_matrices(rows, g), shift_matrices(cols, g)  # [B, K, g, g]
    return torch.einsum("bkyi,bcij,bkxj->bkcyx", t_rows, feat, t_cols)


class MotionDecoder(nn.Module):
    """Reconstruct ``x_{t+H}`` by *moving* features of ``x_t`` with displacement kernels the latent predicts.

    CDNA (Finn, Goodfellow & Levine, 2016) in feature space. The latent is turned into ``K`` kernels per view, each
    a pair of softmax distributions over ``2 reach + 1`` row and column offsets on a ``stride``-pixel grid, i.e. a
    distribution over moves of up to ``reach * stride`` pixels. Each kernel moves the whole feature map of ``x_t``;
    per-cell masks, computed by convolutions from the static and moved features, pick which candidate holds at
    each cell; a small up-sampling head turns the composite into the change ``x_{t+H} - x_t``.

    Why: the transformer decoder's tokens carry learned absolute positions, so nothing makes its latent a *move*,
    and on the embedded world a linear probe reads little of the end effector's displacement from it. Here the
    latent reaches the image only through displacement distributions, and everything downstream is convolutional,
    so the latent cannot name a place. The kernels start near uniform rather than peaked: a
    softmax tap's gradient is proportional to its weight, and a peaked start (like a bilinear warp) would never hear
    about moves of more than a cell or two.

    ``kernel="gaussian"``: each kernel is instead a Gaussian bump over the offsets whose centre is a *linear*
    function of the latent (one ``nn.Linear``, no hidden layer) and whose width is learned, starting wide (half the
    reach) for the reason above. The free kernels come out of an MLP and a softmax, so the move they make is a
    nonlinear function of the latent; with a linear centre the move *is* a linear readout of the latent. That helps
    on moving squares and not on the embedded world, so ``free`` stays the default (benchmarks/RESULTS.md, "Latent
    actions from video").
    """

    def __init__(
        self,
        image_size: int,
        num_views: int,
        num_latent_tokens: int,
        latent_dim: int,
        channels: int = 32,
        num_kernels: int = 2,
        stride: int = 4,
        reach: int = 8,
        hidden: int = 256,
        kernel: str = "free",
    ) -> None:
        super().__init__()
        if image_size % stride or stride not in (2, 4, 8):
            raise ValueError(
                f"MotionDecoder: stride must be 2, 4 or 8 and divide image_size {image_size}, got {stride}"
            )
        if kernel not in ("free", "gaussian"):
            raise ValueError(f"MotionDecoder: kernel must be 'free' or 'gaussian', got {kernel!r}")
        self.num_views, self.num_kernels, self.reach, self.kernel = num_views, num_kernels, reach, kernel
        downs = stride.bit_length() - 1  # stride-2 convolutions from pixels to the motion grid
        # No convolution runs at full resolution (they were half of the step): the first one strides, and the last
        # one emits 2 x 2 pixels per cell of the half-resolution map (pixel shuffle).
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.GELU(),
            *[m for _ in range(downs - 1) for m in (nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GELU())],
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        if kernel == "gaussian":
            # Centres in cells, [B, V * K * 2] (rows, then columns, per kernel); widths per kernel and axis.
            self.to_kernels = nn.Linear(num_latent_tokens * latent_dim, num_views * num_kernels * 2)
            nn.init.zeros_(self.to_kernels.bias)
            self.log_width = nn.Parameter(torch.full((num_views, num_kernels, 2, 1), math.log(max(reach / 2, 1.0))))
            self.register_buffer("offsets", torch.arange(-reach, reach + 1, dtype=torch.float32), persistent=False)
        else:
            self.to_kernels = nn.Sequential(
                nn.Linear(num_latent_tokens * latent_dim, hidden), nn.GELU(),
                nn.Linear(hidden, num_views * num_kernels * 2 * (2 * reach + 1)),
            )
            # Near-uniform kernels at the start (see the class docstring), but not exactly: with a zero weight the
            # encoder would get no gradient until that weight had grown.
            nn.init.zeros_(self.to_kernels[-1].bias)
        self.to_masks = nn.Sequential(
            nn.Conv2d((num_kernels + 1) * channels, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, num_kernels + 1, 3, padding=1),
        )
        up = [m for _ in range(downs - 1) for m in (nn.Upsample(scale_factor=2, mode="nearest"),
                                                    nn.Conv2d(channels, channels, 3, padding=1), nn.GELU())]
        self.to_change = nn.Sequential(nn.Conv2d((num_kernels + 2) * channels, channels, 3, padding=1), nn.GELU(), *up,
                                       nn.Conv2d(channels, 3 * 4, 3, padding=1), nn.PixelShuffle(2))
        # Start as the copy baseline (zero change), as the transformer decoder does.
        nn.init.zeros_(self.to_change[-2].weight)
        nn.init.zeros_(self.to_change[-2].bias)

    def kernels(self, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z_q [B, N, D]`` -> row and column offset distributions, each ``[B, V, K, 2r + 1]`` summing to 1."""
        if self.kernel == "gaussian":
            centre = self.to_kernels(z_q.flatten(1)).view(z_q.shape[0], self.num_views, self.num_kernels, 2, 1)
            logits = -0.5 * ((self.offsets - centre) / self.log_width.exp()) ** 2  # [B, V, K, 2, 2r + 1]
        else:
            logits = self.to_kernels(z_q.flatten(1)).view(z_q.shape[0], self.num_views, self.num_kernels, 2, -1)
        probs = logits.softmax(-1)
        return probs[..., 0, :], probs[..., 1, :]

    def forward(self, x_t: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:  # [B, V, 3, h, w], [B, N, D] -> change
        feat = self.features(x_t.flatten(0, 1))  # [BV, C, g, g]
        rows, cols = self.kernels(z_q)
        moved = move_by_kernels(feat, rows.flatten(0, 1), cols.flatten(0, 1))  # [BV, K, C, g, g]
        candidates = torch.cat([feat[:, None], moved], dim=1)  # [BV, K + 1, C, g, g]; 0 = stay where it is
        masks = self.to_masks(candidates.flatten(1, 2)).softmax(1)  # [BV, K + 1, g, g]
        composite = (masks[:, :, None] * candidates).sum(1)  # [BV, C, g, g]
        # The moved candidates go to the head directly too, not only through the masks, so the kernels (the
        # latent's only way in) keep receiving gradient where the masks have learned to shut out the first steps'
        # near-uniform, i.e. blurred, moves.
        change = self.to_change(torch.cat([composite, feat, moved.flatten(1, 2)], dim=1))  # [BV, 3, h, w]
        return change.view_as(x_t)


class LatentActionModel(nn.Module):
    """VQ-VAE over ``(x_t, x_{t+H})``: frames in ``[0, 1]``, shaped ``[B, V, 3, h, w]`` (or ``[B, 3, h, w]`` if V = 1).

    Encoder: one tubelet token per patch position and view (the patch at t, at t+H and their difference: the
    temporal mixing), ``num_latent_tokens`` learned action queries, a transformer over all of them (the spatial
    mixing), the queries' outputs projected to ``latent_dim``. Separate tokens per frame with joint space-time
    attention learned no motion in 600 CPU steps on moving squares (probe R^2 ~0); tubelets reached 0.5-0.76.
    Decoder: its own patch embedding of ``x_t`` plus the quantised latent tokens, a transformer, a per-patch
    pixel head predicting ``x_{t+H} - x_t``. Predicting the change makes copying the starting point, so training
    spends its capacity on motion; and because the decoder embeds ``x_t`` itself, no gradient reaches the encoder
    through ``x_t`` (LAPA's stop-gradient on the first frame). ``decoder="motion"`` swaps that decoder for a
    ``MotionDecoder``, through which the latent can only say how things move (``motion_*`` set its size).
    """

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        num_views: int = 1,
        width: int = 128,
        depth: int = 2,
        decoder_depth: int | None = None,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_latent_tokens: int = 16,
        latent_dim: int = 8,
        quantizer: nn.Module | None = None,
        latent_norm: bool = True,
        target_std_floor: float = 1e-4,
        decoder: str = "transformer",
        motion_kernels: int = 2,
        motion_stride: int = 4,
        motion_reach: int = 8,
        motion_kernel: str = "free",
    ) -> None:
        super().__init__()
        if decoder not in ("transformer", "motion"):
            raise ValueError(f"LatentActionModel: decoder must be 'transformer' or 'motion', got {decoder!r}")
        if image_size % patch_size:
            raise ValueError(f"LatentActionModel: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if width % heads:
            raise ValueError(f"LatentActionModel: width {width} is not divisible by heads {heads}")
        self.image_size, self.patch_size, self.num_views = image_size, patch_size, num_views
        self.num_latent_tokens, self.latent_dim = num_latent_tokens, latent_dim
        self.target_std_floor = target_std_floor

        self.enc_embed = PatchEmbed(image_size, patch_size, num_views, width, in_channels=9)
        self.queries = nn.Parameter(torch.randn(1, num_latent_tokens, width) * 0.02)
        self.encoder = _transformer(width, depth, heads, mlp_ratio, dropout)
        self.to_latent = nn.Linear(width, latent_dim)
        # Pre-quantisation latents standardised over the batch (BatchNorm without affine). Without it the encoder
        # shrinks its output into one FSQ bin and the code collapses: on moving squares FSQ 5 x 4 collapsed on
        # every seed (z_q spread 0.000) and 5 x 8 reached probe R^2 0.41-0.53; with it, 0.61-0.67 and 0.65-0.71
        # (600 steps, seeds 0-1). Batch statistics cannot shrink, so every dim spans the bins. Under DDP each rank
        # normalises by its own batch; on GPUs `trainer.sync_batchnorm: true` pools them (SyncBatchNorm refuses CPU).
        self.latent_norm = nn.BatchNorm1d(latent_dim, affine=False) if latent_norm else None

        if decoder == "motion":
            self.motion = MotionDecoder(image_size, num_views, num_latent_tokens, latent_dim,
                                        num_kernels=motion_kernels, stride=motion_stride, reach=motion_reach,
                                        kernel=motion_kernel)
        else:
            self.motion = None
            self.dec_embed = PatchEmbed(image_size, patch_size, num_views, width)
            self.from_latent = nn.Linear(latent_dim, width)
            self.latent_pos = nn.Parameter(torch.randn(1, num_latent_tokens, width) * 0.02)
            self.decoder = _transformer(width, decoder_depth or depth, heads, mlp_ratio, dropout)
            self.to_pixels = nn.Linear(width, 3 * patch_size**2)
            # Start as the copy baseline (zero change), so the first steps do not have to unlearn random images.
            nn.init.zeros_(self.to_pixels.weight)
            nn.init.zeros_(self.to_pixels.bias)

        self.quantizer = quantizer
        # Normalisation of the flow-matching target (`track_target_stats` while training, or `fit_target_stats`
        # afterwards); in the state dict.
        self.register_buffer("target_mean", torch.zeros(num_latent_tokens, latent_dim))
        self.register_buffer("target_std", torch.ones(num_latent_tokens, latent_dim))
        self.register_buffer("target_stats_fitted", torch.tensor(False))

    # ------------------------------------------------------------------ shapes
    def _frames(self, x: torch.Tensor, name: str) -> torch.Tensor:  # -> [B, V, 3, h, w]
        if x.dim() == 4:
            x = x.unsqueeze(1)
        expected = (self.num_views, 3, self.image_size, self.image_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"LatentActionModel: {name} must be float [B, {self.num_views}, 3, {self.image_size}, "
                f"{self.image_size}] (or [B, 3, h, w] with one view), got {tuple(x.shape)}; set image_size / "
                "num_views to match the data"
            )
        if not x.is_floating_point():
            raise TypeError(f"LatentActionModel: {name} must be float in [0, 1], got {x.dtype} (divide uint8 by 255)")
        return x

    # ------------------------------------------------------------------ parts
    def encode(self, x_t: torch.Tensor, x_tH: torch.Tensor) -> torch.Tensor:  # -> z [B, N, D] (pre-quantisation)
        x_t, x_tH = self._frames(x_t, "x_t"), self._frames(x_tH, "x_tH")
        # Tubelets: each token sees one patch at t and at t+H (and their difference, which a linear embedding could
        # form itself but learns slowly from a random start).
        tokens = self.enc_embed(torch.cat([x_t, x_tH, x_tH - x_t], dim=2))  # [B, V * P, W]
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        h = self.encoder(torch.cat([queries, tokens], dim=1))
        z = self.to_latent(h[:, : self.num_latent_tokens])  # [B, N, D]
        if self.latent_norm is not None:
            z = self.latent_norm(z.flatten(0, 1)).view_as(z)
        return z

    @property
    def awaits_kmeans_init(self) -> bool:
        """True while a k-means-initialised codebook has not yet seen its first training batch (it is all zeros)."""
        codebook = getattr(self.quantizer, "_codebook", None)
        return codebook is not None and not bool(getattr(codebook, "initted", True))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``z [B, N, D] -> (z_q [B, N, D], indices [B, N] or None, aux_loss scalar)``, always in fp32."""
        if self.quantizer is None:
            return z, None, z.new_zeros(())
        if not self.training and self.awaits_kmeans_init:
            # The library would run k-means on whatever it sees first; evaluation data must not set the codebook.
            raise RuntimeError(
                "LatentActionModel: the k-means codebook is initialised on the first training batch; run a "
                "training step before evaluating the quantiser (encode() works at any time)"
            )
        with torch.autocast(z.device.type, enabled=False):
            out = self.quantizer(z.float())
        z_q, indices = out[0].to(z.dtype), out[1]
        aux = out[2] if len(out) > 2 else z.new_zeros(())
        if indices is not None and indices.dim() == 3 and indices.shape[-1] == 1:
            indices = indices.squeeze(-1)
        return z_q, indices, aux.sum()

    def decode(self, x_t: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:  # -> recon of x_{t+H}, like x_t
        squeeze = x_t.dim() == 4
        x_t = self._frames(x_t, "x_t")
        b, v = x_t.shape[:2]
        if self.motion is not None:
            recon = x_t + self.motion(x_t, z_q)
            return recon.squeeze(1) if squeeze else recon
        latent = self.from_latent(z_q) + self.latent_pos  # [B, N, W]
        h = self.decoder(torch.cat([latent, self.dec_embed(x_t)], dim=1))[:, self.num_latent_tokens :]
        g, p = self.image_size // self.patch_size, self.patch_size
        delta = self.to_pixels(h).view(b, v, g, g, 3, p, p)  # [B, V, gy, gx, 3, py, px]
        delta = delta.permute(0, 1, 4, 2, 5, 3, 6).reshape_as(x_t)
        recon = x_t + delta
        return recon.squeeze(1) if squeeze else recon

    def forward(self, x_t: torch.Tensor, x_tH: torch.Tensor) -> dict[str, torch.Tensor | None]:
        z = self.encode(x_t, x_tH)
        z_q, indices, aux_loss = self.quantize(z)
        return {"recon": self.decode(x_t, z_q), "z": z, "z_q": z_q, "indices": indices, "aux_loss": aux_loss}

    # ------------------------------------------------------------------ flow-matching target
    @torch.no_grad()
    def set_target_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        shape = (self.num_latent_tokens, self.latent_dim)
        if tuple(mean.shape) != shape or tuple(std.shape) != shape:
            raise ValueError(f"target stats must be {list(shape)}, got mean {list(mean.shape)}, std {list(std.shape)}")
        self.target_mean.copy_(mean)
        self.target_std.copy_(std.clamp_min(self.target_std_floor))
        self.target_stats_fitted.fill_(True)

    @torch.no_grad()
    def track_target_stats(self, z: torch.Tensor, momentum: float) -> None:
        """One training step's update of the target statistics from its latents ``z [n, N, D]`` (``n`` may be 0):
        an exponential moving average, weight ``momentum``, of the per-element mean and second moment.

        Under DDP the batch moments are summed over ranks first, so every rank holds the same statistics; a rank
        without samples must still call this (with ``n = 0``) to join that collective."""
        # fp32: under bf16 autocast z is bf16, and second moment minus squared mean would cancel in 8 mantissa bits
        z = z.float()
        moments = torch.stack([z.sum(0), z.square().sum(0), z.new_full(z.shape[1:], z.shape[0])])  # [3, N, D]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(moments)
        if moments[2, 0, 0] < 2:
            return
        mean, second = moments[0] / moments[2], moments[1] / moments[2]
        if bool(self.target_stats_fitted):
            old_second = self.target_std.square() + self.target_mean.square()
            mean = (1 - momentum) * self.target_mean + momentum * mean
            second = (1 - momentum) * old_second + momentum * second
        self.set_target_stats(mean, (second - mean.square()).clamp_min(0).sqrt())

    @torch.no_grad()
    def fit_target_stats(self, data: Iterable[tuple[torch.Tensor, torch.Tensor]] | torch.Tensor) -> None:
        """Fit the per-element mean/std of the pre-quantisation latent ``[N, D]``.

        ``data`` is either latents ``[M, N, D]`` already computed, or an iterable of ``(x_t, x_tH)`` float batches
        (a dataloader): for a model trained without ``LatentActionObjective``, which tracks them while training.
        """
        if isinstance(data, torch.Tensor):
            latents = [data]
        else:
            was_training = self.training
            self.eval()
            latents = [self.encode(x_t, x_tH) for x_t, x_tH in data]
            self.train(was_training)
        if not latents:
            raise ValueError("fit_target_stats: got no data")
        z = torch.cat(latents).double()
        if z.shape[0] < 2:
            raise ValueError(f"fit_target_stats needs at least 2 latents, got {z.shape[0]}")
        self.set_target_stats(z.mean(0).to(self.target_mean), z.std(0).to(self.target_std))

    def latent_action_target(self, x_t: torch.Tensor, x_tH: torch.Tensor) -> torch.Tensor:  # -> [B, N, D]
        """The normalised pre-quantisation latent: the flow-matching target of the "latent" embodiment."""
        if not bool(self.target_stats_fitted):
            raise RuntimeError(
                "LatentActionModel.latent_action_target: target statistics are not fitted; train the model with "
                "LatentActionObjective (which tracks them) or call fit_target_stats(...)"
            )
        return (self.encode(x_t, x_tH) - self.target_mean) / self.target_std


def frame_pair(images: torch.Tensor, view_indices: Sequence[int], owner: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's ``images`` uint8 ``[B, 2, V, 3, h, w]`` (frames t and t+H) -> the views ``view_indices`` of each,
    as float in [0, 1]: ``x_t``, ``x_tH`` ``[B, len(view_indices), 3, h, w]``. ``owner`` names the caller in errors."""
    if images.dim() != 6 or images.shape[1] != 2:
        raise ValueError(f"{owner}: batch images must be uint8 [B, 2, V, 3, h, w], got {tuple(images.shape)}")
    if max(view_indices) >= images.shape[2]:
        raise ValueError(f"{owner}: view_indices {list(view_indices)} but the batch has {images.shape[2]} views")
    frames = images[:, :, list(view_indices)].float() / 255.0
    return frames[:, 0], frames[:, 1]


def change_weighted_mse(recon: torch.Tensor, x_t: torch.Tensor, x_tH: torch.Tensor, change_weight: float) -> torch.Tensor:
    """Pixel MSE weighted by ``1 + change_weight * d / mean(d)``, ``d`` = per-pixel change ``|x_tH - x_t|``.

    Why: a plain MSE values a move by the pixels it changes, so a move that changes few pixels (a gripper's carriage
    against a gantry's whole rail) is not worth encoding. Dividing by each sample's mean change gives every window's
    changing pixels the same share of its weight (``change_weight`` out of ``1 + change_weight`` per pixel on
    average) however few they are, split in proportion to how much each changes; the static rest keeps weight 1.
    The result is divided by the mean weight, so the loss stays on the scale of the MSE (``change_weight`` 0: the
    plain MSE). Caveat: sensor noise counts as change, so in a noisy still window all of the share goes to noise.
    """
    change = (x_tH - x_t).abs().amax(dim=-3, keepdim=True)  # [B, V, 1, h, w]: the largest change of the 3 colours
    per_sample = change.mean(dim=tuple(range(1, change.dim())), keepdim=True).clamp_min(1e-6)  # [B, 1, 1, 1, 1]
    weight = 1 + change_weight * change / per_sample  # mean over each sample's pixels: 1 + change_weight
    # A sample with no change at all (clamped mean) gets weight 1 everywhere: numerically 1 + cw*0/1e-6 = 1.
    return ((recon - x_tH).pow(2) * weight).mean() / (1 + change_weight)


class LatentActionObjective(nn.Module):
    """The training loss of a ``LatentActionModel``, and the upkeep of its target statistics:

        loss = change_weighted_mse(recon, x_{t+H}) + quantizer_loss_weight * aux + action_loss_weight * action_mse

    - ``change_weight``: see ``change_weighted_mse``; 1 is what the latent-action studies settled on (0 = plain MSE).
    - ``quantizer_loss_weight``: the quantiser's auxiliary (commitment) loss.
    - ``action_loss_weight`` > 0 (after LAOM: Nikulin et al., ICML 2025): a linear readout per embodiment
      (``EmbodimentLinear``, ``[N * D] -> [horizon * max_action_dim]``) from the pre-quantisation latent to the
      normalised action chunk, trained on the ``labelled`` samples, its masked MSE added with gradients into the
      encoder. A pixel loss pays for a move in proportion to the pixels it changes; labels tell the encoder what
      the move is. The readout is not part of the model, and the flow-matching target is unchanged.
      ``labelled_fraction`` < 1 keeps only that fraction of episodes labelled (the same episodes every step).
    - ``stats_momentum``: in training mode every call updates the model's target statistics
      (``LatentActionModel.track_target_stats``) with this EMA weight.
    """

    def __init__(
        self,
        num_latent_tokens: int,
        latent_dim: int,
        change_weight: float = 1.0,
        quantizer_loss_weight: float = 1.0,
        action_loss_weight: float = 0.0,
        num_embodiments: int = 1,
        horizon: int | None = None,
        max_action_dim: int | None = None,
        labelled_fraction: float = 1.0,
        stats_momentum: float = 0.05,
    ) -> None:
        super().__init__()
        if change_weight < 0:
            raise ValueError(f"change_weight must be >= 0 (0 = plain MSE), got {change_weight}")
        if action_loss_weight < 0 or not 0 < labelled_fraction <= 1:
            raise ValueError(
                f"action_loss_weight must be >= 0 (0 = no action supervision) and labelled_fraction in (0, 1], got "
                f"{action_loss_weight} and {labelled_fraction}"
            )
        if not 0.0 < stats_momentum <= 1.0:
            raise ValueError(f"stats_momentum must be in (0, 1], got {stats_momentum}")
        if action_loss_weight > 0 and (horizon is None or max_action_dim is None):
            raise ValueError("action_loss_weight > 0 needs `horizon` and `max_action_dim` (the data's) to size the "
                             "action readout")
        self.change_weight, self.quantizer_loss_weight = change_weight, quantizer_loss_weight
        self.action_loss_weight, self.labelled_fraction = action_loss_weight, labelled_fraction
        self.stats_momentum = stats_momentum
        # [B, N * D] -> [B, H * A_max], one weight per embodiment slot (the data's `embodiments` ids).
        self.action_readout = (
            EmbodimentLinear(num_embodiments, num_latent_tokens * latent_dim, horizon * max_action_dim)
            if action_loss_weight > 0 else None
        )

    def labelled(self, has_action: torch.Tensor, episode: torch.Tensor | None) -> torch.Tensor:
        """[B] bool: samples whose actions the readout may see (they have actions, and their episode is labelled)."""
        labelled = has_action.bool()
        if self.labelled_fraction < 1:
            if episode is None:
                raise ValueError(
                    f"labelled_fraction {self.labelled_fraction} picks labelled episodes by batch['episode'], which "
                    "this batch lacks; use the mixture data module or set labelled_fraction: 1.0"
                )
            # Golden-ratio hashing of the id: the same episodes every step, spread evenly over ids 0, 1, 2, ...
            labelled = labelled & (torch.frac(episode.double() * 0.6180339887498949) < self.labelled_fraction)
        return labelled

    def action_mse(self, z: torch.Tensor, actions: torch.Tensor, action_mask: torch.Tensor,
                   embodiment_id: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Masked MSE of the action chunk ``[B, H, A_max]`` read linearly from the (not detached) latent ``z``."""
        if not bool(labelled.any()):
            # No labelled sample: a zero loss. Under DDP the readout then has unused parameters (as every
            # EmbodimentLinear slot absent from a batch does): the module owning it must allow them.
            return zero_loss(z)
        actions, mask = actions[labelled], action_mask[labelled].float()  # [b, H, A]
        pred = self.action_readout(z[labelled].flatten(1), embodiment_id[labelled]).view_as(actions)
        return ((pred - actions).pow(2) * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self,
        model: LatentActionModel,
        x_t: torch.Tensor,
        x_tH: torch.Tensor,
        actions: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
        embodiment_id: torch.Tensor | None = None,
        labelled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Frames ``[B, V, 3, h, w]`` in [0, 1] (and, with the readout, the batch's actions ``[B, H, A_max]``, mask,
        embodiment ids and ``labelled`` rows) -> the model's outputs plus ``loss`` and its detached parts
        ``recon_mse`` (unweighted, so gains stay comparable across weightings), ``aux_loss``, ``action_mse``."""
        out = model(x_t, x_tH)
        recon_mse = F.mse_loss(out["recon"], x_tH)
        recon_loss = recon_mse if self.change_weight == 0 else change_weighted_mse(out["recon"], x_t, x_tH,
                                                                                    self.change_weight)
        loss = recon_loss + self.quantizer_loss_weight * out["aux_loss"]
        parts = {"recon_mse": recon_mse.detach(), "aux_loss": out["aux_loss"].detach()}
        if self.action_readout is not None:
            if actions is None or action_mask is None or embodiment_id is None or labelled is None:
                raise ValueError("LatentActionObjective: the action readout needs actions, action_mask, "
                                 "embodiment_id and labelled")
            action_mse = self.action_mse(out["z"], actions, action_mask, embodiment_id, labelled)
            loss = loss + self.action_loss_weight * action_mse
            parts["action_mse"] = action_mse.detach()
        if self.training:
            # One statistics policy, a moving average over training steps: a co-trained model's targets are needed
            # from its first step while its encoder moves every step, which a refit after validation cannot give.
            model.track_target_stats(out["z"].detach(), self.stats_momentum)
        return {**out, **parts, "loss": loss}

    def idle(self, model: LatentActionModel) -> torch.Tensor:
        """The loss of a training step that has no sample for the model on this rank: zero, with every parameter in
        the graph and the statistics' collective joined, so that DDP ranks stay in step."""
        if self.training:
            n, d = model.num_latent_tokens, model.latent_dim
            model.track_target_stats(model.target_mean.new_zeros(0, n, d), self.stats_momentum)
        return zero_loss(model, self)
