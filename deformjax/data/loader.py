"""Batches with grain: deterministic, sharded per process, checkpointable.

The pipeline shuffles and batches record *indices* for the global batch, and
each process then loads only its slice of it. So the global batch of step t is
the same whatever the number of processes and devices (which is what lets a
2-process run reproduce a 1-process run), while no process reads records it
does not train on. The iterator's `get_state()`/`set_state()` go into the
checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from deformjax.data.sources import DatasetSpec, RandomAccessSource, to_model_inputs

if TYPE_CHECKING:  # grain is imported where a pipeline is built
  import grain

__all__ = ['eval_batches', 'train_iterator']


def train_iterator(source: RandomAccessSource, spec: DatasetSpec, *, global_batch: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   make_batch: Callable[[list[Any]], dict[str, np.ndarray]] | None = None) -> grain.DatasetIterator:
  """Endless iterator of this process's share of shuffled global batches.

  Each epoch is reshuffled (grain combines the seed with the epoch); the last
  partial batch of an epoch is dropped.

  Args:
    source: the random-access source of the split.
    spec: its dataset spec (image shape, label kind).
    global_batch: examples per step across all processes; a multiple of `process_count`.
    seed: the shuffle seed.
    process_index, process_count: this process and how many share the batch.
    make_batch: this process's records of a step -> the batch dict; None: `to_model_inputs(records, spec)`.

  Returns:
    A grain iterator (with `get_state()` / `set_state()` for checkpoints) of `make_batch`'s dicts, by default
    `{'image': float32 [b, H, W, C], 'label': [b] or [b, num_classes]}`, `b = global_batch // process_count`.
  """
  import grain

  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} is not divisible by the process count {process_count}')
  if len(source) < global_batch:
    raise ValueError(f'the dataset has {len(source)} examples, fewer than one global batch of {global_batch}')
  local = global_batch // process_count
  lo, hi = process_index * local, (process_index + 1) * local

  batch_of = make_batch or (lambda records: to_model_inputs(records, spec))

  def load(indices):
    return batch_of([source[int(i)] for i in np.asarray(indices)[lo:hi]])

  ds = (grain.MapDataset.range(len(source)).shuffle(seed=seed).batch(global_batch, drop_remainder=True)
        .repeat(None).map(load))
  return iter(ds.to_iter_dataset())


def eval_batches(source: RandomAccessSource, spec: DatasetSpec, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """One ordered pass over `source` in global batches; the last is padded.

  Args:
    source: the random-access source of the split.
    spec: its dataset spec.
    global_batch: examples per step across all processes.
    process_index, process_count: this process and how many share the batch.

  Yields:
    `(batch, valid)`: this process's `global_batch // process_count` examples as
    `to_model_inputs` makes them, and a bool `[local_batch]` marking the real
    examples (padding repeats example 0), so metrics over padded batches stay exact.
  """
  local = global_batch // process_count
  n = len(source)
  for start in range(0, n, global_batch):
    idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
    valid = idx < n
    records = [source[int(i)] for i in np.where(valid, idx, 0)]
    yield to_model_inputs(records, spec), valid
