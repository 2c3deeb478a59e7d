"""Data-parallel training: mesh, sharded jitted steps, checkpoints, metrics, CLI.

Imports optax, orbax and grain; `deformjax.ops` / `deformjax.nn` never import this.
"""

from deformjax.train import cli, feeding, mesh, steps, task
from deformjax.train.checkpoint import Checkpointer, save_params
from deformjax.train.config import (
  DETECTOR_MODEL,
  FIELDS,
  TASKS,
  ConfigError,
  Field,
  augment_config,
  base_config,
  canvas_config,
  detector_config,
  field_table,
  fields_help,
  model_label,
  validate,
)
from deformjax.train.loop import (
  Interrupted,
  canvas_sources,
  evaluate,
  format_summary,
  model_factory,
  param_checksum,
  train,
  user_model_factory,
)
from deformjax.train.metrics import Accumulator, average_precision
from deformjax.train.task import Classification, Evaluator, Task

# `cli`, `feeding`, `mesh`, `steps` and `task` are public modules: the pieces `train` is built from, for a loop or
# a task of your own.
__all__ = ['DETECTOR_MODEL', 'FIELDS', 'TASKS', 'Accumulator', 'Checkpointer', 'Classification', 'ConfigError',
           'Evaluator', 'Field', 'Interrupted', 'Task', 'augment_config', 'average_precision', 'base_config',
           'canvas_config', 'canvas_sources', 'cli', 'detector_config', 'evaluate', 'feeding', 'field_table',
           'fields_help', 'format_summary', 'mesh', 'model_factory', 'model_label', 'param_checksum', 'save_params',
           'steps', 'task', 'train', 'user_model_factory', 'validate']
