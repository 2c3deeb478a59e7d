"""Device mesh and shardings for data-parallel training (jax.jit + NamedSharding)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = 'data'


def data_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
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


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split across the data axis."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  procs = jax.process_count()
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * procs,) + v.shape[1:])
          for k, v in local.items()}
