"""Shared helpers of the experiments: run metadata, mean ± std, result files."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform

import jax
import numpy as np

import deformjax

RESULTS = pathlib.Path(__file__).parent / 'results'  # the committed results the README quotes
# Where a run writes unless told otherwise: untracked (git-ignored), so running an
# experiment on a checkout never rewrites the committed results.
RUNS = pathlib.Path(__file__).resolve().parents[1] / 'runs'
OUT_HELP = ('directory for the JSON / markdown / plots (default: runs/, untracked; pass experiments/results to '
            'refresh the committed results)')


def run_metadata() -> dict:
  dev = jax.devices()[0]
  return {
      'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
      'device': f'{dev.platform} ({dev.device_kind}), {jax.device_count()} device(s), {os.cpu_count()} CPU cores',
      'versions': {'python': platform.python_version(), 'jax': jax.__version__, 'deformjax': deformjax.__version__},
  }


def study_flags(argv, default_config=None):
  """The command line every experiment shares: `--config` (a `config_flags` file, `--config.FIELD=VALUE`
  overrides) and `--out`. Returns `(flag_values, config_holder, out_holder)`; define the experiment's own
  flags on `flag_values`, then `parse(flag_values, argv)`.
  """
  from absl import flags

  from deformjax.train.cli import config_flag

  fv, config = config_flag(argv, None if default_config is None else str(default_config))
  out = flags.DEFINE_string('out', str(RUNS), OUT_HELP, flag_values=fv)
  return fv, config, out


def parse(fv, argv, config=None):
  """Parses `argv` into `fv` (one `error:` line and exit 2 for a bad flag, file or field); returns the config."""
  from deformjax.train.cli import config_value, parse_flags

  parse_flags(fv, argv)
  return None if config is None else config_value(config)


def mean_std(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def pm(values, scale=100.0, digits=2) -> str:
  m, s = mean_std(values)
  return f'{scale * m:.{digits}f} ± {scale * s:.{digits}f}'


def write_results(name: str, result: dict, markdown: str, out_dir: pathlib.Path = RUNS) -> pathlib.Path:
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f'{name}.json').write_text(json.dumps(result, indent=2, default=float) + '\n')
  (out_dir / f'{name}.md').write_text(markdown)
  return out_dir / f'{name}.md'


def seed_groups(seeds) -> list[tuple[int, int]]:
  """`(first, count)` runs of consecutive seeds: each trains in one call with `num_seeds=count`."""
  groups = []
  for s in seeds:
    if groups and s == groups[-1][0] + groups[-1][1]:
      groups[-1] = (groups[-1][0], groups[-1][1] + 1)
    else:
      groups.append((s, 1))
  return groups


class StudyView:
  """A whole study's progress: one bar over every training step with an ETA, and the
  results table whose cells fill in as settings finish.

  On a terminal it is a live `rich` display; elsewhere (a log file, CI) it stays
  quiet except for one line per finished cell.

    with StudyView('robustness', rows, cols, total_steps) as view:
      view.advance(n)             # n more seed-steps trained
      view.fill(row, col, text)   # a finished cell
  """

  def __init__(self, title: str, rows, cols, total_steps: int, *, live: bool | None = None, echo=print):
    from rich.console import Console

    self.title, self.rows, self.cols = title, list(rows), list(cols)
    self.cells = {}
    self.echo = echo
    self.console = Console(stderr=True)
    self.live_mode = self.console.is_terminal if live is None else live
    self._live = None
    if self.live_mode:
      from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
      )

      self.progress = Progress(TextColumn('{task.description}'), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn('ETA'), TimeRemainingColumn(), console=self.console)
      self.task = self.progress.add_task(title, total=total_steps)

  def _render(self):
    from rich.console import Group
    from rich.table import Table

    table = Table(title=self.title)
    table.add_column('')
    for c in self.cols:
      table.add_column(c, justify='right')
    for r in self.rows:
      table.add_row(r, *[self.cells.get((r, c), '…') for c in self.cols])
    return Group(table, self.progress)

  def __enter__(self):
    if self.live_mode:
      from rich.live import Live

      self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=True)
      self._live.__enter__()
    return self

  def __exit__(self, *exc):
    if self._live is not None:
      self._live.__exit__(*exc)
    return False

  def advance(self, steps: int = 1) -> None:
    if self._live is not None:
      self.progress.advance(self.task, steps)

  def fill(self, row: str, col: str, text: str, line: str | None = None) -> None:
    self.cells[(row, col)] = text
    if self._live is not None:
      self._live.update(self._render())
    elif line is not None:
      self.echo(line)
