"""Batches with grain: deterministic, sharded per process, checkpointable.

The pipeline shuffles and batches record *indices* for the global batch, and
each process then loads only its slice of it. So the global batch of step t is
the same whatever the number of processes and devices (which is what lets a
2-process run reproduce a 1-process run), while no process reads records it
does not train on. The iterator's `get_state()`/`set_state()` go into the
checkpoint.
"""

from __future__ import annotations

import numpy as np

from deformjax.data.sources import DatasetSpec, to_model_inputs


def train_iterator(source, spec: DatasetSpec, *, global_batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1):
  """Endless iterator of this process's share of shuffled global batches.

  Each epoch is reshuffled (grain combines the seed with the epoch); the last
  partial batch of an epoch is dropped. Yields `{'image', 'label'}` numpy dicts
  of `global_batch // process_count` examples.
  """
  import grain

  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} is not divisible by the process count {process_count}')
  if len(source) < global_batch:
    raise ValueError(f'the dataset has {len(source)} examples, fewer than one global batch of {global_batch}')
  local = global_batch // process_count
  lo, hi = process_index * local, (process_index + 1) * local

  def load(indices):
    return to_model_inputs([source[int(i)] for i in np.asarray(indices)[lo:hi]], spec)

  ds = (grain.MapDataset.range(len(source)).shuffle(seed=seed).batch(global_batch, drop_remainder=True)
        .repeat(None).map(load))
  return iter(ds.to_iter_dataset())


def eval_batches(source, spec: DatasetSpec, *, global_batch: int, process_index: int = 0, process_count: int = 1):
  """One ordered pass over `source` in global batches; the last is padded.

  Yields `(batch, valid)` where `valid` is a bool `[local_batch]` marking real
  examples, so metrics over padded batches stay exact.
  """
  local = global_batch // process_count
  n = len(source)
  for start in range(0, n, global_batch):
    idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
    valid = idx < n
    records = [source[int(i)] for i in np.where(valid, idx, 0)]
    yield to_model_inputs(records, spec), valid
