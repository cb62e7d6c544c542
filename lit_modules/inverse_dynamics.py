"""Training of an inverse dynamics model (IDM) on mixture batches of one embodiment's labelled data.

Each batch sample holds frames t and t+H (``images[:, 0]`` and ``images[:, 1]``) and the normalised chunk a_t ..
a_{t+H-1}; the IDM learns to generate the chunk from the two frames. The shards' horizon fixes which frame is
t+H, so the data's ``horizon`` must equal the action head's (``MixtureDataModule(horizon=...)`` and the
preparer's ``horizon``). Rows without actions (an actionless source in the mixture) are skipped.

Validation samples chunks with the flow head and logs ``val/action_r2``: R^2 over the real action dims and real
steps in normalised units, variance-weighted across dims (``torchmetrics.R2Score``), the number that says how
good the pseudo-labels will be.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics.regression import R2Score

from components.distributed import zero_loss
from datamodules import schema
from lit_modules.optimization import check_schedule, configure_optimizers, paper_adamw


class InverseDynamicsModule(LightningModule):
    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = paper_adamw,
        warmup_ratio: float = 0.05,
        lr_schedule: str = "cosine",
        num_inference_steps: int | None = None,
        num_inference_samples: int = 1,
    ) -> None:
        """
        Args:
            model: a ``components.inverse_dynamics.InverseDynamicsModel`` (or anything with its ``loss``/``predict``).
            optimizer: optimiser factory; default AdamW(1e-4, betas 0.95/0.999, wd 1e-5) like the policy.
            warmup_ratio: linear warm-up as a fraction of the run's steps.
            lr_schedule: ``cosine``, ``linear`` or ``constant`` after warm-up.
            num_inference_steps: Euler steps of validation sampling (default: the head's).
            num_inference_samples: flow samples averaged per validation prediction (``InverseDynamicsModel.predict``'s
                ``num_samples``): set it to the labeller's value so that ``val/action_r2`` measures its labels.
        """
        super().__init__()
        check_schedule(lr_schedule, warmup_ratio)
        # LightningCLI stores the parsed config of the injected model; a module passed from Python is not pickled
        # into the hyper-parameters (pass it again to load_from_checkpoint).
        self.save_hyperparameters(ignore=["model"] + ([] if isinstance(optimizer, type) else ["optimizer"]))
        self.model = model
        self._optimizer_factory = optimizer
        self.val_r2 = R2Score(multioutput="variance_weighted")

    def _rows(self, batch: dict) -> tuple[torch.Tensor, ...]:
        real = batch[schema.HAS_ACTION].nonzero(as_tuple=True)[0]
        images = batch[schema.IMAGES][real]  # [N, 2, V, 3, h, w]
        return (images[:, 0], images[:, 1], batch[schema.ACTIONS][real], batch[schema.ACTION_MASK][real],
                batch[schema.EMBODIMENT_ID][real])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x_t, x_tH, actions, mask, embodiment = self._rows(batch)
        if not len(x_t):
            # Nothing to learn from; keep every parameter in the graph so that DDP does not hang.
            loss = zero_loss(self)
        else:
            loss = self.model.loss(x_t, x_tH, actions, mask, embodiment)["loss"]
        self.log("train/loss", loss, prog_bar=True, batch_size=max(1, len(x_t)))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x_t, x_tH, actions, mask, embodiment = self._rows(batch)
        if not len(x_t):
            return
        self.log("val/loss", self.model.loss(x_t, x_tH, actions, mask, embodiment)["loss"], batch_size=len(x_t))
        # A fixed noise draw per batch: the validation R^2 of one checkpoint does not vary between runs.
        generator = torch.Generator(device=x_t.device).manual_seed(batch_idx)
        pred = self.model.predict(x_t, x_tH, embodiment, num_steps=self.hparams.num_inference_steps,
                                  generator=generator, num_samples=self.hparams.num_inference_samples)
        steps = mask.any(-1)  # [N, H]: real (not past-episode-end) steps
        # Padded dims are zero in both: no variance, so no weight in the variance-weighted R^2.
        self.val_r2.update(torch.where(mask, pred, 0.0)[steps], torch.where(mask, actions, 0.0)[steps])
        self.log("val/action_r2", self.val_r2, prog_bar=True, batch_size=len(x_t))

    def configure_optimizers(self):
        hp = self.hparams
        return configure_optimizers(self, self._optimizer_factory, hp.lr_schedule, hp.warmup_ratio)
