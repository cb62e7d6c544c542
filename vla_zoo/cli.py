"""The ``vla-zoo`` / ``lightning`` command: LightningCLI in subclass mode for both model and data.

Every recipe picks its LightningModule and LightningDataModule (and, through them, every component) by
``class_path``; several ``--config`` files are layered left to right, so an ablation is a short overlay.

Three ways to run it, all equivalent::

    vla-zoo fit --config recipes/pretrain.yaml
    lightning fit --config recipes/pretrain.yaml     # the alias our users type
    python -m vla_zoo fit --config recipes/pretrain.yaml
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from typing import Any, Literal, Optional, Union

import yaml
from jsonargparse import set_parsing_settings
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch import Trainer as LightningTrainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from datamodules.progress import configure_logging
from lit_modules.checkpoint import (
    CONFIG_KEY,
    load_run_config,
    read_checkpoint,
    refusal,
    safe_unpickling,
    upgraded_hyperparameters,
)
from vla_zoo.callbacks import CheckpointOnSignal, StepsProgressBar, StopOnNonFiniteLoss
from vla_zoo.precision import BF16MixedPrecision, accelerator_device, resolve_auto

log = logging.getLogger("lightning.pytorch.vla_zoo")  # Lightning's handler prints it with the run's other notices


def _plain_strategy(strategy: Any) -> bool:
    """Strategies that use the accelerator's own precision plugin (sharded ones bring their own)."""
    if isinstance(strategy, str):
        return strategy in ("auto", "single_device") or strategy.startswith("ddp")
    return isinstance(strategy, (DDPStrategy, SingleDeviceStrategy))


class Trainer(LightningTrainer):
    """Lightning's Trainer with ``precision="auto"`` (``vla_zoo.precision``), and ``bf16-mixed`` that clips
    gradients with fused optimisers (``BF16MixedPrecision``) under the single-device and DDP strategies.

    The CLI resolves ``auto`` for its model before building the Trainer; built directly, the Trainer resolves it
    from generic layer shapes.
    """

    def __init__(self, *, precision: Optional[Union[_PRECISION_INPUT, Literal["auto"]]] = None, **kwargs: Any) -> None:
        accelerator = kwargs.get("accelerator", "auto")
        if precision == "auto":
            choice = resolve_auto(None, accelerator)
            log.info("precision auto -> %s: %s", choice.precision, choice.reason)
            precision = choice.precision
        plugins = kwargs.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        device = accelerator_device(accelerator)
        plain = _plain_strategy(kwargs.get("strategy", "auto"))
        if (precision in ("bf16-mixed", "bf16") and device is not None and plain
                and not any(isinstance(p, Precision) for p in plugins)):
            kwargs["plugins"], precision = [*plugins, BF16MixedPrecision(device.type)], None
        super().__init__(precision=precision, **kwargs)


