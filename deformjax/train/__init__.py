"""Data-parallel training: mesh, sharded jitted steps, checkpoints, metrics, CLI.

Imports optax, orbax and grain; `deformjax.ops` / `deformjax.nn` never import this.
"""

from deformjax.train import cli, feeding, mesh, steps
from deformjax.train.checkpoint import Checkpointer
from deformjax.train.config import ConfigError, augment_config, base_config, validate
from deformjax.train.loop import Interrupted, evaluate, format_summary, model_factory, param_checksum, train
from deformjax.train.metrics import Accumulator, average_precision

# `cli`, `feeding`, `mesh` and `steps` are public modules: the pieces `train` is built from, for a loop of your own.
__all__ = ['Accumulator', 'Checkpointer', 'ConfigError', 'Interrupted', 'augment_config', 'average_precision',
           'base_config', 'cli', 'evaluate', 'feeding', 'format_summary', 'mesh', 'model_factory', 'param_checksum',
           'steps', 'train', 'validate']
