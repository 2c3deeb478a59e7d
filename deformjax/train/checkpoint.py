"""Checkpoints with orbax: train state (parameters, optimiser state, step, RNG)
and the grain iterator's position, saved together so a resumed run continues
with exactly the batches it would have seen."""

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

  def save(self, step: int, state, iterator, *, force: bool = False) -> bool:
    import grain

    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=grain.checkpoint.CheckpointSave(iterator)), force=force)

  def restore(self, state_like, iterator, step: int | None = None):
    """Restores into arrays shaped and sharded like `state_like`; moves `iterator` in place."""
    import grain

    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored['state']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