class SaveConfigToLogDirAndCheckpoints(SaveConfigCallback):
    """Writes ``config.yaml`` next to the run's checkpoints and embeds the same text in every checkpoint.

    Lightning's callback only writes the file. A checkpoint copied away from its log dir would then lose the
    recipe that built it, so we also put the resolved YAML inside the checkpoint:
    ``lit_modules.checkpoint.load_run_config(ckpt)`` gets it back and a checkpoint rebuilds its model alone.
    """

    def setup(self, trainer: LightningTrainer, pl_module: LightningModule, stage: str) -> None:
        # Keep the whole resolved config as text once; it is cheap and identical on every rank.
        self._config_text = self.parser.dump(self.config, skip_none=False, skip_validation=True)
        if stage != "fit":
            # validate / test / predict on a finished run read its config; they must not refuse to run because
            # the run's config.yaml exists, nor replace the recipe that trained the checkpoint.
            return
        # A resumed fit (`--ckpt_path`) continues the run whose config.yaml is there: refresh it rather than refuse.
        self.overwrite = self.overwrite or bool(self.config.get("ckpt_path"))
        super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(self, trainer: LightningTrainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        text = getattr(self, "_config_text", None)
        if text is not None:
            checkpoint[CONFIG_KEY] = text


def default_checkpoint_dirs(trainer: LightningTrainer) -> list[str]:
    """Gives every ``ModelCheckpoint`` without a ``dirpath`` the run's stable ``<default_root_dir>/checkpoints``
    (Lightning's default is the logger's version directory, new for every run, so ``--ckpt_path last`` would find
    nothing); returns the directories the run's checkpoints go to."""
    dirs = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            if callback.dirpath is None:
                callback.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
            dirs.append(os.fspath(callback.dirpath))
    return dirs


def resolve_last(dirs: list[str]) -> str:
    """``--ckpt_path last``: the newest ``last*.ckpt`` in the run's checkpoint directories. Finding none is an error
    (Lightning would start from scratch with a warning, and a resumed run would silently restart)."""
    if not dirs:
        raise ValueError("--ckpt_path last: this run has no ModelCheckpoint callback, so it has no last checkpoint; "
                         "add one to trainer.callbacks (with save_last: true) or pass a checkpoint path")
    found = [os.path.join(d, name) for d in dirs if os.path.isdir(d)
             for name in os.listdir(d) if name.startswith("last") and name.endswith(".ckpt")]
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path last: no last*.ckpt in {dirs} (relative to {os.getcwd()}), so there is nothing to resume. "
            "Start the run without --ckpt_path, pass a checkpoint path, or point trainer.default_root_dir (or the "
            "ModelCheckpoint's dirpath) at the run you mean to continue"
        )
    return max(found, key=os.path.getmtime)


def check_same_run(path: str, run_config: dict[str, Any]) -> None:
    """Refuses to resume, as ``last``, a checkpoint another recipe wrote (runs that share a checkpoint directory):
    its embedded model and data config must equal this run's."""
    try:
        stored = load_run_config(path)
    except KeyError:
        return  # not written by the CLI: nothing to compare
    differ = [key for section in ("model", "data")
              for key in _differences(stored.get(section), run_config.get(section), section)]
    if differ:
        raise ValueError(
            f"--ckpt_path last resolved to {path}, which a different run wrote (its recipe differs at {differ[:5]}): "
            "this run shares its checkpoint directory with another. Give this recipe its own "
            "trainer.default_root_dir, or pass the checkpoint path itself to continue from it anyway"
        )


def _differences(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}")]
    return [] if a == b else [prefix]


