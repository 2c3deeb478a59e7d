"""Training configuration: the defaults every experiment config starts from, and
validation that turns a bad value into one clear line."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any

import ml_collections

from deformjax.data.canvas import _check_ranges
from deformjax.data.sources import DATASETS, get_spec
from deformjax.models.classifiers import (
  MODELS,
  PRESET_MODELS,
  CifarNet,
  ConvClassifier,
  check_preset_model,
  resolve_conv,
  resolve_deformable,
)
from deformjax.ops._args import is_int, is_real

__all__ = ['DETECTOR_MODEL', 'FIELDS', 'TASKS', 'ConfigError', 'Field', 'augment_config', 'base_config',
           'canvas_config', 'detector_config', 'field_table', 'fields_help', 'model_label', 'validate']

#: The values of `config.task`.
TASKS = ('classification', 'detection')
#: The built-in detector: `config.model` of `config.task='detection'`.
DETECTOR_MODEL = 'deformable_detr'


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


def detector_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The built-in detector, `config.model='deformable_detr'`: transformers' `DeformableDetrConfig` fields.

  The default is a small Deformable DETR for 48x48 digit canvases: a four-stage ResNet of basic blocks (widths
  16-128, one block each) whose last three stages feed one encoder and two decoder layers of width 64, 12 queries
  and iterative box refinement. `num_labels` is set from the data. The matching costs and loss weights are
  transformers' (`class_cost`, `bbox_cost`, `giou_cost`, `focal_alpha`, `bbox_loss_coefficient`,
  `giou_loss_coefficient`); `two_stage` (with `two_stage_num_proposals` at most the encoder's tokens) also trains
  the encoder's proposals, as the original Deformable DETR does. A command line overrides the fields listed here;
  add any other `DeformableDetrConfig` field with `overrides`.

  Args:
    **overrides: fields replacing or adding to the defaults (any `DeformableDetrConfig` field).

  Returns:
    A ConfigDict; `{**config.to_dict(), 'num_labels': K}` is what `deformjax.models.DeformableDetr` takes.
  """
  width = 16
  config = {
      'backbone_config': {'model_type': 'resnet', 'embedding_size': width,
                          'hidden_sizes': [width, 2 * width, 4 * width, 8 * width], 'depths': [1, 1, 1, 1],
                          'layer_type': 'basic', 'out_features': ['stage1', 'stage2', 'stage3']},
      'use_timm_backbone': False, 'd_model': 64, 'encoder_layers': 1, 'decoder_layers': 2,
      'encoder_attention_heads': 4, 'decoder_attention_heads': 4, 'encoder_ffn_dim': 128, 'decoder_ffn_dim': 128,
      'encoder_n_points': 4, 'decoder_n_points': 4, 'num_feature_levels': 3, 'num_queries': 12,
      'with_box_refine': True, 'two_stage': False, 'two_stage_num_proposals': 100, 'auxiliary_loss': True,
      'dropout': 0.0, 'attention_dropout': 0.0, 'activation_dropout': 0.0,
      # floats, so that a command line may set any weight (a ConfigDict keeps each field's type)
      'class_cost': 1.0, 'bbox_cost': 5.0, 'giou_cost': 2.0, 'focal_alpha': 0.25, 'bbox_loss_coefficient': 5.0,
      'giou_loss_coefficient': 2.0,
  }
  return ml_collections.ConfigDict({**config, **overrides})


def canvas_config(size: int = 48, num_digits: tuple[int, int] = (1, 3), digit_size: tuple[int, int] = (12, 20),
                  max_overlap: float = 0.1, train_images: int = 6000, test_images: int = 500,
                  seed: int = 0) -> ml_collections.ConfigDict:
  """The detection data of `config.task='detection'`: `config.dataset`'s digits on blank canvases.

  Args:
    size: the canvases' side in pixels.
    num_digits: (min, max) digits per canvas (max is the padded number of targets).
    digit_size: (min, max) side of a digit in pixels.
    max_overlap: the largest IoU between two digits' boxes.
    train_images: canvases made from the train digits.
    test_images: canvases made from the test digits (no digit image in both).
    seed: fixes the canvases (the same for every training seed).

  Returns:
    A ConfigDict of these fields (`deformjax.data.digit_canvases`' arguments).
  """
  return ml_collections.ConfigDict(dict(size=size, num_digits=tuple(num_digits), digit_size=tuple(digit_size),
                                        max_overlap=float(max_overlap), train_images=train_images,
                                        test_images=test_images, seed=seed))


