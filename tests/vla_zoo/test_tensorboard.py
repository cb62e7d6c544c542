"""TensorBoard by default: recipes log there (CSV beside it), closed-loop success and rollout videos, open-loop plots
and the mixture's per-source counts land in the event files; Weights & Biases gets the same media."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.vla_zoo.policy_fixtures import make_episodes
from tests.vla_zoo.test_evaluation import GainModule, GainPolicy, LineEnv
from vla_zoo.deploy.replay import ReplayPolicy
from vla_zoo.callbacks import ClosedLoopEvalCallback, OpenLoopEvalCallback


def _events(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def _fit(tmp_path: Path, callbacks: list, logger) -> Trainer:
    trainer = Trainer(max_epochs=1, callbacks=callbacks, default_root_dir=tmp_path, logger=logger,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0)
    trainer.fit(GainModule(1.0))
    return trainer


def test_closed_loop_success_per_family_and_rollout_videos_reach_tensorboard(tmp_path: Path) -> None:
    callback = ClosedLoopEvalCallback(GainPolicy, tasks=["reachable", "blocked"], make_env=LineEnv,
                                      episodes_per_task=2, record_videos=1)
    trainer = _fit(tmp_path, [callback], TensorBoardLogger(tmp_path, name="logs", default_hp_metric=False))
    events = _events(trainer.log_dir)
    scalars = events.Tags()["scalars"]
    assert {"eval/success/reachable", "eval/success/blocked", "eval/success/mean"} <= set(scalars), scalars
    assert events.Scalars("eval/success/reachable")[-1].value == 1.0
    assert set(events.Tags()["images"]) == {"eval/rollout/reachable/000", "eval/rollout/blocked/000"}
    (video,) = events.Images("eval/rollout/reachable/000")
    gif = next((Path(trainer.log_dir) / "closed_loop" / f"step_{trainer.global_step}" / "videos").glob("reachable*"))
    assert video.encoded_image_string == gif.read_bytes() and video.encoded_image_string.startswith(b"GIF8")
    assert video.step == trainer.global_step


def test_open_loop_plots_reach_tensorboard_as_figures(tmp_path: Path) -> None:
    from datamodules.shards import write_source

    episodes = make_episodes(np.random.default_rng(0), [9, 7, 6])
    write_source(episodes, tmp_path / "robot", source="robot", horizon=4)
    callback = OpenLoopEvalCallback(lambda module: ReplayPolicy(episodes, horizon=4), str(tmp_path / "robot"),
                                    max_episodes=2)
    trainer = _fit(tmp_path, [callback], TensorBoardLogger(tmp_path, name="logs", default_hp_metric=False))
    events = _events(trainer.log_dir)
    assert set(events.Tags()["images"]) == {"eval/open_loop/episode_0000", "eval/open_loop/episode_0001"}
    assert events.Images("eval/open_loop/episode_0000")[0].encoded_image_string.startswith(b"\x89PNG")
    assert events.Scalars("eval/open_loop/mse/point_gripper")[-1].value == 0.0  # a replay makes no error


def test_the_cli_writes_csv_beside_tensorboard_in_one_version_folder(tmp_path: Path) -> None:
    from vla_zoo.cli import with_csv_beside_tensorboard

    (tmp_path / "logs" / "version_0").mkdir(parents=True)  # an earlier run: both must take version_1
    trainer = Trainer(logger=TensorBoardLogger(tmp_path, name="logs"), default_root_dir=tmp_path)
    tb, csv = with_csv_beside_tensorboard(trainer).loggers
    assert isinstance(csv, CSVLogger) and csv.log_dir == tb.log_dir == str(tmp_path / "logs" / "version_1")
    listed = Trainer(logger=[TensorBoardLogger(tmp_path), CSVLogger(tmp_path, name="mine")], default_root_dir=tmp_path)
    assert len(with_csv_beside_tensorboard(listed).loggers) == 2  # a run that lists a CSVLogger keeps its own


def test_media_reach_weights_and_biases_through_lightnings_logger(tmp_path: Path, monkeypatch) -> None:
    """Without wandb installed: a WandbLogger whose log calls are recorded receives the GIF and the figure."""
    from matplotlib.figure import Figure

    from vla_zoo.evaluation import save_gif
    from vla_zoo.media import log_figure, log_gif

    calls = []
    monkeypatch.setattr(WandbLogger, "log_video", lambda self, key, videos, step=None: calls.append((key, videos, step)))
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, step=None: calls.append((key, images, step)))
    wandb = WandbLogger.__new__(WandbLogger)
    trainer = Trainer(logger=False, default_root_dir=tmp_path)
    monkeypatch.setattr(Trainer, "loggers", property(lambda self: [wandb]))
    save_gif([np.zeros((4, 6, 3), np.uint8)] * 2, tmp_path / "a.gif", fps=10)
    log_gif(trainer, "eval/rollout/x/000", tmp_path / "a.gif", 7)
    figure = Figure(figsize=(1, 1))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    log_figure(trainer, "eval/open_loop/episode_0000", figure, 7)
    assert calls[0] == ("eval/rollout/x/000", [str(tmp_path / "a.gif")], 7)
    assert calls[1][0] == "eval/open_loop/episode_0000" and calls[1][1][0].shape == (100, 100, 3)