class VLAZooCLI(LightningCLI):
    """LightningCLI with the project's defaults: subclass mode everywhere, configs saved in log dir and checkpoints."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", SaveConfigToLogDirAndCheckpoints)
        # Recipes state each number once and refer to it elsewhere as ${data.init_args.horizon}: "omegaconf+"
        # resolves the references after every --config file and command-line value is merged, so an overlay or a
        # flag that changes the number changes every consumer ("omegaconf" resolves each file alone). The setting
        # lets a reference name its target from the config's root, as written in the recipes.
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+", "prog": "vla-zoo"})
        # Recipes set `seed_everything` themselves; an unset seed must still be reproducible from the saved config.
        kwargs.setdefault("seed_everything_default", True)
        kwargs.setdefault("trainer_class", Trainer)
        super().__init__(LightningModule, LightningDataModule, args=args, run=run, **kwargs)


    def add_arguments_to_parser(self, parser: Any) -> None:
        # Every run stops at its first NaN/inf training loss; a recipe opts out with `non_finite_loss: {enabled: false}`.
        parser.add_lightning_class_args(StopOnNonFiniteLoss, "non_finite_loss")
        # Every run saves a resumable checkpoint when it is sent SIGTERM or SIGINT, then exits non-zero.
        parser.add_lightning_class_args(CheckpointOnSignal, "checkpoint_on_signal")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's: the model config takes ``--ckpt_path``'s hyper-parameters before the model is built; read
        here like every checkpoint (``read_checkpoint``: weights_only with our allow-list) and in today's layout."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not os.path.isfile(ckpt_path):
            return
        hparams = dict(read_checkpoint(ckpt_path, mmap=True).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = self.config[self.config.subcommand].get("model", {}).get("class_path", "")
        hparams = upgraded_hyperparameters(hparams, hparams.get("_class_path", class_path))
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        # `--ckpt_path` is read like every other checkpoint: weights_only, so a crafted file cannot run code.
        if "weights_only" in self._subcommand_method_arguments[subcommand] and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = True
        dirs = default_checkpoint_dirs(self.trainer)
        if kwargs.get("ckpt_path") == "last":
            kwargs["ckpt_path"] = resolve_last(dirs)
            if subcommand == "fit":
                run_config = yaml.safe_load(self._parser(subcommand).dump(
                    self.config[subcommand], skip_none=False, skip_validation=True))
                check_same_run(kwargs["ckpt_path"], run_config)
        return kwargs

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            with safe_unpickling():
                super()._run_subcommand(subcommand)
        except pickle.UnpicklingError as e:
            raise refusal(self.config_init[subcommand].get("ckpt_path"), e) from None

    def instantiate_trainer(self, **kwargs: Any) -> LightningTrainer:
        """Resolves ``trainer.precision: auto`` for this run's model (its linear layers' shapes), logging why; adds
        our progress bar and a CSV logger beside TensorBoard."""
        config = self._get(self.config_init, "trainer", default={})
        if config.get("precision") == "auto" and "precision" not in kwargs:
            choice = resolve_auto(self.model, config.get("accelerator", "auto"))
            log.info("precision auto -> %s: %s", choice.precision, choice.reason)
            kwargs["precision"] = choice.precision
        # Every run that shows a bar gets ours (StepsProgressBar says why), unless its recipe lists a bar itself.
        callbacks = config.get("callbacks")
        callbacks = [] if callbacks is None else callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            config["callbacks"] = [*callbacks, StepsProgressBar()]
        return with_csv_beside_tensorboard(super().instantiate_trainer(**kwargs))


def with_csv_beside_tensorboard(trainer: Trainer) -> Trainer:
    """Recipes log to TensorBoard; a CSVLogger writes the same metrics as ``metrics.csv`` into the same version
    folder (scripts and tests read it), unless the run lists a CSVLogger itself. The folder's version is fixed
    first: two loggers that each picked the next free ``version_N`` would pick two."""
    loggers = trainer.loggers
    tensorboard = [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]
    if tensorboard and not any(isinstance(lg, CSVLogger) for lg in loggers):
        tb = tensorboard[0]
        trainer.loggers = [*loggers, CSVLogger(tb.save_dir, name=tb.name, version=tb.version)]
    return trainer


def ignore_irrelevant_warnings() -> None:
    """Library warnings that do not apply to the zoo's modules and data, each with the reason it does not."""
    # Injecting nn.Module components as hyper-parameters is the design (the checkpoint must rebuild them), so
    # Lightning's advice to exclude them from save_hyperparameters does not apply here.
    warnings.filterwarnings("ignore", message=r"Attribute '.*' is an instance of `nn.Module`")
    # Our iterable datasets' lengths are exact with any number of workers and ranks (MixtureStream's worker w yields
    # batches w, w + W, ... of batches_per_epoch; EpisodeStream counts its rank's episodes), which is what
    # Lightning's warning asks about; the progress bar needs those lengths.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # Lightning suggests one loader worker per core, but our steps use the cores for the model: each recipe sets
    # num_workers to what its machine has left (batches are assembled inside the workers; see MixtureDataModule).
    warnings.filterwarnings("ignore", message=r".*does not have many workers")
    # A mixture without val_sources defines no val_dataloader (MixtureDataModule says why): a recipe that names no
    # held-out data has chosen to skip validation, which is all this warning reports.
    warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no `val_dataloader`")
    # The CSV metrics share the TensorBoard run's version folder on purpose (with_csv_beside_tensorboard), so that
    # folder already holds config.yaml and the event file when CSVLogger starts; it rewrites only its own files.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    # Lightning 2.6 checks pytree leaves in a way that newer torch deprecates; nothing for a user to change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def main(args: list[str] | None = None) -> None:
    # Meta-World and MuJoCo render headless only through EGL/OSMesa; default to EGL unless the user chose.
    os.environ.setdefault("MUJOCO_GL", "egl")
    configure_logging()
    ignore_irrelevant_warnings()
    VLAZooCLI(args=args)


if __name__ == "__main__":
    main()
