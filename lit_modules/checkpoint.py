"""Reading checkpoints without running code: the one reader of vla-zoo checkpoints and the keys we store in them.

A ``.ckpt`` is a pickle, and unpickling can call any importable function, so a checkpoint from elsewhere could run
code the moment it is read. Every read here goes through ``torch.load(..., weights_only=True)``: tensors, storages
and plain containers (dict, list, tuple, str, numbers, None) are rebuilt, plus the few classes in
``SAFE_GLOBALS``; anything else (a pickled function call, an ``nn.Module`` object, ``functools.partial``) is refused
before it is built.

What a checkpoint written by ``vla-zoo fit`` holds needs nothing beyond torch's own list: the CLI stores the recipe
as YAML text and every component as a ``{class_path, init_args}`` config, Lightning stores loop, optimiser,
scheduler and callback state as plain data, and the data side stores statistics as lists. ``SAFE_GLOBALS`` adds the
filesystem paths a run started from Python may keep in its hyper-parameters (``init_from=Path(...)``).
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import yaml

#: Where ``vla_zoo.cli`` embeds the run's resolved YAML recipe, so a checkpoint rebuilds its model alone.
CONFIG_KEY = "vla_zoo_config"
#: Where ``VLAPolicy`` stores what inference needs from the data side (normalisers, embodiment map, modalities).
DATA_SPEC_KEY = "vla_zoo_data_spec"
#: Where Lightning stores ``MixtureDataModule.state_dict()`` (its class name).
MIXTURE_STATE_KEY = "MixtureDataModule"

#: Classes a checkpoint may hold beyond torch's default ``weights_only`` set. Building them runs no user code.
SAFE_GLOBALS: list[Any] = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds something that could run code when read; it was refused and nothing in it was run."""


@contextmanager
def safe_unpickling() -> Iterator[None]:
    """Within this block, ``weights_only`` loads (ours, and Lightning's when resuming) also accept ``SAFE_GLOBALS``."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        yield


def refusal(path: Any, error: pickle.UnpicklingError) -> UnsafeCheckpointError:
    """The error for a checkpoint ``torch.load(weights_only=True)`` refused: the file, what it holds, the way out."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error)) or re.search(r"Unsupported global: (\S+)", str(error))
    what = f"a pickled reference to `{found.group(1)}`" if found else "pickled objects"
    return UnsafeCheckpointError(
        f"checkpoint {os.fspath(path)!r} was refused: it holds {what}, which could run code when loaded, and is not "
        "in lit_modules.checkpoint.SAFE_GLOBALS (nothing in it was executed). Checkpoints written by `vla-zoo fit` "
        "hold only tensors and plain data; a checkpoint saved from Python with objects in its hyper-parameters "
        "(an nn.Module, a functools.partial) must be re-saved with those parts given as YAML `class_path` configs, "
        "or passed again to load_from_checkpoint and excluded from save_hyperparameters"
    )


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint file as a dict, read with ``weights_only=True``. ``mmap=True`` parses the pickle without reading
    the tensors' bytes (for callers that want only the config or statistics)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_unpickling():
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise refusal(path, e) from None
    except Exception as e:  # not a zip archive, truncated, wrong magic number, a text file
        raise ValueError(f"checkpoint {path!r} cannot be read as a torch checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def load_run_config(checkpoint: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The resolved config (as a plain dict) that produced a checkpoint, read from the checkpoint alone."""
    if not isinstance(checkpoint, dict):
        # Memory-mapped: only the pickle is parsed and no tensor is read, so callers that also load the weights
        # (Policy.from_checkpoint, the evaluator, the probes) do not pay for reading the file twice.
        checkpoint = read_checkpoint(checkpoint, mmap=True)
    if CONFIG_KEY not in checkpoint:
        raise KeyError(
            f"checkpoint has no '{CONFIG_KEY}' entry: it was not written by the vla-zoo CLI "
            "(train with `vla-zoo fit --config ...` to embed the recipe)"
        )
    return yaml.safe_load(checkpoint[CONFIG_KEY])


def load_module(module_cls: type, path: str | os.PathLike, **kwargs: Any) -> Any:
    """``module_cls.load_from_checkpoint(path, **kwargs)`` through Lightning's ``weights_only=True`` path."""
    try:
        with safe_unpickling():
            return module_cls.load_from_checkpoint(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise refusal(path, e) from None
