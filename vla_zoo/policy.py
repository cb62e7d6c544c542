"""The deployable policy: a checkpoint in, raw observations in, action chunks in robot units out.

``Policy.from_checkpoint(path)`` needs nothing but the checkpoint: the model is rebuilt from the recipe embedded
by the CLI, and the normalisation statistics, embodiment map and horizon come from the data spec the training
run stored next to the weights.

Dual-rate control (paper Sec. 2.1: System 2 at ~10 Hz, System 1 at ~120 Hz): ``system2_period`` is the number of
``get_action`` calls that reuse one set of vision-language tokens. ``system2_period=1`` recomputes them every call.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np
import torch

from datamodules.normalization import Normalizer
from vla_zoo.cli import load_run_config


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
        data_spec: dict[str, Any],
        system2_period: int = 1,
        num_steps: int | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if system2_period < 1:
            raise ValueError(f"system2_period must be >= 1, got {system2_period}")
        if not data_spec or "embodiments" not in data_spec:
            raise ValueError("the model carries no data spec (normalisers, embodiments): train it with a "
                             "datamodule that provides `data_spec()`, e.g. datamodules.mixture.MixtureDataModule")
        self.module = module.to(device).eval()
        self.spec = data_spec
        self.device = torch.device(device)
        self.system2_period = system2_period
        self.num_steps = num_steps
        self.seed = seed
        self.normalizers = {name: Normalizer.from_dict(e["normalizer"]) for name, e in data_spec["embodiments"].items()}
        self.reset()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", **kwargs: Any) -> "Policy":
        path = os.fspath(path)
        config = load_run_config(path)
        module_cls = _import(config["model"]["class_path"])
        module = module_cls.load_from_checkpoint(path, map_location=device, weights_only=False)
        return cls(module, module.data_spec, device=device, **kwargs)

    # ------------------------------------------------------------------ contract
    def metadata(self) -> dict[str, Any]:
        return {
            "embodiments": {
                name: {
                    "state_dim": e["state_dim"],
                    "action_dim": e["action_dim"],
                    "image_keys": list(self.spec["views"]),
                    "image_size": list(self.spec["image_size"]),
                }
                for name, e in self.spec["embodiments"].items()
                if e.get("has_action", True)
            },
            "horizon": int(self.spec["horizon"]),
        }

    def reset(self) -> None:
        self._cache: tuple[str, torch.Tensor, torch.Tensor] | None = None
        self._calls_since_system2 = 0
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def get_action(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        name = observation.get("embodiment")
        if name not in self.spec["embodiments"]:
            raise KeyError(f"unknown embodiment {name!r}; this policy knows {sorted(self.spec['embodiments'])}")
        emb = self.spec["embodiments"][name]
        instruction = observation["instruction"]
        tokens, mask = self._system2(observation, instruction)
        state = torch.as_tensor(np.asarray(observation["state"], dtype=np.float32)).reshape(-1)
        if state.numel() != emb["state_dim"]:
            raise ValueError(f"state has {state.numel()} dims, embodiment {name!r} expects {emb['state_dim']}")
        normalizer = self.normalizers[name]
        padded = torch.zeros(1, self.spec["max_state_dim"])
        padded[0, : emb["state_dim"]] = normalizer.normalize_state(state)
        actions = self.module.sample_actions(
            tokens, mask, padded.to(self.device), torch.tensor([emb["id"]], device=self.device),
            num_steps=self.num_steps, generator=self._generator,
        )[0, :, : emb["action_dim"]].cpu()  # [H, A]
        return {"actions": normalizer.unnormalize_actions(actions).numpy().astype(np.float32)}

    # ------------------------------------------------------------------ internals
    def images_tensor(self, observation: dict[str, Any]) -> torch.Tensor:
        views = self.spec["views"]
        missing = [v for v in views if v not in observation.get("images", {})]
        if missing:
            raise KeyError(f"observation['images'] lacks views {missing}; expected {list(views)}")
        frames = [torch.as_tensor(np.ascontiguousarray(observation["images"][v])).permute(2, 0, 1) for v in views]
        return torch.stack(frames)[None].to(self.device)  # [1, V, 3, h, w] uint8

    def _system2(self, observation: dict[str, Any], instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        fresh = (
            self._cache is None
            or self._cache[0] != instruction
            or self._calls_since_system2 >= self.system2_period
        )
        if fresh:
            tokens, mask = self.module.encode_observation(self.images_tensor(observation), [instruction])
            self._cache = (instruction, tokens, mask)
            self._calls_since_system2 = 0
        self._calls_since_system2 += 1
        return self._cache[1], self._cache[2]
