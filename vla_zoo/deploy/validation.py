"""Check a policy observation against the policy's ``metadata()`` before it reaches the model.

A malformed observation would otherwise fail deep inside the model with a shape error about some tensor the caller
never sees (or, worse, run and return nonsense). Every error here names the key and what was expected, so the
person wiring up a robot can fix the client from the message alone.

``request_limits`` turns the same metadata into the bounds a server decodes requests under.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vla_zoo.deploy.codec import Limits

REQUIRED_KEYS = ("embodiment", "images", "state", "instruction")
#: Longest string a request may carry (the instruction): a paragraph of text is about 1 KiB.
MAX_TEXT_BYTES = 64 * 2**10
#: Ceiling of the derived message size; ``--max-message-mb`` may set another.
MAX_DERIVED_MESSAGE_BYTES = 64 * 2**20


class ObservationError(ValueError):
    """An observation that does not match what the policy's metadata says it expects."""


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {list(value.shape)}"
    return type(value).__name__


def require_finite(value: Any, key: str) -> None:
    """Raise :class:`ObservationError` naming ``observation[key]`` and its dims if ``value`` holds NaN or inf.

    A non-finite input poisons every output of the network (one NaN state dim gives NaN in the whole chunk), so it
    is refused rather than passed on."""
    array = np.asarray(value, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ObservationError(
            f"observation[{key!r}] holds NaN or inf at dims {bad.tolist()} (values {array.ravel()[bad].tolist()}); "
            "a policy cannot act on non-finite inputs: check the sensor or the code that fills this field"
        )


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


def request_limits(metadata: Mapping[str, Any], max_message_bytes: int | None = None) -> Limits:
    """What one request to a policy with ``metadata`` may hold, with a wide margin.

    A request is a few maps (request, observation, images, one per array) and short shape lists; its bulk is one
    binary per image. Allowed: 4x the policy's views + 4 (a robot may send every camera it has), each image up to
    16x the policy's pixels or 1 MiB, strings up to ``MAX_TEXT_BYTES``. The message size follows from those (at
    most ``MAX_DERIVED_MESSAGE_BYTES``) unless ``max_message_bytes`` is given.
    """
    specs = list(metadata["embodiments"].values())
    views = 4 * max(len(spec["image_keys"]) for spec in specs) + 4
    image_bytes = max(int(np.prod(spec["image_size"])) * 3 for spec in specs)  # uint8 [h, w, 3]
    state_bytes = max(8 * int(spec["state_dim"]) for spec in specs)  # float64 [S] at most
    max_bin = max(16 * image_bytes, state_bytes, 2**20)
    derived = min(views * max_bin + MAX_TEXT_BYTES + 2**16, MAX_DERIVED_MESSAGE_BYTES)
    return Limits(
        max_message_bytes=max_message_bytes or derived,
        max_str_len=MAX_TEXT_BYTES,
        max_bin_len=max_bin,
        max_array_len=64,  # array shapes (the codec allows 32 dims)
        max_map_len=views + 16,  # the images map; the others hold a handful of keys
        max_containers=2 * views + 64,  # a map and a shape list per array, plus the request's own maps
    )


def _check_image(view: str, image: Any, size: tuple[int, int] | None) -> None:
    """``image`` must be uint8 ``[h, w, 3]``, at ``size`` when one is given."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        if size is None or image.shape[:2] == size:
            return
    expected = f"[{size[0]}, {size[1]}, 3]" if size is not None else "[height, width, 3]"
    greyscale = isinstance(image, np.ndarray) and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1))
    hint = "; a greyscale image must be repeated over 3 channels" if greyscale else ""
    raise ObservationError(
        f"observation['images'][{view!r}] must be a uint8 array of shape {expected} (RGB, height, width), "
        f"got {_describe(image)}{hint}"
    )


def validate_observation(observation: Any, metadata: Mapping[str, Any], *, any_image_size: bool = False) -> None:
    """Raise :class:`ObservationError` unless ``observation`` is what a policy with ``metadata`` accepts.

    Expected: ``{"embodiment": str (one of metadata["embodiments"]), "images": {view: uint8 [h, w, 3]} with every
    view in the embodiment's ``image_keys`` at its ``image_size``, "state": float [state_dim] (finite),
    "instruction": str}``. Extra image views are allowed (a policy may use a subset of the robot's cameras).
    ``any_image_size``: the views may have another size than ``image_size`` but must share one (an in-process
    model resizes its frames; a server keeps the size it advertises).
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
        _check_image(view, images[view], None if any_image_size else (h, w))
    sizes = {view: list(images[view].shape[:2]) for view in spec["image_keys"]}
    if len({tuple(size) for size in sizes.values()}) > 1:
        raise ObservationError(f"observation['images'] views differ in size {sizes}: the model stacks them, so every "
                               f"view must have one size (it was trained at {[h, w]})")

    state = observation["state"]
    state_dim = spec["state_dim"]
    if not (isinstance(state, np.ndarray) and state.dtype.kind == "f" and state.shape == (state_dim,)):
        raise ObservationError(
            f"observation['state'] must be a float32 (or float64) array of shape [{state_dim}] for embodiment "
            f"{embodiment!r}, got {_describe(state)}"
        )
    require_finite(state, "state")

    instruction = observation["instruction"]
    if not isinstance(instruction, str):
        raise ObservationError(f"observation['instruction'] must be a str, got {_describe(instruction)}")
