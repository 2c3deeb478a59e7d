"""Shared helpers of the experiments: run metadata, mean ± std, result files, the transform studies' runner,
entry point and plot, and the benchmarks' timing, metadata, results writer and entry point."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

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


def device_name() -> str:
  """The device a benchmark ran on: `cpu (<CPU model>, <cores> cores)`, or `gpu (<device kind>)`."""
  dev = jax.devices()[0]
  if dev.platform != 'cpu':
    return f'{dev.platform} ({dev.device_kind})'
  model = platform.processor() or 'cpu'
  try:
    model = next(line.split(':', 1)[1].strip() for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines()
                 if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'cpu ({model}, {os.cpu_count()} cores)'


def benchmark_metadata(**versions: str) -> dict:
  """`date`, `device` (`device_name()`) and `versions` (python, jax, jaxlib, flax, deformjax and `versions`)."""
  import flax
  import jaxlib

  return {'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'), 'device': device_name(),
          'versions': {'python': platform.python_version(), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
                       'flax': flax.__version__, 'deformjax': deformjax.__version__, **versions}}


def benchmark_header(result: dict) -> str:
  """The line under a benchmark table's title: device, versions, method, shapes and date of `result`."""
  versions = ', '.join(f'{k} {v}' for k, v in result['versions'].items())
  return (f"Device: {result['device']}. Versions: {versions}. Method: {result['method']}. "
          f"Shapes: {'; '.join(map(str, result['shapes']))}. Date: {result['date']}.")


def interleaved_ms(cases: dict, rounds: int, per_round: int, warmup: int = 2) -> dict:
  """{name: call} -> {name: median ms}, timing the cases in turn, round after round.

  Each `call()` takes no arguments and returns once its work has finished (`jax.block_until_ready`, or a CUDA
  synchronise for torch), so drift in the machine's load hits every case alike.
  """
  for call in cases.values():
    for _ in range(warmup):
      call()
  samples: dict[str, list[float]] = {name: [] for name in cases}
  for _ in range(rounds):
    for name, call in cases.items():
      for _ in range(per_round):
        t0 = time.perf_counter()
        call()
        samples[name].append(time.perf_counter() - t0)
  return {name: 1e3 * statistics.median(ts) for name, ts in samples.items()}


def jax_call(fn, *args):
  """A call of `fn(*args)` that returns once its result is computed, for `interleaved_ms`."""
  return lambda: jax.block_until_ready(fn(*args))


