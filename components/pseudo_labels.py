"""Pseudo-label targets: how actionless data becomes flow-matching targets of extra embodiment slots.

A pseudo-labeler is an ``nn.Module`` with a ``kind`` (``"latent"``, ``"idm"``, ...) and
``targets(batch, select) -> PseudoTargets | None``: for the batch rows ``select``-ed (the samples whose source
declares this kind among its ``targets``), it returns action-chunk-shaped targets for its own embodiment slot.
``VLAPolicy`` concatenates them with the real-action rows; the action head never knows which is which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PseudoTargets:
    """Extra training rows. ``index`` picks the batch rows (and so the VL tokens) they belong to."""

    index: torch.Tensor  # [N] long, rows of the batch
    actions: torch.Tensor  # [N, H, A_max] normalised targets
    action_mask: torch.Tensor  # [N, H, A_max] bool
    embodiment_id: torch.Tensor  # [N] long: the pseudo-label kind's own slot
    state: torch.Tensor | None = None  # [N, S_max]; None -> zeros
    name: str = "pseudo"  # for logging
    aux_loss: torch.Tensor | None = None  # the labeler's own training loss when it is co-trained
