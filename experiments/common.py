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

RESULTS = pathlib.Path(__file__).parent / 'results'


def run_metadata() -> dict:
  dev = jax.devices()[0]
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'device': f'{dev.platform} ({dev.device_kind}), {jax.device_count()} device(s), {os.cpu_count()} CPU cores',
      'versions': {'python': platform.python_version(), 'jax': jax.__version__, 'deformjax': deformjax.__version__},
  }


def load_config(spec: str):
  """Runs `get_config(arg)` of a config file given as `path[:arg]` (big_vision style)."""
  import importlib.util

  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    import sys

    print(f'error: --config: no config file {path!r}', file=sys.stderr)
    sys.exit(2)
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem + '_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def run_or_exit(fn, *args, **kwargs):
  """Calls `fn`; a configuration or data problem ends the program with one `error:` line (exit 2)."""
  import sys

  from deformjax.data.sources import DataError
  from deformjax.train.config import ConfigError

  try:
    return fn(*args, **kwargs)
  except (ConfigError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def mean_std(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def pm(values, scale=100.0, digits=2) -> str:
  m, s = mean_std(values)
  return f'{scale * m:.{digits}f} ± {scale * s:.{digits}f}'


def write_results(name: str, result: dict, markdown: str, out_dir: pathlib.Path = RESULTS) -> pathlib.Path:
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f'{name}.json').write_text(json.dumps(result, indent=2, default=float) + '\n')
  (out_dir / f'{name}.md').write_text(markdown)
  return out_dir / f'{name}.md'
