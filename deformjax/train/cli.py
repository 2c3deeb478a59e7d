"""Command line: `python -m deformjax.train --config experiments/configs/digits.py --config.steps=100`.

Any config field can be overridden as `--config.FIELD=VALUE` (ml_collections'
`config_flags`; a tuple as `--config.FIELD=1,2,3`). For a multi-host job, pass
`--coordinator_address`, `--num_processes` and `--process_id` (or let
`jax.distributed.initialize` read them from the cluster environment with
`--distributed`).

The experiments parse their command lines with the same pieces (`config_flag`,
`parse_flags`, `config_value`, `run_or_exit`): every flag is absl's, every
config file is loaded by `config_flags`, and every bad value, file or field ends
the program with one `error: ...` line and exit status 2. Each entry point builds
its own `absl.flags.FlagValues`, so it can be called in-process (tests) any
number of times.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

__all__ = ['command_line', 'config_flag', 'config_value', 'fail', 'main', 'parse_flags', 'run', 'run_or_exit']

_HELP = ('--help', '-h', '--helpfull', '--helpshort')
_T = TypeVar('_T')


def fail(message: str) -> NoReturn:
  """Ends the program with one `error: message` line on stderr and exit status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def config_flag(argv: Sequence[str], default: str | None = None,
                help_string: str = 'a get_config() file as path[:arg], e.g. experiments/configs/digits.py'
                ) -> tuple[flags.FlagValues, flags.FlagHolder]:
  """A fresh `FlagValues` holding `--config` (a `config_flags` config file; overrides read from `argv`).

  Returns `(flag_values, holder)`; define the entry point's other flags on `flag_values`.
  """
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', default, help_string, flag_values=fv, lock_config=True,
                                           sys_argv=list(argv))
  return fv, holder


