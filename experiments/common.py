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
