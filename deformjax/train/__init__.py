"""Data-parallel training: mesh, sharded jitted steps, checkpoints, metrics, CLI.

Imports optax, orbax and grain; `deformjax.ops` / `deformjax.nn` never import this.
"""

from deformjax.train.config import ConfigError, augment_config, base_config, validate
from deformjax.train.loop import Interrupted, evaluate, format_summary, param_checksum, train

__all__ = ['ConfigError', 'Interrupted', 'augment_config', 'base_config', 'evaluate', 'format_summary',
           'param_checksum', 'train', 'validate']
