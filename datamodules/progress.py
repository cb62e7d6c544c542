"""The terminal: log lines, and progress bars for long loops outside training (data generation, conversion,
validation, evaluation).

Both are drawn by Rich on stderr, so stdout keeps only what a command prints as its result (``--print_config``, JSON
summaries, Lightning's table of validation metrics). While a Rich bar is live (ours, or Lightning's during training)
Rich routes whatever reaches stderr above it, so a log line never tears a bar. Each bar shows done/total, the rate
in its own unit, elapsed time and ETA.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Optional, TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

T = TypeVar("T")


class RateColumn(ProgressColumn):
    """Items per second (or seconds per item when slower than one a second), in the bar's unit."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        text = f"{speed:.2f} {self.unit}/s" if speed >= 1 else f"{1 / speed:.1f} s/{self.unit}"
        return Text(text, style="progress.data.speed")


def make_progress(unit: str = "it", disable: bool = False) -> Progress:
    """A Rich ``Progress`` with our columns; use it as a context manager and add one task per bar."""
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=disable, refresh_per_second=4,
        console=Console(stderr=True),
    )


def track(
    iterable: Iterable[T], description: str, total: Optional[int] = None, unit: str = "it", disable: bool = False
) -> Iterator[T]:
    """``iterable`` with a progress bar (``total`` defaults to ``len(iterable)`` where it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with make_progress(unit, disable) as progress:
        yield from progress.track(iterable, total=total, description=description)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is logged (as logging's own last-resort handler does)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _DropLightningTips(logging.Filter):
    """Lightning advertises its cloud logger at INFO on every run; it says nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def configure_logging(level: int = logging.INFO) -> None:
    """INFO logs of every package (data generation, caching, evaluation) on stderr: through Rich on a terminal,
    as plain whole lines into a file or pipe.

    Lightning gives its loggers handlers of their own when the root logger has none; they go through ours instead,
    so their lines look like the rest and print once. Warnings go through logging too.
    """
    root = logging.getLogger()
    if any(getattr(h, "vla_zoo", False) for h in root.handlers):
        return
    import lightning  # noqa: F401  (importing it adds the handlers replaced below: import it first)

    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, log_time_format="[%X]",
                                               rich_tracebacks=False)
    else:  # a log file or a pipe: whole lines, never wrapped at 80 columns, so grep finds what was logged
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.vla_zoo = True  # type: ignore[attr-defined]  (configured once per process)
    handler.addFilter(_DropLightningTips())
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lightning_log = logging.getLogger(name)
        lightning_log.handlers.clear()
        lightning_log.propagate = True
    logging.captureWarnings(True)
