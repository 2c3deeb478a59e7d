"""Device mesh and shardings for data-parallel training (jax.jit + NamedSharding)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ['DATA', 'batch_sharding', 'data_mesh', 'global_batch', 'replicated']

# The name of the mesh's one axis, over which batches and device-resident splits are split.
DATA = 'data'


def data_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over all devices of all processes (or the first `num_devices`
  of a single process), with one axis named 'data'."""
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1 and num_devices != len(devices):
      raise ValueError('num_devices must be 0 (all) in a multi-process run')
    if num_devices > len(devices):
      raise ValueError(f'num_devices={num_devices} but only {len(devices)} devices exist')
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split across the data axis."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device of `mesh` holds the whole array (the train state, permutations, augmentation ranges)."""
  return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over 'data'.

  Args:
    mesh: the data mesh.
    local: this process's slice, every array `[b, ...]` with the same `b` on every process.

  Returns:
    The same keys as global `[b * process_count, ...]` arrays, split over the 'data' axis.
  """
  sharding = batch_sharding(mesh)
  procs = jax.process_count()
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * procs,) + v.shape[1:])
          for k, v in local.items()}
