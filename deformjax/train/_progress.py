"""The rich progress bar on stderr that a training run and a whole study show."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from rich.console import Console
  from rich.progress import Progress


def progress_bar(*, console: Console | None = None, eta_label: bool = False, metrics: bool = False) -> Progress:
  """A `rich.progress.Progress`: description, bar, done of total, elapsed time, time remaining.

  rich is imported here, not at module level, so that the training loop imports without it when no bar is shown.

  Args:
    console: where to draw; None: a new console on stderr.
    eta_label: put an 'ETA' label before the time remaining.
    metrics: add a last column with each task's 'metrics' field (give `add_task` a `metrics=''`).

  Returns:
    The progress display, not yet started.
  """
  from rich.console import Console
  from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
  )

  columns = [TextColumn('{task.description}'), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
  columns += [TextColumn('ETA')] if eta_label else []
  columns += [TimeRemainingColumn()]
  columns += [TextColumn('{task.fields[metrics]}')] if metrics else []
  return Progress(*columns, console=Console(stderr=True) if console is None else console)


__all__ = ['progress_bar']
