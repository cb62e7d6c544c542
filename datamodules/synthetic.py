"""Synthetic data: seconds to build, no files, for smoke runs, tests and benchmarks.

``SyntheticChunkDataModule`` is schema-conformant: each sample's action chunk is a fixed random linear map of its
state (plus a per-step offset), so a model that learns anything drives the loss down, which checks that a recipe
trains before pointing it at real data. ``moving_square_pairs`` makes frame pairs with a known move, for the
latent-action model's tests and ``benchmarks/lam_moving_squares.py``.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules import schema
from datamodules.worker_signals import leave_stop_signals_to_the_trainer


class SyntheticChunkDataset(Dataset):
    def __init__(
        self,
        num_samples: int,
        horizon: int,
        state_dim: int,
        action_dim: int,
        max_state_dim: int,
        max_action_dim: int,
        image_size: int,
        num_views: int,
        num_embodiments: int,
        seed: int,
    ) -> None:
        if state_dim > max_state_dim or action_dim > max_action_dim:
            raise ValueError(
                f"state_dim/action_dim ({state_dim}/{action_dim}) exceed max_state_dim/max_action_dim "
                f"({max_state_dim}/{max_action_dim}): raise the max_* values"
            )
        g = torch.Generator().manual_seed(seed)
        self.n, self.h, self.v, self.size = num_samples, horizon, num_views, image_size
        self.max_s, self.max_a, self.s, self.a = max_state_dim, max_action_dim, state_dim, action_dim
        self.state = torch.rand(num_samples, state_dim, generator=g) * 2 - 1
        self.embodiment = torch.randint(0, num_embodiments, (num_samples,), generator=g)
        # One linear map per embodiment: actions [H, A] = W_e @ state + b_e[h]
        self.weight = torch.randn(num_embodiments, horizon * action_dim, state_dim, generator=g) / state_dim**0.5
        self.bias = torch.randn(num_embodiments, horizon * action_dim, generator=g) * 0.1
        self.seed = seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        e = int(self.embodiment[i])
        chunk = (self.weight[e] @ self.state[i] + self.bias[e]).view(self.h, self.a).clamp(-1, 1)
        state = torch.zeros(self.max_s)
        state[: self.s] = self.state[i]
        state_mask = torch.zeros(self.max_s, dtype=torch.bool)
        state_mask[: self.s] = True
        actions = torch.zeros(self.h, self.max_a)
        actions[:, : self.a] = chunk
        action_mask = torch.zeros(self.h, self.max_a, dtype=torch.bool)
        action_mask[:, : self.a] = True
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        images = torch.randint(0, 256, (2, self.v, 3, self.size, self.size), dtype=torch.uint8, generator=g)
        return {
            schema.IMAGES: images,
            schema.STATE: state,
            schema.STATE_MASK: state_mask,
            schema.ACTIONS: actions,
            schema.ACTION_MASK: action_mask,
            schema.HAS_ACTION: torch.tensor(True),
            schema.EMBODIMENT_ID: torch.tensor(e),
            schema.SOURCE_ID: torch.tensor(0),
            schema.INSTRUCTION: "follow the synthetic rule",
            schema.EPISODE: torch.tensor(i),
            schema.STEP: torch.tensor(0),
        }


class SyntheticChunkDataModule(LightningDataModule):
    """In-memory synthetic batches in the zoo's batch schema (see ``datamodules/schema.py``)."""

    def __init__(
        self,
        num_samples: int = 512,
        batch_size: int = 32,
        horizon: int = 16,
        state_dim: int = 3,
        action_dim: int = 3,
        max_state_dim: int = 8,
        max_action_dim: int = 8,
        image_size: int = 32,
        num_views: int = 2,
        num_embodiments: int = 1,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        common = dict(
            horizon=hp.horizon, state_dim=hp.state_dim, action_dim=hp.action_dim, max_state_dim=hp.max_state_dim,
            max_action_dim=hp.max_action_dim, image_size=hp.image_size, num_views=hp.num_views,
            num_embodiments=hp.num_embodiments,
        )
        self.train_set = SyntheticChunkDataset(hp.num_samples, seed=hp.seed, **common)
        val = SyntheticChunkDataset(max(hp.batch_size, hp.num_samples // 8), seed=hp.seed, **common)
        # Validation shares the train set's linear maps but draws fresh states.
        val.weight, val.bias = self.train_set.weight, self.train_set.bias
        val.state = torch.rand(val.n, hp.state_dim, generator=torch.Generator().manual_seed(hp.seed + 1)) * 2 - 1
        self.val_set = val

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers, drop_last=True,
                          worker_init_fn=leave_stop_signals_to_the_trainer)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          worker_init_fn=leave_stop_signals_to_the_trainer)


def moving_square_pairs(n: int, image_size: int = 32, square: int = 6, max_shift: int = 6, seed: int = 0):
    """Frame pairs of one coloured square moved by a known integer shift on a plain random-colour background.

    Returns ``x_t, x_tH`` float ``[n, 3, s, s]`` in [0, 1] and the shift ``[n, 2]`` (rows, columns).
    """
    g = torch.Generator().manual_seed(seed)
    background = torch.rand(n, 3, 1, 1, generator=g) * 0.6
    colour = 0.4 + torch.rand(n, 3, 1, 1, generator=g) * 0.6
    corner = torch.randint(max_shift, image_size - square - max_shift + 1, (n, 2), generator=g)
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g)
    rows = torch.arange(image_size).view(1, -1, 1)
    cols = torch.arange(image_size).view(1, 1, -1)

    def draw(at: torch.Tensor) -> torch.Tensor:
        r, c = at[:, 0, None, None], at[:, 1, None, None]
        inside = ((rows >= r) & (rows < r + square) & (cols >= c) & (cols < c + square)).unsqueeze(1).float()
        return background * (1 - inside) + colour * inside

    return draw(corner), draw(corner + shift), shift.float()
