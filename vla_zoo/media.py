"""Rollout videos and figures into the run's loggers: TensorBoard (the recipes' logger) and Weights & Biases.

TensorBoard's ``add_video`` needs moviepy only to encode a GIF, which it then stores as an image summary; the
browser animates it. We already write the GIF (``vla_zoo.evaluation.save_gif``), so its bytes go into that same image
summary directly, without moviepy. Loggers of other kinds get nothing here: the files stay in the run folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger


def log_gif(trainer: Trainer, tag: str, path: str | os.PathLike, step: int) -> None:
    """An animated GIF file as an image of ``tag`` at ``step`` (TensorBoard) or a video (W&B)."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    data = Path(path).read_bytes()
    with Image.open(path) as gif:
        width, height = gif.size
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data)
            logger.experiment.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        elif isinstance(logger, WandbLogger):
            logger.log_video(tag, [str(path)], step=step)


def log_figure(trainer: Trainer, tag: str, figure: Any, step: int) -> None:
    """A matplotlib figure as an image of ``tag`` at ``step``."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, figure, global_step=step, close=False)
        elif isinstance(logger, WandbLogger):
            logger.log_image(tag, [_figure_rgb(figure)], step=step)


def _figure_rgb(figure: Any):
    import numpy as np

    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3]
