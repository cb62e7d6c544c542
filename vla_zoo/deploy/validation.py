"""Check a policy observation against the policy's ``metadata()`` before it reaches the model.

A malformed observation would otherwise fail deep inside the model with a shape error about some tensor the caller
never sees (or, worse, run and return nonsense). Every error here names the key and what was expected, so the
person wiring up a robot can fix the client from the message alone.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

REQUIRED_KEYS = ("embodiment", "images", "state", "instruction")


class ObservationError(ValueError):
    """An observation that does not match what the policy's metadata says it expects."""


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {list(value.shape)}"
    return type(value).__name__


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if a policy's ``metadata()`` does not follow the policy contract."""
    embodiments = metadata.get("embodiments") if isinstance(metadata, Mapping) else None
    if not isinstance(embodiments, Mapping) or not embodiments:
        raise ValueError(f"policy metadata needs a non-empty 'embodiments' map, got {metadata!r}")
    for name, spec in embodiments.items():
        missing = [k for k in ("state_dim", "action_dim", "image_keys", "image_size") if k not in spec]
        if missing:
            raise ValueError(f"policy metadata for embodiment {name!r} lacks {missing}")
    if not isinstance(metadata.get("horizon"), int):
        raise ValueError(f"policy metadata needs an int 'horizon', got {metadata.get('horizon')!r}")


def validate_observation(observation: Any, metadata: Mapping[str, Any]) -> None:
    """Raise :class:`ObservationError` unless ``observation`` is what a policy with ``metadata`` accepts.

    Expected: ``{"embodiment": str (one of metadata["embodiments"]), "images": {view: uint8 [h, w, 3]} with every
    view in the embodiment's ``image_keys`` at its ``image_size``, "state": float [state_dim] (finite),
    "instruction": str}``. Extra image views are allowed (a policy may use a subset of the robot's cameras).
    """
    if not isinstance(observation, Mapping):
        raise ObservationError(f"observation must be a map with keys {list(REQUIRED_KEYS)}, got {_describe(observation)}")
    missing = [k for k in REQUIRED_KEYS if k not in observation]
    if missing:
        raise ObservationError(f"observation is missing {missing}; expected keys {list(REQUIRED_KEYS)}")

    embodiments = metadata["embodiments"]
    embodiment = observation["embodiment"]
    if not isinstance(embodiment, str):
        raise ObservationError(f"observation['embodiment'] must be a str, got {_describe(embodiment)}")
    if embodiment not in embodiments:
        raise ObservationError(f"unknown embodiment {embodiment!r}; this policy serves {sorted(embodiments)}")
    spec = embodiments[embodiment]

    images = observation["images"]
    if not isinstance(images, Mapping):
        raise ObservationError(f"observation['images'] must be a map of view name -> image, got {_describe(images)}")
    h, w = spec["image_size"]
    for view in spec["image_keys"]:
        if view not in images:
            raise ObservationError(
                f"observation['images'] is missing view {view!r}; embodiment {embodiment!r} expects views "
                f"{list(spec['image_keys'])}, got {sorted(images)}"
            )
        image = images[view]
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (h, w, 3)):
            raise ObservationError(
                f"observation['images'][{view!r}] must be a uint8 array of shape [{h}, {w}, 3] (RGB, height, width), "
                f"got {_describe(image)}"
            )

    state = observation["state"]
    state_dim = spec["state_dim"]
    if not (isinstance(state, np.ndarray) and state.dtype.kind == "f" and state.shape == (state_dim,)):
        raise ObservationError(
            f"observation['state'] must be a float32 (or float64) array of shape [{state_dim}] for embodiment "
            f"{embodiment!r}, got {_describe(state)}"
        )
    if not np.isfinite(state).all():
        raise ObservationError(f"observation['state'] contains NaN or inf: {state.tolist()}")

    instruction = observation["instruction"]
    if not isinstance(instruction, str):
        raise ObservationError(f"observation['instruction'] must be a str, got {_describe(instruction)}")
