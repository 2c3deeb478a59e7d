"""Checkpoints with orbax: train state (parameters, optimiser state, step, RNG)
and, for host-fed data, the grain iterator's position, saved together so a
resumed run continues with exactly the batches it would have seen. (A
device-resident split needs no position: its batches follow from the step.)"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp

if TYPE_CHECKING:  # grain is imported only when a data position is saved or restored
  import grain

  from deformjax.train.feeding import Prefetcher

__all__ = ['Checkpointer', 'save_params']


class Checkpointer:
  """Thin wrapper over `orbax.checkpoint.CheckpointManager` for (state, iterator).

  Saves are asynchronous (arrays are copied to the host before `save` returns,
  so the donated state can be reused) and atomic: a run killed mid-save leaves
  the previous checkpoint as the latest one.

  Args:
    directory: where the checkpoints live (one subdirectory per step); created if missing.
    keep: how many of the latest checkpoints are kept.
  """

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    """The step of the latest complete checkpoint, or None when there is none."""
    return self.manager.latest_step()

  def save(self, step: int, state: Any, iterator: grain.DatasetIterator | Prefetcher | None = None, *,
           force: bool = False) -> bool:
    """Starts saving `state` (a pytree of arrays) and the position of `iterator` (if any) as checkpoint `step`.

    Args:
      step: the step the checkpoint is of.
      state: the train state.
      iterator: the host-fed data iterator, whose `get_state()` is saved beside the state.
      force: save even when the manager's save interval would skip this step.

    Returns:
      Whether a save was started.
    """
    items = {'state': ocp.args.StandardSave(state)}
    if iterator is not None:
      import grain

      items['data'] = grain.checkpoint.CheckpointSave(iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, state_like: Any, iterator: grain.DatasetIterator | Prefetcher | None = None,
              step: int | None = None) -> Any:
    """Restores into arrays shaped and sharded like `state_like`; moves `iterator` (if any) in place.

    Args:
      state_like: a pytree of arrays with the shapes, dtypes and shardings to restore into.
      iterator: the host-fed data iterator, set to the saved position.
      step: the checkpoint to read; None: the latest.

    Returns:
      The restored state, a pytree like `state_like`.

    Raises:
      ValueError: `iterator` is given but the checkpoint holds no data position (its run kept the data on the
        devices).
    """
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    items = {'state': ocp.args.StandardRestore(abstract)}
    if iterator is not None:
      import grain

      if not os.path.isdir(os.path.join(self.directory, str(step), 'data')):
        raise ValueError(f'the checkpoint at step {step} in {self.directory} holds no data-loader position: it '
                         'was written by a run with its data on the device (config.data_placement); resume '
                         'with the same placement')
      items['data'] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves and releases the manager."""
    self.manager.close()


def save_params(path: str, params: Any) -> None:
  """Writes a parameter tree as `.npz`: one array per leaf, keyed by its path (`jax.tree_util.keystr`).

  What `--params_out` writes: `save_params(path, summary['params'])` after `train`. In a multi-process run
  every process holds the replicated parameters; call it on process 0.

  Args:
    path: the file to write (numpy adds `.npz` when missing).
    params: the tree, e.g. the summary's 'params' (an `nnx.State`).
  """
  # Replicated arrays of a multi-process run are not fully addressable: write the local copy.
  local = lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  arrays: dict[str, Any] = {jax.tree_util.keystr(p): local(leaf) for p, leaf in leaves}
  np.savez(path, **arrays)