def _identity_eval_sets() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'baseline': augment_config()})


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its name, default and meaning (the source of `base_config`, `--help` and the docs' table).

  Attributes:
    name: the field (`--config.NAME=VALUE`).
    default: its value in `base_config()`; for a group of fields (`train_augment`, `detector`, ...) the function
      that makes the group's ConfigDict.
    meaning: one sentence on what it sets and the values it takes.
    type: the value type of a field whose default is None (an `ml_collections.FieldReference`'s `field_type`).
  """

  name: str
  default: Any
  meaning: str
  type: type | None = None


# Every field of `base_config()`, in the order `--help` and docs/training.md list them.
FIELDS: tuple[Field, ...] = (
    Field('task', 'classification', "'classification' (single- or multi-label, as the labels are) or 'detection' "
          "(boxes: Deformable DETR's loss, COCO's AP; with model 'deformable_detr' or a detector of your own)"),
    Field('dataset', 'digits', "a built-in dataset: 'digits' or 'mnist5k' (embedded, 28x28), or TFDS 'mnist', "
          "'fashion_mnist', 'cifar10', 'coco9' (multi-label); ignored when train() is given sources"),
    Field('data_dir', None, 'where a TFDS dataset is prepared; None: TFDS_DATA_DIR or ~/tensorflow_datasets', str),
    Field('num_classes', 0, "classes of data given as sources; 0: read from the labels (the built-in datasets know "
          'theirs)'),
    Field('model', 'conv5', "a built-in model: 'conv5', 'cifarnet', 'internimage', 'flash_internimage', or "
          "'deformable_detr' (task 'detection'); ignored when train() is given model="),
    Field('preset', 'micro', "the size of 'internimage' / 'flash_internimage': 'micro', 't', 's', 'b'"),
    Field('deformable', '2', "'none', 'all' or how many of the last convs of 'conv5' / 'cifarnet' are deformable"),
    Field('modulated', False, 'DCNv2 modulation of the deformable convs (conv unset)'),
    Field('conv', None, "the deformable conv: 'dcnv1', 'dcnv2', 'dcnv3', 'dcnv4'; None: 'dcnv2' if modulated "
          "else 'dcnv1'", str),
    Field('dropout', 0.0, "dropout rate before the classifier head of 'conv5'"),
    Field('detector', detector_config, "the 'deformable_detr' model: transformers' DeformableDetrConfig fields "
          '(.d_model, .num_queries, .decoder_layers, .backbone_config, the loss weights ...); num_labels comes from '
          'the data'),
    Field('canvas', canvas_config, "task 'detection' without sources: the dataset's digits on canvases (.size, "
          '.num_digits, .digit_size, .max_overlap, .train_images, .test_images, .seed)'),
    Field('dtype', 'float32', "compute dtype of the built-in models: 'float32', 'bfloat16', 'float16' "
          '(parameters stay float32)'),
    Field('optimizer', 'adam', "'adam', 'adamw' (with weight_decay) or 'sgd' (momentum 0.9)"),
    Field('learning_rate', 1e-3, 'the initial learning rate'),
    Field('weight_decay', 0.0, "decoupled weight decay of 'adamw'"),
    Field('schedule', 'step', "'constant', 'step' (times step_gamma every step_epochs) or 'cosine' (to 0)"),
    Field('step_epochs', 5, "epochs between decays of the 'step' schedule"),
    Field('step_gamma', 0.7, "decay factor of the 'step' schedule"),
    Field('warmup_steps', 0, 'steps over which the learning rate rises linearly to the schedule'),
    Field('grad_clip', 0.0, 'clip the gradient to this global norm; 0: no clipping'),
    Field('epochs', 14, 'epochs to train (steps > 0 overrides)'),
    Field('steps', 0, 'steps to train when > 0, instead of epochs'),
    Field('batch_size', 64, 'global batch, across every device and process'),
    Field('seed', 0, 'the seed of initialisation, data order, augmentation and dropout'),
    Field('num_seeds', 1, 'seeds seed .. seed+num_seeds-1 trained together in one run, each as if alone'),
    Field('seed_batching', 'auto', "'auto', 'vmap' (one batched step) or 'loop' (one program per seed in turn)"),
    Field('data_placement', 'auto', "'auto' (the devices when the train split fits in 1 GiB), 'device' or 'host'"),
    Field('train_augment', augment_config, 'random affine augmentation of training: .max_rotation_deg, '
          '.max_shift (pixels), .scale_range (low, high)'),
    Field('eval_sets', _identity_eval_sets, 'named test sets, each a fixed random affine of the test split (fields '
          "as train_augment's): --config.eval_sets.baseline.max_shift=2"),
    Field('eval_batch_size', 256, 'global batch of evaluation'),
    Field('eval_every_epochs', 0, 'evaluate every this many epochs; 0: at the end only'),
    Field('log_every', 50, 'steps between train-metric log lines (metrics.jsonl, progress bar)'),
    Field('workdir', None, 'checkpoints, metrics.jsonl and run.json; a run with a workdir resumes', str),
    Field('checkpoint_every', 0, 'steps between checkpoints; 0: every epoch (and always the last step)'),
    Field('keep_checkpoints', 2, 'how many of the latest checkpoints are kept'),
    Field('num_devices', 0, 'devices of the data mesh; 0: all'),
    Field('progress', True, 'show the progress bar on stderr'),
)


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the MNIST study's settings (Adam 1e-3, StepLR(5 epochs, 0.7), batch 64)
  on the embedded digits, with the last two of five convs deformable. Every field is in `FIELDS`."""
  c = ml_collections.ConfigDict()
  for f in FIELDS:
    if callable(f.default):
      c[f.name] = f.default()
    elif f.default is None:
      c[f.name] = ml_collections.FieldReference(None, field_type=f.type)
    else:
      c[f.name] = f.default
  return c


def _default_text(f: Field) -> str:
  groups = {'train_augment': 'identity', 'eval_sets': "{'baseline': identity}", 'detector': 'detector_config()',
            'canvas': 'canvas_config()'}
  return groups.get(f.name, repr(f.default))


def field_table() -> str:
  """The Markdown table of every config field (name, default, meaning) that docs/training.md shows."""
  rows = ['| field | default | meaning |', '|---|---|---|']
  rows += [f'| `{f.name}` | `{_default_text(f)}` | {f.meaning} |' for f in FIELDS]
  return '\n'.join(rows)


def fields_help() -> str:
  """Every config field with its default and meaning, as `python -m deformjax.train --help` prints them."""
  width = max(len(f.name) for f in FIELDS)
  lines = ['config fields (override as --config.FIELD=VALUE):']
  lines += [f'  {f.name:<{width}}  {f.meaning} (default: {_default_text(f)})' for f in FIELDS]
  return '\n'.join(lines)


def _num_convs(model: str) -> int:
  """The convs of `MODELS[model]`, a conv stack (the models of `PRESET_MODELS` are returned from before this)."""
  cls = MODELS[model]
  assert issubclass(cls, (ConvClassifier, CifarNet)), model
  return cls.num_convs


def model_label(cfg: ml_collections.ConfigDict) -> str:
  """What a built-in model config trains, as the progress bar names it: 'conv5 dcnv3 last 2', 'conv5 regular',
  'cifarnet dcnv2 all', 'internimage micro'.

  Example:
    >>> from deformjax.train import base_config
    >>> from deformjax.train.config import model_label
    >>> cfg = base_config()
    >>> cfg.conv = 'dcnv3'
    >>> model_label(cfg)
    'conv5 dcnv3 last 2'
  """
  if cfg.model in PRESET_MODELS:
    return f"{cfg.model} {cfg.get('preset', 'micro')}"
  if cfg.model == DETECTOR_MODEL:
    d = cfg.detector
    return f'{DETECTOR_MODEL} d{d.d_model} q{d.num_queries}' + (' two-stage' if d.get('two_stage') else '')
  num_convs = _num_convs(cfg.model)
  n = resolve_deformable(cfg.deformable, num_convs)
  if n == 0:
    return f'{cfg.model} regular'
  conv = resolve_conv(cfg.get('conv'), cfg.modulated)
  return f"{cfg.model} {conv} {'all' if n == num_convs else f'last {n}'}"


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


def validate(cfg: ml_collections.ConfigDict, device_count: int, *, dataset: bool = True, model: bool = True) -> None:
  """Raises ConfigError (one line) for a value the trainer cannot run with.

  Args:
    cfg: the config.
    device_count: the devices of the data mesh (batches must divide among them).
    dataset: check the built-in dataset fields (False when the data is given as sources).
    model: check the built-in model fields (False when a model of your own is given).
  """
  if dataset and cfg.dataset not in DATASETS:
    raise ConfigError(f"config.dataset: unknown dataset {cfg.dataset!r}; choose one of {', '.join(sorted(DATASETS))}")
  num_classes = cfg.get('num_classes', 0)
  if not is_int(num_classes) or num_classes < 0:
    raise ConfigError(f'config.num_classes must be 0 (read from the labels) or a positive int, got '
                      f'{num_classes!r}')
  if model and cfg.model not in MODELS and cfg.model != DETECTOR_MODEL:
    raise ConfigError(f"config.model: unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
  if cfg.workdir is not None and os.path.exists(os.path.expanduser(cfg.workdir)) \
      and not os.path.isdir(os.path.expanduser(cfg.workdir)):
    raise ConfigError(f'config.workdir={cfg.workdir!r} is an existing file, not a directory')
  embedded = dataset and get_spec(cfg.dataset).tfds_name is None
  if embedded and cfg.data_dir is not None:
    raise ConfigError(f'config.data_dir={cfg.data_dir!r} is not read by the {cfg.dataset} dataset (it ships inside '
                      'a package); unset it, or choose a TFDS dataset')
  if dataset and not embedded and cfg.data_dir is not None and not os.path.isdir(os.path.expanduser(cfg.data_dir)):
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
  _check_warmup_and_clip(cfg)
  if not is_int(cfg.log_every) or cfg.log_every < 1:
    raise ConfigError(f'config.log_every must be a positive int, got {cfg.log_every!r}')
  for name, aug in _augments(cfg).items():
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
  _check_task(cfg, dataset=dataset, model=model)
  if model and cfg.model != DETECTOR_MODEL:
    _check_model_fields(cfg)


def _check_warmup_and_clip(cfg: ml_collections.ConfigDict) -> None:
  """`warmup_steps` and `grad_clip` (absent from configs written before they existed: their defaults)."""
  clip, warmup = cfg.get('grad_clip', 0.0), cfg.get('warmup_steps', 0)
  if not (is_real(clip) and math.isfinite(clip) and clip >= 0):
    raise ConfigError(f'config.grad_clip must be a finite number >= 0 (0: no clipping), got {clip!r}')
  if not is_int(warmup) or warmup < 0:
    raise ConfigError(f'config.warmup_steps must be an int >= 0, got {warmup!r}')


def _augments(cfg: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """Every random affine of the config by its field: `train_augment` and each `eval_sets.NAME`."""
  return {'train_augment': cfg.train_augment, **{f'eval_sets.{k}': v for k, v in cfg.eval_sets.items()}}


def _task(cfg: ml_collections.ConfigDict) -> str:
  """`config.task`; a config written before tasks existed classifies."""
  return cfg.get('task', 'classification')


def _is_identity(aug: ml_collections.ConfigDict) -> bool:
  return aug.max_rotation_deg == 0 and aug.max_shift == 0 and tuple(aug.scale_range) == (1.0, 1.0)


def _check_task(cfg: ml_collections.ConfigDict, *, dataset: bool, model: bool) -> None:
  """`config.task` and what it needs: a detector and canvases of digits for 'detection', no warp of the images
  (their boxes would not follow)."""
  task = _task(cfg)
  if task not in TASKS:
    raise ConfigError(f"config.task must be one of {', '.join(map(repr, TASKS))}, got {task!r}")
  if task != 'detection':
    if model and cfg.model == DETECTOR_MODEL:
      raise ConfigError(f"config.model={DETECTOR_MODEL!r} is a detector: set config.task='detection'")
    return
  if model and cfg.model != DETECTOR_MODEL:
    raise ConfigError(f"config.task='detection' trains a detector: set config.model={DETECTOR_MODEL!r} (configured by "
                      f'config.detector), or pass model= a detector of your own; got config.model={cfg.model!r}')
  if dataset and cfg.dataset not in ('digits', 'mnist5k'):
    raise ConfigError(f"config.task='detection' places the digits of config.dataset on canvases: 'digits' or "
                      f"'mnist5k', got {cfg.dataset!r} (or pass sources= detection data of your own)")
  for name, aug in _augments(cfg).items():
    if not _is_identity(aug):
      raise ConfigError(f"config.{name} warps the images, and detection boxes would not follow: keep it the "
                        "identity with config.task='detection'")
  missing = [m for m in ('scipy', 'pycocotools') if importlib.util.find_spec(m) is None]
  if missing:  # else the matcher fails inside the first compiled step, or COCO's evaluation after training
    raise ConfigError(f"config.task='detection' needs {' and '.join(missing)} (the Hungarian matcher, COCO's "
                      "evaluation): pip install 'deformjax[detection]'")
  if dataset:
    _check_canvas(cfg.canvas)


def _check_canvas(c: ml_collections.ConfigDict) -> None:
  """The canvases `config.canvas` asks for can be made: images in both splits, digits that fit (the canvases' own
  check, naming the config's fields)."""
  for name in ('train_images', 'test_images'):
    if not is_int(c[name]) or c[name] < 1:
      raise ConfigError(f'config.canvas.{name} must be a positive int, got {c[name]!r}')
  try:
    _check_ranges(c.size, tuple(c.num_digits), tuple(c.digit_size), where='', prefix='config.canvas.')
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_model_fields(cfg: ml_collections.ConfigDict) -> None:
  """The fields of the built-in models: a preset for the InternImage ones, else conv and deformable."""
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
  num_convs = _num_convs(cfg.model)
  try:
    resolve_deformable(cfg.deformable, num_convs)
  except ValueError:
    raise ConfigError(f"config.deformable must be 'none', 'all' or a count in [0, {num_convs}], got "
                      f"{cfg.deformable!r}") from None
