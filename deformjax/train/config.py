"""Training configuration: the defaults every experiment config starts from, and
validation that turns a bad value into one clear line."""

from __future__ import annotations

import math
import os

import ml_collections

from deformjax.data.sources import DATASETS
from deformjax.models.classifiers import MODELS, PRESET_MODELS, check_preset_model, resolve_conv, resolve_deformable
from deformjax.ops._args import is_int, is_real

__all__ = ['ConfigError', 'augment_config', 'base_config', 'validate']


class ConfigError(ValueError):
  """A configuration value is wrong; the message names it and what it must be."""


def augment_config(max_rotation_deg: float = 0.0, max_shift: float = 0.0,
                   scale_range: tuple[float, float] = (1.0, 1.0)) -> ml_collections.ConfigDict:
  """Random affine augmentation (see `deformjax.data.random_affine`); identity by default.

  Args:
    max_rotation_deg: angles are drawn uniformly in `[-max_rotation_deg, max_rotation_deg]`.
    max_shift: shifts are drawn uniformly in `[-max_shift, max_shift]` pixels per axis.
    scale_range: `(low, high)`: scales are drawn log-uniformly between them.

  Returns:
    A ConfigDict with the three fields as floats (`scale_range` a tuple of two).
  """
  return ml_collections.ConfigDict(
      dict(max_rotation_deg=float(max_rotation_deg), max_shift=float(max_shift),
           scale_range=tuple(float(s) for s in scale_range)))


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the MNIST study's settings (Adam 1e-3, StepLR(5 epochs, 0.7), batch 64)
  on the embedded digits, with the last two of five convs deformable."""
  c = ml_collections.ConfigDict()
  c.dataset = 'digits'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.model = 'conv5'  # a key of deformjax.models.MODELS
  # The size of 'internimage' / 'flash_internimage' ('micro', 't', 's', 'b'); the other models ignore it.
  c.preset = 'micro'
  # 'none' | 'all' | how many of the last convs are deformable (deformable, modulated and conv
  # do not apply to the InternImage models, whose blocks are all deformable)
  c.deformable = '2'
  c.modulated = False
  # 'dcnv1' | 'dcnv2' | 'dcnv3' | 'dcnv4' (deformjax.models.CONVS); None: 'dcnv2' if modulated else 'dcnv1'
  c.conv = ml_collections.FieldReference(None, field_type=str)
  c.dropout = 0.0
  c.dtype = 'float32'
  c.optimizer = 'adam'
  c.learning_rate = 1e-3
  c.weight_decay = 0.0
  c.schedule = 'step'  # 'constant' | 'step' | 'cosine'
  c.step_epochs = 5
  c.step_gamma = 0.7
  c.epochs = 14
  c.steps = 0  # > 0 overrides epochs
  c.batch_size = 64  # global, across all devices and processes
  c.seed = 0
  # Seeds cfg.seed .. cfg.seed + num_seeds - 1 trained together, each as if alone
  # (its own init, data order, augmentation, dropout): an ensemble, or the seeds
  # of a study, in one compiled step. Needs the train split on the devices.
  c.num_seeds = 1
  c.seed_batching = 'auto'  # 'auto' | 'vmap' | 'loop': see deformjax.train.steps.seed_batching_for
  # 'auto': the train split lives on the devices when it fits (feeding.DEVICE_DATA_MAX_BYTES),
  # else grain feeds it from the host; 'device' / 'host' force one.
  c.data_placement = 'auto'
  c.train_augment = augment_config()
  # Named test sets: each is a random affine (fixed seed) applied to the test split.
  c.eval_sets = ml_collections.ConfigDict({'baseline': augment_config()})
  c.eval_batch_size = 256
  c.eval_every_epochs = 0  # 0: evaluate at the end only
  c.log_every = 50
  c.workdir = ml_collections.FieldReference(None, field_type=str)
  c.checkpoint_every = 0  # steps; 0: at the end of every epoch
  c.keep_checkpoints = 2
  c.num_devices = 0  # 0: all local devices
  c.progress = True
  return c


def _check_augment(aug, name: str) -> None:
  """A random affine range that can be sampled: finite, non-negative bounds, a non-empty scale range."""
  for field in ('max_rotation_deg', 'max_shift'):
    value = aug[field]
    if not (is_real(value) and math.isfinite(value) and value >= 0):
      raise ConfigError(f'{name}.{field} must be a finite number >= 0, got {value!r}')
  lo, hi = aug.scale_range
  if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
    raise ConfigError(f'{name}.scale_range must be (low, high) with 0 < low <= high, finite, '
                      f'got {tuple(aug.scale_range)}')


def validate(cfg: ml_collections.ConfigDict, device_count: int) -> None:
  """Raises ConfigError (one line) for a value the trainer cannot run with."""
  if cfg.dataset not in DATASETS:
    raise ConfigError(f"config.dataset: unknown dataset {cfg.dataset!r}; choose one of {', '.join(sorted(DATASETS))}")
  if cfg.model not in MODELS:
    raise ConfigError(f"config.model: unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
  if cfg.workdir is not None and os.path.exists(os.path.expanduser(cfg.workdir)) \
      and not os.path.isdir(os.path.expanduser(cfg.workdir)):
    raise ConfigError(f'config.workdir={cfg.workdir!r} is an existing file, not a directory')
  if cfg.dataset == 'digits' and cfg.data_dir is not None:
    raise ConfigError(f'config.data_dir={cfg.data_dir!r} is not read by the digits dataset (it ships inside '
                      'scikit-learn); unset it, or choose a TFDS dataset')
  if cfg.dataset != 'digits' and cfg.data_dir is not None and not os.path.isdir(os.path.expanduser(cfg.data_dir)):
    raise ConfigError(f'config.data_dir: directory {cfg.data_dir!r} does not exist')
  for name in ('batch_size', 'eval_batch_size'):
    value = cfg[name]
    if not is_int(value) or value < 1:
      raise ConfigError(f'config.{name} must be a positive int, got {value!r}')
    if value % device_count:
      raise ConfigError(f'config.{name}={value} is not divisible by the {device_count} devices; use a multiple '
                        f'of {device_count}')
  if cfg.epochs < 1 and cfg.steps < 1:
    raise ConfigError('config.epochs or config.steps must be positive')
  if cfg.optimizer not in ('adam', 'adamw', 'sgd'):
    raise ConfigError(f"config.optimizer must be 'adam', 'adamw' or 'sgd', got {cfg.optimizer!r}")
  if cfg.schedule not in ('constant', 'step', 'cosine'):
    raise ConfigError(f"config.schedule must be 'constant', 'step' or 'cosine', got {cfg.schedule!r}")
  if not cfg.learning_rate > 0:
    raise ConfigError(f'config.learning_rate must be positive, got {cfg.learning_rate!r}')
  if not is_int(cfg.log_every) or cfg.log_every < 1:
    raise ConfigError(f'config.log_every must be a positive int, got {cfg.log_every!r}')
  augments = {'train_augment': cfg.train_augment, **{f'eval_sets.{k}': v for k, v in cfg.eval_sets.items()}}
  for name, aug in augments.items():
    _check_augment(aug, f'config.{name}')
  if cfg.data_placement not in ('auto', 'device', 'host'):
    raise ConfigError(f"config.data_placement must be 'auto', 'device' or 'host', got {cfg.data_placement!r}")
  if not is_int(cfg.num_seeds) or cfg.num_seeds < 1:
    raise ConfigError(f'config.num_seeds must be a positive int, got {cfg.num_seeds!r}')
  if cfg.seed_batching not in ('auto', 'vmap', 'loop'):
    raise ConfigError(f"config.seed_batching must be 'auto', 'vmap' or 'loop', got {cfg.seed_batching!r}")
  if cfg.num_seeds > 1 and cfg.data_placement == 'host':
    raise ConfigError(f"config.num_seeds={cfg.num_seeds} trains from the train split on the devices; "
                      "data_placement='host' feeds one order only: use 'auto' or 'device', or num_seeds=1")
  if cfg.dtype not in ('float32', 'bfloat16', 'float16'):
    raise ConfigError(f"config.dtype must be 'float32', 'bfloat16' or 'float16', got {cfg.dtype!r}")
  if cfg.model in PRESET_MODELS:
    try:
      check_preset_model(cfg.model, cfg.get('preset', 'micro'), cfg.get('conv'), cfg.dropout)
    except ValueError as e:
      raise ConfigError(f'config.{e}') from None
    return  # deformable and modulated do not apply
  try:
    resolve_conv(cfg.get('conv'), cfg.modulated)
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None
  num_convs = MODELS[cfg.model].num_convs
  try:
    resolve_deformable(cfg.deformable, num_convs)
  except ValueError:
    raise ConfigError(f"config.deformable must be 'none', 'all' or a count in [0, {num_convs}], got "
                      f"{cfg.deformable!r}") from None
