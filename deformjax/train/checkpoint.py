"""Checkpoints with orbax: train state (parameters, optimiser state, step, RNG)
and, for host-fed data, the grain iterator's position, saved together so a
resumed run continues with exactly the batches it would have seen. (A
device-resident split needs no position: its batches follow from the step.)"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over `orbax.checkpoint.CheckpointManager` for (state, iterator).

  Saves are asynchronous (arrays are copied to the host before `save` returns,
  so the donated state can be reused) and atomic: a run killed mid-save leaves
  the previous checkpoint as the latest one.
  """

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, iterator=None, *, force: bool = False) -> bool:
    items = {'state': ocp.args.StandardSave(state)}
    if iterator is not None:
      import grain

      items['data'] = grain.checkpoint.CheckpointSave(iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, state_like, iterator=None, step: int | None = None):
    """Restores into arrays shaped and sharded like `state_like`; moves `iterator` (if any) in place."""
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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
