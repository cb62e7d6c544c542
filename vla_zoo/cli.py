"""The ``vla-zoo`` / ``lightning`` command: LightningCLI in subclass mode for both model and data.

Every recipe picks its LightningModule and LightningDataModule (and, through them, every component) by
``class_path``; several ``--config`` files are layered left to right, so an ablation is a short overlay.

Three ways to run it, all equivalent::

    vla-zoo fit --config recipes/pretrain.yaml
    lightning fit --config recipes/pretrain.yaml     # the alias our users type
    python -m vla_zoo fit --config recipes/pretrain.yaml
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

#: Key under which the resolved run config (YAML text) is stored inside every checkpoint.
CHECKPOINT_CONFIG_KEY = "vla_zoo_config"


class SaveConfigToLogDirAndCheckpoints(SaveConfigCallback):
    """Writes ``config.yaml`` next to the run's checkpoints and embeds the same text in every checkpoint.

    Lightning's callback only writes the file. A checkpoint copied away from its log dir would then lose the
    recipe that built it, so we also put the resolved YAML inside the checkpoint: ``load_run_config(ckpt)``
    gets it back and a checkpoint rebuilds its model alone.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Keep the whole resolved config as text once; it is cheap and identical on every rank.
        self._config_text = self.parser.dump(self.config, skip_none=False, skip_validation=True)
        if stage != "fit":
            # validate / test / predict on a finished run read its config; they must not refuse to run because
            # the run's config.yaml exists, nor replace the recipe that trained the checkpoint.
            return
        super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        text = getattr(self, "_config_text", None)
        if text is not None:
            checkpoint[CHECKPOINT_CONFIG_KEY] = text


def load_run_config(checkpoint: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The resolved config (as a plain dict) that produced a checkpoint, read from the checkpoint alone."""
    import torch

    if not isinstance(checkpoint, dict):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        # Memory-mapped: only the pickle is parsed and no tensor is read, so callers that also load the weights
        # (Policy.from_checkpoint, the evaluator, the probes) do not pay for reading the file twice.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if CHECKPOINT_CONFIG_KEY not in checkpoint:
        raise KeyError(
            f"checkpoint has no '{CHECKPOINT_CONFIG_KEY}' entry: it was not written by the vla-zoo CLI "
            "(train with `vla-zoo fit --config ...` to embed the recipe)"
        )
    return yaml.safe_load(checkpoint[CHECKPOINT_CONFIG_KEY])


class VLAZooCLI(LightningCLI):
    """LightningCLI with the project's defaults: subclass mode everywhere, configs saved in log dir and checkpoints."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", SaveConfigToLogDirAndCheckpoints)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf", "prog": "vla-zoo"})
        # Recipes set `seed_everything` themselves; an unset seed must still be reproducible from the saved config.
        kwargs.setdefault("seed_everything_default", True)
        super().__init__(LightningModule, LightningDataModule, args=args, run=run, **kwargs)


def main(args: list[str] | None = None) -> None:
    # Meta-World and MuJoCo render headless only through EGL/OSMesa; default to EGL unless the user chose.
    os.environ.setdefault("MUJOCO_GL", "egl")
    # Injecting nn.Module components as hyper-parameters is the design (the checkpoint must rebuild them), so
    # Lightning's advice to exclude them from save_hyperparameters does not apply here.
    warnings.filterwarnings("ignore", message=r"Attribute '.*' is an instance of `nn.Module`")
    VLAZooCLI(args=args)


if __name__ == "__main__":
    main()
