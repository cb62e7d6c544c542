"""Training of the latent-action model (LAPA-style VQ-VAE) on mixture batches; see ``components/latent_action.py``.

Loss: pixel MSE of the reconstructed ``x_{t+H}``, weighted towards the pixels that change (``change_weight``), plus
the quantiser's auxiliary loss (commitment, ...). Logged in
``train/`` (every ``log_every_n_steps``) and ``val/`` (per epoch), because a VQ-VAE's loss says little about whether
its latent means anything:

- ``recon_mse``, ``psnr``; ``recon_gain`` = copy-x_t MSE / recon MSE (> 1 means the latent carries the change);
- ``shuffle_ratio`` = MSE with latents rolled across the batch / recon MSE (> 1 means the decoder uses the latent);
- ``commitment`` = MSE(z, z_q), computed here because the library returns 0 aux loss in eval mode;
- ``perplexity``, ``usage``, ``dead_codes`` of the codebook;
- ``action_mse`` (with ``action_loss_weight`` > 0): the supervised action readout's masked MSE (below);
- ``probe_r2`` / ``probe_r2_chunk``: held-out ridge probe R^2 of the true actions from the pre-quantisation latent
  (two folds split by episode), on samples that have actions: ``probe_r2`` of the net motion (the chunk summed over
  its steps, in the action dims ``probe_dims``: for delta-action robots the end-effector displacement),
  ``probe_r2_chunk`` of the whole chunk.

The loss, the optional action readout (``action_loss_weight`` > 0, ``labelled_fraction``) and the upkeep of the
flow-matching target's statistics are ``components.latent_action.LatentActionObjective``'s, shared with the latent-action
model co-trained inside a policy (``components.pseudo_labels.LatentActionLabeler``).

The quantiser can be given either inside the ``LatentActionModel`` or, preferably, as a factory to this module,
which builds it in ``configure_model``: vector-quantize-pytorch decides codebook synchronisation across DDP ranks
when the module is built (and caches its "am I distributed" answer per process), so it has to be built after
the process group exists and told explicitly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric

from components.codebook_metrics import CodebookUsage, RidgeProbeR2
from components.latent_action import LatentActionModel, LatentActionObjective, frame_pair
from datamodules import schema
from lit_modules.distributed import require_find_unused_parameters
from lit_modules.optimization import configure_optimizers


class LatentActionModule(LightningModule):
    def __init__(
        self,
        model: LatentActionModel,
        quantizer: Callable[[], nn.Module] | None = None,
        view_indices: Sequence[int] = (0,),
        horizon: int = 16,
        max_action_dim: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 100,
        aux_loss_weight: float = 1.0,
        probe_l2: float = 1e-3,
        probe_dims: Sequence[int] | None = None,
        change_weight: float = 1.0,
        action_loss_weight: float = 0.0,
        num_embodiments: int = 1,
        labelled_fraction: float = 1.0,
        stats_momentum: float = 0.05,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # `model` and `quantizer` included: the checkpoint must rebuild them
        if len(view_indices) != model.num_views:
            raise ValueError(
                f"LatentActionModule: view_indices {list(view_indices)} select {len(view_indices)} views but the "
                f"model was built for num_views={model.num_views}"
            )
        if quantizer is not None and model.quantizer is not None:
            raise ValueError(
                "LatentActionModule: give the quantiser either to the model or to this module (factory), not both"
            )
        self.model = model
        self.quantizer_factory = quantizer
        self.view_indices = list(view_indices)
        if probe_dims is not None and (not probe_dims or not all(0 <= i < max_action_dim for i in probe_dims)):
            raise ValueError(
                f"LatentActionModule: probe_dims {list(probe_dims)} must be a non-empty list of action dims in "
                f"[0, max_action_dim={max_action_dim}), e.g. [0, 1] for a gripper's (dx, dy)"
            )
        # The net-motion probe's targets: the displacement dims only. A gripper open/close dim summed over the chunk
        # is a count of closed steps, which the scene camera barely shows and which outweighed dx, dy in variance.
        self.probe_dims = list(probe_dims) if probe_dims is not None else list(range(max_action_dim))
        n, d = model.num_latent_tokens, model.latent_dim
        try:
            self.objective = LatentActionObjective(
                n, d, change_weight=change_weight, quantizer_loss_weight=aux_loss_weight,
                action_loss_weight=action_loss_weight, num_embodiments=num_embodiments, horizon=horizon,
                max_action_dim=max_action_dim, labelled_fraction=labelled_fraction, stats_momentum=stats_momentum,
            )
        except ValueError as e:
            raise ValueError(f"LatentActionModule: {e}") from e
        self.val_means = nn.ModuleDict(
            {k: MeanMetric() for k in ("recon_mse", "copy_mse", "shuffled_mse", "commitment", "action_mse")}
        )
        self.probes = nn.ModuleDict({
            f"{stage}_{kind}": RidgeProbeR2(n * d, dims, l2=probe_l2)
            for stage in ("train", "val")
            for kind, dims in (("net", len(self.probe_dims)), ("chunk", horizon * max_action_dim))
        })
        self.codebook_metrics: nn.ModuleDict | None = None
        if model.quantizer is not None:
            self._add_codebook_metrics()

    # ------------------------------------------------------------------ building
    def _add_codebook_metrics(self) -> None:
        size = getattr(self.model.quantizer, "codebook_size", None)
        if size is not None:
            # ModuleDict keys cannot be "train" (nn.Module.train)
            self.codebook_metrics = nn.ModuleDict({f"{s}_codes": CodebookUsage(int(size)) for s in ("train", "val")})

    def configure_model(self) -> None:
        world_size = self.trainer.world_size if self._trainer is not None else 1
        codebook = getattr(self.model.quantizer, "_codebook", None)
        if codebook is not None and world_size > 1 and not getattr(codebook, "use_ddp", True):
            raise RuntimeError(
                f"LatentActionModule: training on {world_size} processes with a quantiser built before the process "
                "group, so its codebook would differ per rank; move the quantiser from `model.init_args.quantizer` "
                "to the module's `quantizer` (built here, synchronised) or set `sync_codebook: true`"
            )
        if self.quantizer_factory is None or self.model.quantizer is not None:
            return  # idempotent: Lightning calls this on fit, validate and load_from_checkpoint
        quantizer = self.quantizer_factory()
        if "sync_codebook" in inspect.signature(type(quantizer)).parameters:
            quantizer = self.quantizer_factory(sync_codebook=world_size > 1)
        self.model.quantizer = quantizer.float()
        self._add_codebook_metrics()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The action readout moved into the objective: checkpoints written before keep loading.
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("action_readout.")]:
            state[f"objective.{key}"] = state.pop(key)

    def on_fit_start(self) -> None:
        if self.objective.action_readout is not None:
            require_find_unused_parameters(
                self.trainer, "LatentActionModule with action_loss_weight > 0",
                "the action readout gets no gradient on a rank whose batch has no labelled sample, and its slots for "
                "embodiments absent from the batch never do",
            )

    # ------------------------------------------------------------------ steps
    def _probe_update(self, stage: str, z: torch.Tensor, batch: dict) -> None:
        actions, mask = batch[schema.ACTIONS], batch[schema.ACTION_MASK]  # [B, H, A_max]
        expected = (self.hparams.horizon, self.hparams.max_action_dim)
        if tuple(actions.shape[1:]) != expected:
            raise ValueError(
                f"LatentActionModule: batch actions are {list(actions.shape[1:])}, the probes were built for "
                f"[horizon, max_action_dim] = {list(expected)}; set the module's horizon / max_action_dim"
            )
        chunk = actions * mask
        has_action = batch[schema.HAS_ACTION]
        features = z.flatten(1)
        # Folds by episode: neighbouring windows of one episode are near-copies (see RidgeProbeR2).
        episodes = batch.get(schema.EPISODE)
        self.probes[f"{stage}_net"].update(features, chunk.sum(1)[:, self.probe_dims], has_action, episodes)
        self.probes[f"{stage}_chunk"].update(features, chunk.flatten(1), has_action, episodes)

    def _shared_step(self, batch: dict, stage: str, diagnostics: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x_t, x_tH = frame_pair(batch[schema.IMAGES], self.view_indices, "LatentActionModule")
        labelled = None
        if self.objective.action_readout is not None:
            labelled = self._labelled(batch)
        out = self.objective(self.model, x_t, x_tH, batch.get(schema.ACTIONS), batch.get(schema.ACTION_MASK),
                             batch.get(schema.EMBODIMENT_ID), labelled)
        loss = out["loss"]
        stats = {k: out[k] for k in ("recon_mse", "aux_loss", "action_mse") if k in out}
        stats["loss"] = loss.detach()
        z, z_q = out["z"].detach(), out["z_q"].detach()
        # Windowed metrics see every sample; they are cheap (a histogram and two small outer products).
        if self.codebook_metrics is not None and out["indices"] is not None:
            self.codebook_metrics[f"{stage}_codes"].update(out["indices"])
        self._probe_update(stage, z, batch)
        if diagnostics:
            with torch.no_grad():
                stats["copy_mse"] = F.mse_loss(x_t, x_tH)
                stats["commitment"] = F.mse_loss(z_q, z)
                if x_t.shape[0] > 1:
                    # Rolling by one gives every sample another sample's latent (a random permutation may not).
                    stats["shuffled_mse"] = F.mse_loss(self.model.decode(x_t, z_q.roll(1, dims=0)), x_tH)
        return loss, stats

    def _labelled(self, batch: dict) -> torch.Tensor:
        """[B] bool: samples whose actions the readout may see (they have actions, and their episode is labelled)."""
        try:
            return self.objective.labelled(batch[schema.HAS_ACTION], batch.get(schema.EPISODE))
        except ValueError as e:
            raise ValueError(f"LatentActionModule: {e}") from e

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Diagnostics cost an extra decoder pass: compute them only on steps whose logs are written.
        diagnostics = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        loss, stats = self._shared_step(batch, "train", diagnostics)
        bs = batch[schema.IMAGES].shape[0]
        self.log("train/loss", stats.pop("loss"), prog_bar=True, batch_size=bs)
        if diagnostics:
            self.log_dict({f"train/{k}": v for k, v in self._ratios(stats).items()}, batch_size=bs)
            # Codebook use and probes accumulate over the logging window (one batch is too few samples), then reset.
            self.log_dict({f"train/{k}": v for k, v in self._compute_window("train").items()}, batch_size=bs)
        return loss

    @staticmethod
    def _ratios(means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        recon = means["recon_mse"].clamp_min(1e-12)
        logs = dict(means, psnr=-10 * torch.log10(recon))
        if "copy_mse" in means:
            logs["recon_gain"] = means["copy_mse"] / recon
        if "shuffled_mse" in means:
            logs["shuffle_ratio"] = means["shuffled_mse"] / recon
        return logs

    def _compute_window(self, stage: str) -> dict[str, torch.Tensor]:
        logs = {"probe_r2": self.probes[f"{stage}_net"].compute(), "probe_r2_chunk": self.probes[f"{stage}_chunk"].compute()}
        if self.codebook_metrics is not None:
            logs.update(self.codebook_metrics[f"{stage}_codes"].compute())
            self.codebook_metrics[f"{stage}_codes"].reset()
        for metric in [self.probes[f"{stage}_net"], self.probes[f"{stage}_chunk"]]:
            metric.reset()
        return {k: v for k, v in logs.items() if not torch.isnan(v)}  # nan: no sample with actions in the window

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.model.awaits_kmeans_init:
            # Only before the first training step (Lightning's sanity check, or validating an untrained model): the
            # k-means codebook must be initialised from training data, and until then it quantises all to zeros.
            return None
        _, stats = self._shared_step(batch, "val", diagnostics=True)
        bs = batch[schema.IMAGES].shape[0]
        for name, metric in self.val_means.items():
            if name in stats:
                metric.update(stats[name], weight=bs)
        self.log("val/loss", stats["loss"], prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/aux_loss", stats["aux_loss"], batch_size=bs, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        # Every rank skips the same steps (the codebook state is identical), so they agree here: no deadlock.
        if not self.val_means["recon_mse"].update_called:
            return
        means = {k: m.compute() for k, m in self.val_means.items() if m.update_called}
        logs = {**self._ratios(means), **self._compute_window("val")}
        self.log_dict({f"val/{k}": v for k, v in logs.items()})  # already reduced over ranks by torchmetrics
        for metric in self.val_means.values():
            metric.reset()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        adamw = lambda params: torch.optim.AdamW(params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)  # noqa: E731
        return configure_optimizers(self, adamw, "cosine", warmup_ratio=0.0, warmup_steps=hp.warmup_steps)
