"""Command line: `python -m deformjax.train --config experiments/configs/digits.py --config.steps=100`.

Any config field can be overridden as `--config.FIELD=VALUE`. For a multi-host
job, pass `--coordinator_address`, `--num_processes` and `--process_id` (or let
`jax.distributed.initialize` read them from the cluster environment with
`--distributed`).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A get_config() file, e.g. experiments/configs/digits.py',
                                          lock_config=True)
_COORD = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for a multi-process job')
_NPROC = flags.DEFINE_integer('num_processes', None, 'processes in a multi-process job')
_PID = flags.DEFINE_integer('process_id', None, 'this process in a multi-process job')
_DIST = flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize() with cluster auto-detection')
_SUMMARY = flags.DEFINE_string('summary_json', None, 'write the final metrics here as JSON')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'also print INFO logs (orbax checkpointing, JAX backend probing); '
                             'by default a run shows its progress bar, summary and warnings')
_PARAMS = flags.DEFINE_string('params_out', None, 'write the final parameters here (.npz, one array per leaf, '
                              'keyed by its path in the parameter tree)')


def _init_distributed():
  import jax

  if _COORD.value or _DIST.value:
    # CPU processes need gloo for cross-process collectives; GPU/TPU ignore this setting.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    kw = {}
    if _COORD.value:
      kw = dict(coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value)
    jax.distributed.initialize(**kw)


def main(argv):
  del argv
  from deformjax.data.sources import DataError
  from deformjax.train.config import ConfigError
  from deformjax.train.loop import Interrupted, train

  if not _VERBOSE.value:
    # absl's app.run logs INFO by default: orbax's per-save lines and JAX's probing of
    # absent backends ("Unable to initialize backend 'tpu'") would run through the bar.
    logging.set_verbosity(logging.WARNING)
  cfg = _CONFIG.value
  if cfg is None:
    print('error: --config is required, e.g. --config experiments/configs/digits.py', file=sys.stderr)
    sys.exit(2)
  try:
    _init_distributed()
    summary = train(cfg)
  except (ConfigError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except Interrupted as e:
    print(f'interrupted: {e}', file=sys.stderr)
    sys.exit(143)
  import jax

  if _SUMMARY.value and jax.process_index() == 0:
    keep = {k: v for k, v in summary.items() if k != 'params'}
    with open(_SUMMARY.value, 'w') as f:
      json.dump(keep, f, indent=2, default=str)
  if _PARAMS.value and jax.process_index() == 0:
    import numpy as np

    # Replicated arrays of a multi-process run are not fully addressable: write the local copy.
    leaves = jax.tree_util.tree_flatten_with_path(summary['params'])[0]
    np.savez(_PARAMS.value, **{jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
                               for path, leaf in leaves})


def _fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_argument(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_flags(argv):
  """absl's parser, with the config file checked first and its loader's exceptions as one line."""
  from deformjax.train.config import config_file_problem

  spec = _config_argument(argv)
  if spec is not None:
    problem = config_file_problem(spec.split(':', 1)[0])
    if problem:
      _fail(f'--config: {problem}')
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # absl's own messages name the flag
    _fail(str(e))
  except (AttributeError, KeyError) as e:  # an override of a field the config does not have
    field = str(e).strip('"\'')
    overrides = [a.split('=', 1)[0] for a in argv if a.startswith('--config.')]
    named = next((o for o in overrides if o.split('.')[-1] == field), f'--config.{field}')
    _fail(f'{named}: the config has no field {field!r} (python -m deformjax.train --helpfull lists them)')
  except Exception as e:  # get_config() itself failed
    _fail(f'--config: {spec}: get_config() raised {type(e).__name__}: {e}')


def run():
  app.run(main, flags_parser=_parse_flags)
