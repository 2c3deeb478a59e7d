"""Command line: `python -m deformjax.train --config experiments/configs/digits.py --config.steps=100`.

Any config field can be overridden as `--config.FIELD=VALUE`. For a multi-host
job, pass `--coordinator_address`, `--num_processes` and `--process_id` (or let
`jax.distributed.initialize` read them from the cluster environment with
`--distributed`).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A get_config() file, e.g. experiments/configs/digits.py',
                                          lock_config=True)
_COORD = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for a multi-process job')
_NPROC = flags.DEFINE_integer('num_processes', None, 'processes in a multi-process job')
_PID = flags.DEFINE_integer('process_id', None, 'this process in a multi-process job')
_DIST = flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize() with cluster auto-detection')
_SUMMARY = flags.DEFINE_string('summary_json', None, 'write the final metrics here as JSON')


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
  if _SUMMARY.value:
    import jax

    if jax.process_index() == 0:
      keep = {k: v for k, v in summary.items() if k != 'params'}
      with open(_SUMMARY.value, 'w') as f:
        json.dump(keep, f, indent=2, default=str)


def run():
  app.run(main)
