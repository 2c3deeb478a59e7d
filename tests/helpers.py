"""Helpers shared by the training, seed, feeding and experiment tests (no test file imports another)."""

from __future__ import annotations

import contextlib
import json
import pathlib

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS_CONFIG = str(ROOT / 'experiments' / 'configs' / 'digits.py')
# Small and fast, with augmentation on so the random streams are exercised too.
SMALL_OVERRIDES = ['--config.steps=6', '--config.batch_size=32', '--config.log_every=1', '--config.progress=False',
                   '--config.train_augment.max_rotation_deg=30', '--config.train_augment.max_shift=2',
                   '--config.eval_batch_size=64']

quiet = lambda *_: None  # an `echo` that prints nothing


def small_config(**overrides):
  """`base_config()` shrunk to `SMALL_OVERRIDES`' run (6 steps of batch 32, augmentation on), then `overrides`."""
  from deformjax.train import base_config

  cfg = base_config()
  cfg.steps, cfg.batch_size, cfg.log_every, cfg.progress, cfg.eval_batch_size = 6, 32, 1, False, 64
  cfg.train_augment.max_rotation_deg, cfg.train_augment.max_shift = 30.0, 2.0
  return set_fields(cfg, overrides)


def set_fields(cfg, fields: dict):
  """`cfg` with `fields` set, a key naming a field of a group with dots (`'train_augment.max_shift'`)."""
  for key, value in fields.items():
    node = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def at_step(n: int, action):
  """An `on_step` hook that calls `action()` after the n-th step of this call of `train`."""
  count = [0]

  def hook():
    count[0] += 1
    if count[0] == n:
      action()

  return hook


def tiny_digits(train: int = 160, test: int = 64):
  """`(train, test)` in-memory sources: the first `train` / `test` embedded digits (5 batches of 32 an epoch)."""
  from deformjax.data import ArraySource, load_source

  full = load_source('digits', 'train'), load_source('digits', 'test')
  return tuple(ArraySource(s.images[:n], s.labels[:n]) for s, n in zip(full, (train, test)))


def leaves(params, seed_index: int | None = None) -> dict:
  """Every parameter leaf by its path (of one seed, for a seed-stacked tree), as numpy."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(k): np.asarray(v if seed_index is None else v[seed_index]) for k, v in flat}


def params_of(path) -> dict:
  """The arrays of an `.npz` written by `--params_out`."""
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def assert_same_params(got: dict, want: dict, **tolerance):
  """Every leaf, not a checksum: equal to `tolerance` (exactly when none is given)."""
  assert sorted(got) == sorted(want) and len(want) > 4
  for key in want:
    if tolerance:
      np.testing.assert_allclose(got[key], want[key], err_msg=key, **tolerance)
    else:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def losses(summary) -> np.ndarray:
  return np.array([h['loss'] for h in summary['train_history']])


def records(path) -> list[dict]:
  """The JSON lines of a metrics.jsonl."""
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@contextlib.contextmanager
def count_compiles():
  """Counts XLA compilations inside the block through JAX's public monitoring events.

    with count_compiles() as compiles:
      ...
    compiles[0]  # backend compilations while the block ran
  """
  count = [0]

  def listener(event: str, duration: float, **_):
    if event == '/jax/core/compile/backend_compile_duration':
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else ''
