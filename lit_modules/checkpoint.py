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

import copy
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


#: Callbacks that moved into ``vla_zoo.callbacks``: old class path -> new.
MOVED_CLASS_PATHS = {f"{old}.{name}": f"vla_zoo.callbacks.{name}" for old, name in (
    ("datamodules.mixture", "MixtureMonitor"), ("vla_zoo.evaluation", "ClosedLoopEvalCallback"),
    ("vla_zoo.open_loop", "OpenLoopEvalCallback"))}


def upgrade_run_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run config written before ``VLAPolicy``'s arguments were grouped and the callbacks moved to
    ``vla_zoo.callbacks``, rewritten into today's layout (a current config comes back equal; the input is kept)."""
    config = copy.deepcopy(config)
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict) and callback.get("class_path") in MOVED_CLASS_PATHS:
            callback["class_path"] = MOVED_CLASS_PATHS[callback["class_path"]]
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    args = model.get("init_args")
    if not str(model.get("class_path", "")).endswith("VLAPolicy") or not isinstance(args, dict):
        return config
    if "warmup_ratio" in args or isinstance(args.get("lr_schedule"), str):
        args["lr_schedule"] = {"kind": args.pop("lr_schedule", "cosine"), "warmup_ratio": args.pop("warmup_ratio", 0.05)}
    if "frame_index" in args or "image_augmentation" in args:
        args["observation"] = {"frame_index": args.pop("frame_index", 0),
                               "augmentation": args.pop("image_augmentation", None)}
    parts = args.pop("init_from_parts", None)
    if args.get("init_from") and parts is not None and list(parts) != ["backbone", "action_head"]:
        args["init_from"] = {"path": args["init_from"], "parts": list(parts)}
    # Moved into the component they configure; a default value is dropped (the component may not take it).
    for key, owner, name, default in (("use_vl_mask", "action_head", "use_vl_mask", True),
                                      ("compile_backend", "action_head", "compile_backend", None),
                                      ("privileged_loss_weight", "privileged_head", "loss_weight", 1.0)):
        value = args.pop(key, default)
        if value != default and isinstance(args.get(owner), dict):
            args[owner]["init_args"] = {**(args[owner].get("init_args") or {}), name: value}
    return config


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
    return upgrade_run_config(yaml.safe_load(checkpoint[CONFIG_KEY]))


def upgraded_hyperparameters(hparams: dict[str, Any], class_path: str) -> dict[str, Any]:
    """A checkpoint's ``hyper_parameters`` (a module's init arguments, as Lightning stores them) through
    ``upgrade_run_config``."""
    class_path = hparams.get("_class_path", class_path)
    return upgrade_run_config({"model": {"class_path": class_path, "init_args": dict(hparams)}})["model"]["init_args"]


def load_module(module_cls: type, path: str | os.PathLike, **kwargs: Any) -> Any:
    """``module_cls.load_from_checkpoint(path, **kwargs)`` through Lightning's ``weights_only=True`` path, with the
    checkpoint's hyper-parameters in today's layout (``upgrade_run_config``)."""
    hparams = read_checkpoint(path, mmap=True).get("hyper_parameters") or {}
    upgraded = upgraded_hyperparameters(hparams, f"{module_cls.__module__}.{module_cls.__qualname__}")
    # Lightning passes the stored arguments with these on top and drops names the constructor does not take.
    kwargs = {**{k: v for k, v in upgraded.items() if not k.startswith("_") and hparams.get(k) != v}, **kwargs}
    try:
        with safe_unpickling():
            return module_cls.load_from_checkpoint(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise refusal(path, e) from None