def _config_spec(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(fv: flags.FlagValues, argv: Sequence[str], *, epilog: str | None = None) -> list[str]:
  """Parses `argv` (program name first) into `fv`; returns the positional arguments.

  absl's and config_flags' exceptions become one `error:` line (exit 2); `--help` prints the flags, then
  `epilog` (e.g. `deformjax.train.config.fields_help()`, every config field), and exits 0.
  """
  argv = list(argv)
  wants_help = any(a in _HELP for a in argv[1:])
  # config_flags loads the file as module 'config_config' with the loader's load_module(), which executes
  # into the module already in sys.modules: a second entry point in one process would keep the first file's
  # get_config() when the second has none.
  sys.modules.pop('config_config', None)
  try:
    rest = fv([a for a in argv if a not in _HELP])
  except flags.Error as e:  # absl's messages name the flag (and, for a config field, its bad value)
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    if overrides and _config_spec(argv) is None and fv['config'].default is None:
      fail(f'{overrides[0]}: a field override needs a config file to override: --config FILE (e.g. '
           f'experiments/configs/digits.py) {overrides[0]}=...')
    fail(str(e))
  except (AttributeError, KeyError) as e:
    fail(_unknown_field(e, argv))
  except Exception as e:  # the config file failed to run: a syntax error, get_config() raising
    fail(f'--config: {_config_spec(argv)}: {type(e).__name__}: {e}')
  if wants_help:
    print(fv.get_help())
    if epilog:
      print('\n' + epilog)
    sys.exit(0)
  return rest


def _unknown_field(e: AttributeError | KeyError, argv: Sequence[str]) -> str:
  """The one line for an override of a field the config lacks, with ml_collections' suggestion when it has one.

  config_flags raises the field's name quoted, sometimes followed by a line 'Did you mean "x" instead of "y"?'.
  """
  inner = e.args[0] if e.args else e
  while isinstance(inner, BaseException) and inner.args:  # an AttributeError wrapping a KeyError
    inner = inner.args[0]
  text = str(inner)
  field = text.splitlines()[0].strip().strip('"\'') if text.strip() else ''
  named = next((a.split('=', 1)[0] for a in argv if a.startswith('--config.')
                and a.split('=', 1)[0].split('.')[-1] == field), None)
  if named is None:  # the config file itself failed (e.g. it has no get_config)
    return f'--config: {_config_spec(argv)}: {type(e).__name__}: {text}'
  hint = re.search(r'Did you mean "([^"]+)"', text)
  suggestion = hint.group(1) if hint else _closest_field(named.removeprefix('--config.'))
  return (f'{named}: unknown config field {field!r}'
          + (f': did you mean {suggestion!r}?' if suggestion else ' (the fields are those its get_config() sets)'))


def _closest_field(path: str) -> str | None:
  """The nearest field of `base_config()` to a dotted override path, by name (difflib), or None."""
  import difflib

  from deformjax.train.config import base_config

  node, *parents, leaf = [base_config()] + path.split('.')
  for p in parents:
    if p not in node:
      return None
    node = node[p]
  if not hasattr(node, 'keys'):
    return None
  close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
  return close[0] if close else None


def config_value(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
  """The parsed config of `config_flag`'s holder, or one `error:` line when the file could not be loaded."""
  value = holder.value
  if value is None:
    fail('--config is required: a get_config() file, e.g. experiments/configs/digits.py in a deformjax source '
         "checkout (a wheel ships none); the trainer needs pip install 'deformjax[train,data]'")
  try:
    value.keys()  # config_flags defers a missing or unreadable file's error to the first use of the config
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()  # the attempt's own error: the file's path and what failed
    fail(f"--config: {reason.removeprefix('Configuration is not available because of an earlier failure to load: ')}")
  return value


def run_or_exit(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
  """Calls `fn`; a configuration or data problem ends the program with one `error:` line (exit 2)."""
  from deformjax.data.sources import DataError
  from deformjax.train.config import ConfigError

  try:
    return fn(*args, **kwargs)
  except (ConfigError, DataError) as e:
    fail(str(e))


def _init_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None,
                      auto: bool) -> None:
  import jax

  if coordinator or auto:
    # CPU processes need gloo for cross-process collectives; GPU/TPU ignore this setting.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    kw: dict[str, Any] = {}
    if coordinator:
      kw = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kw)


def _write_outputs(summary: dict, summary_json: str | None, params_out: str | None) -> None:
  import jax

  from deformjax.train.checkpoint import save_params

  if jax.process_index() != 0:
    return
  if summary_json:
    with open(summary_json, 'w') as f:
      json.dump({k: v for k, v in summary.items() if k not in ('params', 'model_state')}, f, indent=2, default=str)
  if params_out:
    save_params(params_out, summary['params'])


def command_line(args: Sequence[str] | None, prog: str) -> list[str]:
  """`[prog, *args]`, or `sys.argv` when `args` is None: what `parse_flags` reads."""
  return list(sys.argv) if args is None else [prog, *args]


def main(args: Sequence[str] | None = None, *, on_step: Callable[[], None] | None = None) -> dict:
  """The trainer's entry point: parses `args` (default `sys.argv[1:]`), trains, writes the requested files.

  Returns the run's summary. A bad flag, config file, field or value exits 2 with one `error:` line; SIGTERM /
  SIGINT saves a checkpoint and exits 143. `on_step` is passed to `train` (tests deliver signals through it).
  """
  argv = command_line(args, 'deformjax.train')
  fv, config = config_flag(argv)
  coordinator = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for a multi-process job',
                                    flag_values=fv)
  num_processes = flags.DEFINE_integer('num_processes', None, 'processes in a multi-process job', flag_values=fv)
  process_id = flags.DEFINE_integer('process_id', None, 'this process in a multi-process job', flag_values=fv)
  distributed = flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize() with cluster '
                                  'auto-detection', flag_values=fv)
  summary_json = flags.DEFINE_string('summary_json', None, 'write the final metrics here as JSON', flag_values=fv)
  params_out = flags.DEFINE_string('params_out', None, 'write the final parameters here (.npz, one array per leaf, '
                                   'keyed by its path in the parameter tree)', flag_values=fv)
  verbose = flags.DEFINE_bool('verbose', False, 'also print INFO logs (orbax checkpointing, JAX backend probing); '
                              'by default a run shows its progress bar, summary and warnings', flag_values=fv)
  from deformjax.train.config import fields_help

  parse_flags(fv, argv, epilog=fields_help())
  cfg = config_value(config)
  if verbose.value:
    logging.set_verbosity(logging.INFO)
    logging.use_absl_handler()
  from deformjax.train.loop import Interrupted, train

  try:
    _init_distributed(coordinator.value, num_processes.value, process_id.value, distributed.value)
    summary = run_or_exit(train, cfg, on_step=on_step)
  except Interrupted as e:
    print(f'interrupted: {e}', file=sys.stderr)
    sys.exit(143)
  _write_outputs(summary, summary_json.value, params_out.value)
  return summary


def run() -> None:
  """Console script `deformjax-train` and `python -m deformjax.train`."""
  main()
