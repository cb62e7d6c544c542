"""The deployable policy: a checkpoint in, raw observations in, action chunks in robot units out.

``Policy.from_checkpoint(path)`` needs nothing but the checkpoint: the model is rebuilt from the recipe embedded
by the CLI, and the normalisation statistics, embodiment map, views and horizon come from the data spec the
training run stored beside the weights.

Dual-rate control (paper Sec. 2.1: System 2 at ~10 Hz, System 1 at ~120 Hz): ``system2_period`` is the number of
``get_action`` calls that reuse one set of vision-language tokens; 1 recomputes them on every call. A new
instruction or embodiment always refreshes them. ``num_samples`` > 1 returns the mean of that many flow samples
per chunk (``Policy.act``).

Inputs out of the training data's range: a state holding NaN or inf is refused (``ObservationError`` naming the
key and dims), as the server does. A finite state outside the range its embodiment's normaliser was fitted on
(``min_max``: the training min and max; ``q01_q99``: the 1st and 99th percentiles) is clipped to that range, as in
training, with one warning per embodiment and key per policy; ``mean_std`` statistics define no range and pass
such values through unchanged.

``precision`` stores weights in bf16, cast once when the policy is built (a copy, if the module is also used
elsewhere, e.g. being trained), rather than casting every weight again on every call as autocast over fp32 weights
does: batch-1 inference is bound by reading weights, and bf16 weights halve the bytes read.

- ``"bf16-mixed"``: the weights of the linear layers (almost all the bytes) in bf16, the rest (norms, embeddings,
  position tables) in fp32, the two systems run under bf16 autocast: the matmuls run in bf16 on weights that need
  no cast, while norms, softmax and the residual stream stay fp32, so actions match autocast's accuracy.
- ``"bf16-true"``: every weight and activation in bf16: fewest bytes, but the residual stream and the Euler
  integration round to bf16 (several times the action error of ``bf16-mixed``).

Where the CPU has no bf16 units (``vla_zoo.machine.bf16_units``) bf16 is emulated and slow; a warning says so.
``benchmarks/policy_precision.py`` measures the latency and the action error against fp32.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import warnings
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule

from datamodules.normalization import Normalizer
from datamodules.spec import EmbodimentSpec
from lit_modules.checkpoint import load_module, load_run_config
from vla_zoo.deploy.validation import validate_observation

log = logging.getLogger(__name__)

#: Inference precisions (module docstring): fp32; linear layers' weights in bf16 under autocast; all in bf16.
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def _linear_layers(module: Any) -> list[Any]:
    """Layers that multiply by a weight matrix (``nn.Linear``, per-embodiment adapters: anything declaring
    ``in_features``/``out_features``)."""
    return [m for m in module.modules() if isinstance(getattr(m, "in_features", None), int)
            and isinstance(getattr(m, "out_features", None), int)]


def _weights_in(module: Any, precision: str, device: torch.device, copy_first: bool) -> Any:
    """``module`` with its weights stored as ``precision`` says (a copy if ``copy_first`` and a cast is needed, so a
    module trained elsewhere is never changed under its trainer)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "32-true":
        return module
    bf16 = [p for layer in ([module] if precision == "bf16-true" else _linear_layers(module))
            for p in layer.parameters() if p.is_floating_point()]
    if all(p.dtype == torch.bfloat16 for p in bf16):
        return module
    from vla_zoo.machine import bf16_units

    if bf16_units(device) is None:
        log.warning("precision=%r on %s, which has no bf16 units: bf16 is emulated there and slower than fp32",
                    precision, device)
    module = copy.deepcopy(module) if copy_first else module
    if precision == "bf16-true":
        return module.to(torch.bfloat16)
    for layer in _linear_layers(module):
        for param in layer.parameters():  # an adapter's per-embodiment weights sit in its parameter lists
            if param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
    return module


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class Policy:
    """Implements the policy contract: ``get_action(observation) -> {"actions": [H, A]}``, ``metadata()``, ``reset()``.

    ``observation = {"embodiment": str, "instruction": str, "images": {view: uint8 [h, w, 3]}, "state": [S]}``.

    ``module`` is a trained ``VLAPolicy``: its ``backbone`` (System 2), ``action_head`` (System 1) and ``data_spec``
    (normalisers, views, embodiment slots) are all inference needs.
    """

    def __init__(
        self,
        module: Any,
        system2_period: int = 1,
        num_steps: int | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_samples: int = 1,
        precision: str = "32-true",
    ) -> None:
        if system2_period < 1:
            raise ValueError(f"system2_period must be >= 1, got {system2_period}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if getattr(module, "data_spec", None) is None:
            raise ValueError("the model carries no data spec (normalisers, embodiments): train it with a "
                             "datamodule that provides `data_spec()`, e.g. datamodules.mixture.MixtureDataModule")
        self.device = torch.device(device)
        self.precision = precision
        self.module = _weights_in(module, precision, self.device, copy_first=True).to(device).eval()
        self.spec = module.data_spec
        self.system2_period, self.num_steps, self.seed = system2_period, num_steps, seed
        self.num_samples = num_samples
        self._normalizers: dict[str, Normalizer] = {}
        self._warned_out_of_range: set[tuple[str, str]] = set()
        self.reset()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", **kwargs: Any) -> "Policy":
        path = os.fspath(path)
        class_path = load_run_config(path)["model"]["class_path"]
        module_cls = _import(class_path)
        if not (isinstance(module_cls, type) and issubclass(module_cls, LightningModule)):
            raise ValueError(f"checkpoint {path!r}: its recipe's model.class_path {class_path!r} is not a "
                             "LightningModule, so this file was not written by `vla-zoo fit`")
        module = load_module(module_cls, path, map_location=device)
        # Loaded for this policy alone: cast in place (no copy).
        module = _weights_in(module, kwargs.get("precision", "32-true"), torch.device(device), copy_first=False)
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

    def _warn_out_of_range(self, embodiment: str, normalizer: Any, state: Any) -> None:
        """One warning per (embodiment, key) per policy when a state value lies outside what ``normalize`` keeps."""
        bounds = normalizer.clip_range("state")
        if bounds is None or (embodiment, "state") in self._warned_out_of_range:
            return
        low, high = bounds
        x = np.asarray(state, dtype=np.float64).reshape(-1)
        if x.shape != low.shape:
            return  # the model's own check names the dimension mismatch
        tolerance = 1e-5 * (1.0 + np.abs(low) + np.abs(high))  # float32 statistics round the bounds
        outside = np.flatnonzero((x < low - tolerance) | (x > high + tolerance))
        if outside.size:
            self._warned_out_of_range.add((embodiment, "state"))
            warnings.warn(
                f"observation['state'] of embodiment {embodiment!r}: dims {outside.tolist()} "
                f"(values {x[outside].tolist()}) lie outside the range the policy was trained on "
                f"(low {low[outside].tolist()}, high {high[outside].tolist()}); they are clipped to it, as in "
                "training. Warned once per embodiment for this policy.",
                stacklevel=3,
            )

    def get_action(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        # The server's check, so a bad observation fails here as it would over the network, naming the key, before
        # any work; frames of another size than the metadata's are fine in process (the backbone resizes them).
        validate_observation(observation, self.metadata(), any_image_size=True)
        embodiment = observation["embodiment"]
        self._warn_out_of_range(embodiment, self._normalizer(embodiment)[1], observation["state"])
        key = (embodiment, observation["instruction"])
        if self._cache is None or self._cache[0] != key or self._calls_since_system2 >= self.system2_period:
            images = self.observation_images(observation)
            tokens, mask = self.encode_observation(images, [observation["instruction"]])
            self._cache, self._calls_since_system2 = (key, tokens, mask), 0
        self._calls_since_system2 += 1
        _, tokens, mask = self._cache
        actions = self.act(tokens, mask, observation["state"], embodiment, self.num_steps, self._generator,
                           num_samples=self.num_samples)
        return {"actions": actions[0].numpy().astype(np.float32)}

    # ------------------------------------------------------------------ the two systems
    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16-mixed: autocast casts the activations only (the linear layers' weights are bf16 already); otherwise
        nothing (not autocast(enabled=False), which would switch off a caller's own autocast)."""
        if self.precision != "bf16-mixed":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _normalizer(self, embodiment: str) -> tuple[EmbodimentSpec, Normalizer]:
        spec = self.spec.embodiment(embodiment)
        if embodiment not in self._normalizers:
            self._normalizers[embodiment] = Normalizer.from_dict(spec.normalizer)
        return spec, self._normalizers[embodiment]

    def observation_images(self, observation: dict[str, Any]) -> torch.Tensor:
        """``observation["images"][view]`` uint8 ``[h, w, 3]`` for the trained views -> ``[1, V, 3, h, w]``."""
        views = self.spec.views
        images = observation.get("images", {})
        missing = [v for v in views if v not in images]
        if missing:
            raise KeyError(f"observation['images'] lacks views {missing}; this model expects {list(views)}")
        frames = [torch.as_tensor(np.ascontiguousarray(images[v])).permute(2, 0, 1) for v in views]
        return torch.stack(frames)[None].to(self.device)

    @torch.no_grad()
    def encode_observation(self, images: torch.Tensor, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """System 2: uint8 images ``[B, V, 3, h, w]`` + instructions -> VL tokens ``[B, S, D]`` and mask ``[B, S]``."""
        with self._autocast():
            tokens, mask = self.module.backbone(images, instructions)
        return tokens, mask

    @torch.no_grad()
    def act(
        self,
        vl_tokens: torch.Tensor,
        vl_mask: torch.Tensor,
        state: np.ndarray | torch.Tensor,
        embodiment: str,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        num_samples: int = 1,
    ) -> torch.Tensor:
        """System 1 from cached VL tokens: raw state ``[B, S]`` -> raw action chunk ``[B, H, A]`` in the
        embodiment's own units and dimension (K Euler steps, cross-attention K/V computed once).

        ``num_samples`` > 1 draws that many chunks per observation in one batch and returns their mean: an estimate
        of E[a | o] with 1/sqrt(n) of a single draw's sampling noise (it would blend the modes of a multimodal
        action distribution, so it is an evaluation option, off by default)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        spec, normalizer = self._normalizer(embodiment)
        state = torch.as_tensor(np.asarray(state, dtype=np.float32)).reshape(vl_tokens.shape[0], -1)
        if state.shape[1] != spec.state_dim:
            raise ValueError(f"state has {state.shape[1]} dims; embodiment {embodiment!r} expects {spec.state_dim}")
        padded = torch.zeros(state.shape[0], self.spec.max_state_dim)
        padded[:, : spec.state_dim] = normalizer.normalize(state, "state")
        embodiment_id = torch.full((state.shape[0] * num_samples,), spec.id, dtype=torch.long, device=self.device)
        # [B, ...] -> [B * n, ...], each observation's n copies adjacent, so the mean is over dim 1 of [B, n, H, A].
        with self._autocast():
            actions = self.module.action_head.sample(vl_tokens.repeat_interleave(num_samples, 0),
                                                     vl_mask.repeat_interleave(num_samples, 0),
                                                     padded.to(self.device, vl_tokens.dtype).repeat_interleave(
                                                         num_samples, 0),
                                                     embodiment_id, num_steps=num_steps, generator=generator)
        actions = actions.unflatten(0, (state.shape[0], num_samples)).float().mean(1)  # [B, H, A]; the norm is affine
        return normalizer.unnormalize(actions[..., : spec.action_dim].cpu(), "actions")

    @torch.no_grad()
    def predict_action(
        self, observation: dict[str, Any], num_steps: int | None = None, generator: torch.Generator | None = None
    ) -> np.ndarray:
        """One raw observation -> the action chunk ``[H, A]`` in robot units, with no token cache and one flow draw
        (``generator``: its noise; default: the policy's own)."""
        self._normalizer(observation.get("embodiment"))  # clear error on an unknown embodiment before any work
        tokens, mask = self.encode_observation(self.observation_images(observation), [observation["instruction"]])
        actions = self.act(tokens, mask, observation["state"], observation["embodiment"], num_steps,
                           generator if generator is not None else self._generator)
        return actions[0].numpy()


def policy_from_module(module: Any, **kwargs: Any) -> Policy:
    """The policy of a module being trained (``ClosedLoopEvalCallback(policy_factory=...)`` in recipes)."""
    return Policy(module, device=module.device, **kwargs)
