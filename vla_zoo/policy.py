"""The deployable policy: a checkpoint in, raw observations in, action chunks in robot units out.

``Policy.from_checkpoint(path)`` needs nothing but the checkpoint: the model is rebuilt from the recipe embedded
by the CLI, and the normalisation statistics, embodiment map, views and horizon come from the data spec the
training run stored beside the weights.

Dual-rate control (paper Sec. 2.1: System 2 at ~10 Hz, System 1 at ~120 Hz): ``system2_period`` is the number of
``get_action`` calls that reuse one set of vision-language tokens; 1 recomputes them on every call. A new
instruction or embodiment always refreshes them. ``num_samples`` > 1 returns the mean of that many flow samples
per chunk (``VLAPolicy.act``).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np
import torch

from vla_zoo.cli import load_run_config
from vla_zoo.deploy.validation import validate_observation


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class Policy:
    """Implements the policy contract: ``get_action(observation) -> {"actions": [H, A]}``, ``metadata()``, ``reset()``.

    ``observation = {"embodiment": str, "instruction": str, "images": {view: uint8 [h, w, 3]}, "state": [S]}``.
    """

    def __init__(
        self,
        module: Any,
        system2_period: int = 1,
        num_steps: int | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_samples: int = 1,
    ) -> None:
        if system2_period < 1:
            raise ValueError(f"system2_period must be >= 1, got {system2_period}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if getattr(module, "data_spec", None) is None:
            raise ValueError("the model carries no data spec (normalisers, embodiments): train it with a "
                             "datamodule that provides `data_spec()`, e.g. datamodules.mixture.MixtureDataModule")
        self.module = module.to(device).eval()
        self.spec = module.data_spec
        self.device = torch.device(device)
        self.system2_period, self.num_steps, self.seed = system2_period, num_steps, seed
        self.num_samples = num_samples
        self.reset()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", **kwargs: Any) -> "Policy":
        path = os.fspath(path)
        module_cls = _import(load_run_config(path)["model"]["class_path"])
        module = module_cls.load_from_checkpoint(path, map_location=device, weights_only=False)
        return cls(module, device=device, **kwargs)

    def metadata(self) -> dict[str, Any]:
        return {
            "embodiments": {
                name: {
                    "state_dim": e.state_dim,
                    "action_dim": e.action_dim,
                    "image_keys": list(self.spec.views),
                    "image_size": list(self.spec.image_size),
                }
                for name, e in self.spec.embodiments.items()
                if e.has_action
            },
            "horizon": int(self.spec.horizon),
        }

    def reset(self) -> None:
        self._cache: tuple[tuple[str, str], torch.Tensor, torch.Tensor] | None = None
        self._calls_since_system2 = 0
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def get_action(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        # The server's check, so a bad observation fails here as it would over the network, naming the key, before
        # any work; frames of another size than the metadata's are fine in process (the backbone resizes them).
        validate_observation(observation, self.metadata(), any_image_size=True)
        embodiment = observation["embodiment"]
        key = (embodiment, observation["instruction"])
        if self._cache is None or self._cache[0] != key or self._calls_since_system2 >= self.system2_period:
            images = self.module.observation_images(observation)
            tokens, mask = self.module.encode_observation(images, [observation["instruction"]])
            self._cache, self._calls_since_system2 = (key, tokens, mask), 0
        self._calls_since_system2 += 1
        _, tokens, mask = self._cache
        actions = self.module.act(tokens, mask, observation["state"], embodiment, self.num_steps, self._generator,
                                  num_samples=self.num_samples)
        return {"actions": actions[0].numpy().astype(np.float32)}


def policy_from_module(module: Any, **kwargs: Any) -> Policy:
    """The policy of a module being trained (``ClosedLoopEvalCallback(policy_factory=...)`` in recipes)."""
    return Policy(module, device=module.device, **kwargs)