def config_names(cfg, field: str, known) -> list[str]:
  """The names in the config's tuple `field`, each of `known`; an item may be a comma-separated list, as
  `--config.FIELD=a,b` gives. An unknown name raises `ConfigError` naming the field and the choices."""
  from deformjax.train.config import ConfigError

  names = [n for item in cfg[field] for n in str(item).split(',') if n]
  if unknown := [n for n in names if n not in known]:
    raise ConfigError(f"--config.{field}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
  return names


BENCHMARK_KEYS = ('benchmark', 'date', 'device', 'versions', 'method', 'shapes')


def write_benchmark(name: str, result: dict, markdown: str, out_dir: pathlib.Path = RUNS) -> pathlib.Path:
  """Writes a benchmark's `<name>.json` and `<name>.md` under `out_dir`; returns the markdown's path.

  Every benchmark's JSON states what it measured and where: `result` must hold `BENCHMARK_KEYS` (what was
  timed, when, on which device, with which versions, how, at which shapes).
  """
  missing = [k for k in BENCHMARK_KEYS if k not in result]
  if missing:
    raise ValueError(f'write_benchmark({name!r}): the result has no {", ".join(missing)}; every benchmark result '
                     f'holds {", ".join(BENCHMARK_KEYS)}')
  return write_results(name, result, markdown, out_dir)


def bench_main(args, prog: str, default_config: pathlib.Path, run: Callable, markdown: Callable[[dict], str],
               file_name: Callable[[object], str]) -> dict:
  """A benchmark's command line, the studies' own: parses `args` (None: `sys.argv`), runs, writes the results.

  Args:
    args: the arguments after the program's name (`--config FILE[:ARG]`, `--config.FIELD=VALUE`, `--out DIR`),
      or None.
    prog: the program's name in messages (`experiments.bench_ops`).
    default_config: the config file used when `--config` is not given.
    run: config -> result (a dict with `BENCHMARK_KEYS`).
    markdown: result -> its markdown page.
    file_name: config -> the results' file name, without suffix.

  Returns:
    The result; `<file_name>.json` and `.md` are written under `--out`.
  """
  from deformjax.train.cli import command_line, run_or_exit

  argv = command_line(args, prog)
  fv, config, out_flag = study_flags(argv, default_config)
  cfg = parse(fv, argv, config)
  result = run_or_exit(run, cfg)
  path = write_benchmark(file_name(cfg), result, markdown(result), pathlib.Path(out_flag.value))
  print(f"wrote {path.with_suffix('.json')} and .md")
  return result


def seed_groups(seeds) -> list[tuple[int, int]]:
  """`(first, count)` runs of consecutive seeds: each trains in one call with `num_seeds=count`."""
  groups = []
  for s in seeds:
    if groups and s == groups[-1][0] + groups[-1][1]:
      groups[-1] = (groups[-1][0], groups[-1][1] + 1)
    else:
      groups.append((s, 1))
  return groups


def train_study(cfg, variant_config: Callable[[str], object], *, echo: Callable[[str], object] = print,
                live: bool | None = None) -> dict:
  """Trains every (condition, variant) of a transform study with all seeds together, under one progress view.

  Each variant compiles once for the whole study: seeds and transforms are data to the compiled step
  (`deformjax.train.steps`), not constants.

  Args:
    cfg: the study's config: `name`, `seeds`, `train` (its `dataset`, `data_dir`, `steps`, `epochs`,
      `batch_size`), `conditions` (name -> random affine), `condition_order`, `variant_order`.
    variant_config: variant name -> a fresh train config of that variant (unlocked); this sets its seeds, its
      train augmentation and its one test set, the condition's.
    echo: where a finished cell's line goes when the view is not live.
    live: the live terminal view (None: when stderr is a terminal).

  Returns:
    `name`, `config`, the run metadata, `runs` (a dict per condition, variant and seed: accuracy, step time per
    seed, steps, the setting's wall time) and `wall_seconds`.
  """
  from deformjax.data.sources import get_spec, load_source
  from deformjax.train import train

  spec = get_spec(cfg.train.dataset)
  sources = (load_source(cfg.train.dataset, spec.splits[0], cfg.train.data_dir),
             load_source(cfg.train.dataset, spec.splits[1], cfg.train.data_dir))
  steps = cfg.train.steps if cfg.train.steps > 0 else cfg.train.epochs * (len(sources[0]) // cfg.train.batch_size)
  groups = seed_groups(cfg.seeds)
  settings = [(cond, variant) for cond in cfg.condition_order for variant in cfg.variant_order]
  name_width = max(len(v) for v in cfg.variant_order)
  runs = []
  start = time.time()
  with StudyView(f'{cfg.name}: test accuracy (%), mean ± std over {len(cfg.seeds)} seeds', cfg.variant_order,
                 cfg.condition_order, steps * len(cfg.seeds) * len(settings), live=live, echo=echo) as view:
    for cond, variant in settings:
      aug = cfg.conditions[cond]
      t0 = time.time()
      setting_runs = []
      for first, count in groups:
        tc = variant_config(variant)
        tc.seed, tc.num_seeds = first, count
        tc.train_augment = aug
        tc.eval_sets = {cond: aug}
        summary = train(tc, echo=lambda *_: None, sources=sources, on_step=lambda n=count: view.advance(n))
        evals = summary['eval'] if count > 1 else [summary['eval']]
        for seed, ev in zip(summary['seeds'], evals):
          # seconds_per_step covers all `count` seeds of one step: per seed, the share of it.
          setting_runs.append({'condition': cond, 'variant': variant, 'seed': seed,
                               'accuracy': ev[cond]['accuracy'], 'seeds_together': count,
                               'seconds_per_step': summary['seconds_per_step'] / count, 'steps': summary['steps']})
      wall = time.time() - t0
      for r in setting_runs:
        r['setting_wall_seconds'] = wall
      runs += setting_runs
      accs = [r['accuracy'] for r in setting_runs]
      view.fill(variant, cond, pm(accs), f'{cond:>20s} {variant:>{name_width}s}: {pm(accs)} % over seeds '
                f"{', '.join(str(r['seed']) for r in setting_runs)} "
                f"({1e3 * setting_runs[0]['seconds_per_step']:.1f} ms per seed-step, {wall:.0f} s)")
  return {'name': cfg.name, 'config': cfg.to_dict(), **run_metadata(), 'runs': runs,
          'wall_seconds': time.time() - start}


def study_main(args, prog: str, default_config: pathlib.Path, run: Callable, table: Callable[[dict], str],
               plot: Callable[[dict, pathlib.Path], None]) -> dict:
  """A transform study's command line: parses `args` (None: `sys.argv`), runs, writes and prints the results.

  Args:
    args: the arguments after the program's name, or None.
    prog: the program's name in messages (`experiments.family`).
    default_config: the config file used when `--config` is not given.
    run: config -> result (as `train_study` returns it, and whatever the study adds).
    table: result -> its markdown table.
    plot: (result, path) -> writes the plot to path.

  Returns:
    The result. `<name>.json`, `.md` and `.png` are written under `--out`.
  """
  from deformjax.train.cli import command_line, run_or_exit

  argv = command_line(args, prog)
  fv, config, out_flag = study_flags(argv, default_config)
  cfg = parse(fv, argv, config)
  out = pathlib.Path(out_flag.value)
  result = run_or_exit(run, cfg)
  md = (f"# {cfg.name}\n\nDevice: {result['device']}; {result['versions']}; {result['date']}. "
        f"Wall time of the whole study: {result['wall_seconds']:.0f} s.\n\n{table(result)}\n")
  write_results(cfg.name, result, md, out)
  plot(result, out / f'{cfg.name}.png')
  print('\n' + table(result))
  print(f"\n{len(result['runs'])} runs in {result['wall_seconds']:.0f} s on {result['device']}")
  print(f'wrote {out / cfg.name}.json, .md, .png')
  return result


def bar_plot(result: dict, path: pathlib.Path, title: str, *, inches_per_condition: float = 1.8,
             height: float = 3.6, legend_outside: bool = False) -> None:
  """Writes a study's grouped bar plot to `path`: a group per condition, a bar (mean ± std over seeds) per variant.

  Args:
    result: what a study's `run` returns: 'config' with 'condition_order' and 'variant_order', and 'runs', each
      with 'condition', 'variant' and 'accuracy' (a fraction).
    path: the image file to write (its suffix picks the format).
    title: the plot's title.
    inches_per_condition: the figure's width per group of bars (2 inches more for the margins).
    height: the figure's height in inches.
    legend_outside: put the legend to the right of the axes, where it covers no bar however many variants there
      are (the image widens to hold it); False: in the lower left corner of the axes.
  """
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  cfg = result['config']
  conds, variants = list(cfg['condition_order']), list(cfg['variant_order'])
  fig, ax = plt.subplots(figsize=(inches_per_condition * len(conds) + 2, height))
  width = 0.8 / len(variants)
  for i, v in enumerate(variants):
    stats = [mean_std([r['accuracy'] for r in result['runs'] if r['variant'] == v and r['condition'] == c])
             for c in conds]
    ax.bar(np.arange(len(conds)) + i * width, [100 * m for m, _ in stats], width, yerr=[100 * s for _, s in stats],
           capsize=3, label=v)
  ax.set_xticks(np.arange(len(conds)) + width * (len(variants) - 1) / 2, conds)
  lo = min(100 * r['accuracy'] for r in result['runs'])
  ax.set_ylim(max(0, lo - 10), 100)
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  if legend_outside:
    ax.legend(loc='center left', bbox_to_anchor=(1.0, 0.5))
  else:
    ax.legend(loc='lower left')
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches='tight' if legend_outside else None)
  plt.close(fig)


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
      from deformjax.train._progress import progress_bar

      self.progress = progress_bar(console=self.console, eta_label=True)
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
