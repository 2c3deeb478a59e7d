"""What a run trains: the `Task` protocol (loss, per-batch metrics, evaluation summary, label layout) and the
built-in classification task, single-label and multi-label.

The train loop knows a batch as a dict: `'image'` `[B, H, W, C]` float32 in [0, 1] plus the label arrays the
task's `label_layout` names (e.g. `'label'` `[B]` int32). It asks the task to run the model on a batch
(`forward`), to turn the model's outputs into a loss and weighted metric sums (`loss`), to check, before the
first step, that the model's outputs fit the labels (`check_outputs`), and to summarise an evaluation pass
(`evaluator`). Everything else (mesh, shardings, feeding, augmentation, seeds, checkpoints, progress,
logging) is the loop's, the same for every task.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deformjax.data.sources import DatasetSpec, RandomAccessSource
from deformjax.train.metrics import Accumulator

__all__ = ['Classification', 'Evaluator', 'Task', 'call_model', 'classification_loss', 'default_task', 'infer_task',
           'shape_text']


@runtime_checkable
class Evaluator(Protocol):
  """Collects one evaluation pass, batch by batch, on the host; `result()` is its summary."""

  def add(self, sums: Mapping[str, np.ndarray], count: int, outputs: Any | None,
          batch: Mapping[str, np.ndarray] | None) -> None:
    """Adds one batch.

    Args:
      sums: the task's metric sums over the batch's real examples (`Task.loss`'s second result).
      count: the batch's real examples.
      outputs: the model's outputs for the real examples (numpy, leading axis `count`) when the task's
        `eval_outputs` is True, else None.
      batch: the batch's real examples (`'image'` and the label arrays, numpy) with `outputs`, else None.
    """
    ...

  def result(self) -> dict[str, Any]:
    """The pass's summary: metric name -> value (a float, or a dict of per-class floats)."""
    ...


@runtime_checkable
class Task(Protocol):
  """What a run trains. Implementations are hashable (a frozen dataclass): the compiled steps are cached on them.

  Attributes:
    name: a short name ('classification', 'multilabel', 'detection') for the run's records.
    eval_outputs: whether the evaluator receives the model's outputs and the batch on the host (False: only
      the metric sums cross, nothing else is copied).
    summary_columns: metric name -> format (`str.format` spec) of the columns in the final summary table.
  """

  @property
  def name(self) -> str: ...

  @property
  def eval_outputs(self) -> bool: ...

  @property
  def summary_columns(self) -> Mapping[str, str]: ...

  def __hash__(self) -> int:
    """Tasks key the cache of compiled steps."""
    ...

  def describe(self, train: RandomAccessSource, test: RandomAccessSource, num_classes: int = 0) -> DatasetSpec:
    """The spec of data given as sources, read from the data itself (image shape, classes, label kind).

    Args:
      train: the train split.
      test: the test split.
      num_classes: the number of classes when > 0; 0: read from the labels.

    Returns:
      The spec the run uses (`name` 'arrays').

    Raises:
      ValueError: the data cannot be trained on (one line naming what was found and what is needed).
    """
    ...

  def label_layout(self, spec: DatasetSpec) -> Mapping[str, jax.ShapeDtypeStruct]:
    """Each label array a batch carries besides `'image'`, by its key: shape and dtype of one example's."""
    ...

  def forward(self, model: nnx.Module, batch: Mapping[str, jax.Array], *, train: bool, rngs: nnx.Rngs) -> Any:
    """The model's outputs on `batch`, normalised images in `batch['image']`: any pytree whose every leaf has the
    batch as its leading axis (`[B, ...]`; evaluation shards them over the mesh like the batch).

    `train`: a train step (dropout on, BatchNorm statistics updated) or evaluation. `rngs`: a `dropout`
    stream for this step.
    """
    ...

  def check_outputs(self, outputs: Any, spec: DatasetSpec) -> None:
    """Raises ValueError, one line naming both, when `outputs` (shapes and dtypes, `jax.ShapeDtypeStruct`s of a
    batch of 2) do not fit the labels of `spec`. Called once, before the first step."""
    ...

  def loss(self, outputs: Any, batch: Mapping[str, jax.Array],
           weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted mean loss (a scalar, differentiated) and per-batch metric sums.

    Args:
      outputs: `forward`'s outputs.
      batch: `'image'` and the label arrays of `label_layout`, each `[B, ...]`.
      weights: `[B]` float32, 1 for a real example, 0 for padding.

    Returns:
      `(loss, sums)`: `sums` maps a metric name to its weighted sum over the batch (a scalar or a fixed-shape
      array); the loop adds them over steps and divides by the example count (`Accumulator`).
    """
    ...

  def evaluator(self, spec: DatasetSpec) -> Evaluator:
    """A fresh evaluator for one pass over a test set of `spec`."""
    ...


def shape_text(shape: Sequence[int], batch: bool = True) -> str:
  """`[B, 10]`: a shape as the errors write it, the leading (batch) axis as B when `batch`."""
  dims = [str(d) for d in shape]
  if batch and dims:
    dims[0] = 'B'
  return '[' + ', '.join(dims) + ']'


@functools.lru_cache(maxsize=64)
def _call_keywords(cls: type) -> tuple[bool, bool]:
  """Whether `cls.__call__` takes a `train` and a `rngs` keyword."""
  try:
    params = inspect.signature(cls.__call__).parameters
  except (TypeError, ValueError):
    return False, False
  return 'train' in params, 'rngs' in params


def call_model(model: nnx.Module, images: jax.Array, *, train: bool, rngs: nnx.Rngs) -> Any:
  """`model(images)` in train or eval mode, as its `__call__` asks for it.

  A model whose `__call__` takes `train` (the built-in classifiers) gets `train=` and, if it takes `rngs`, the
  step's `rngs`. Any other model is switched with `model.train()` / `model.eval()` (flax's `deterministic` and
  `use_running_average` attributes: Dropout, BatchNorm), and its own `nnx.Rngs` streams feed its dropout.

  Args:
    model: an NNX module.
    images: `[B, H, W, C]`.
    train: train mode.
    rngs: the step's `dropout` stream.

  Returns:
    What the model returns.
  """
  takes_train, takes_rngs = _call_keywords(type(model))
  if not takes_train:
    model.train() if train else model.eval()
    return model(images, **({'rngs': rngs} if takes_rngs else {}))
  return model(images, train=train, **({'rngs': rngs} if takes_rngs else {}))


class _ClassificationEvaluator:
  """`Evaluator` of `Classification`: mean loss and accuracy; per-class accuracy, AP and mAP for multi-label."""

  def __init__(self, spec: DatasetSpec):
    self.spec, self.acc = spec, Accumulator()

  def add(self, sums, count, outputs=None, batch=None) -> None:
    if self.spec.multilabel and outputs is not None:
      self.acc.add(sums, count, np.asarray(outputs, np.float32), batch['label'])
    else:
      self.acc.add(sums, count)

  def result(self) -> dict[str, Any]:
    return self.acc.result(self.spec.class_names if self.spec.multilabel else ())


def _first(source: RandomAccessSource, what: str) -> Mapping[str, Any]:
  if len(source) == 0:
    raise ValueError(f'the {what} split is empty')
  return source[0]


def _all_labels(source: RandomAccessSource) -> np.ndarray:
  """Every label of `source` (its `labels` array when it has one, else read record by record)."""
  if hasattr(source, 'labels'):
    return np.asarray(source.labels)
  return np.stack([np.asarray(source[i]['label']) for i in range(len(source))])


def _image_shape(record: Mapping[str, Any], what: str) -> tuple[int, int, int]:
  image = np.asarray(record['image'])
  if image.ndim == 2:
    return image.shape + (1,)
  if image.ndim != 3:
    raise ValueError(f'{what} images must be [H, W, C] (or [H, W]) each, got {shape_text(image.shape, False)}')
  return image.shape


@dataclasses.dataclass(frozen=True)
class Classification:
  """Image classification: `'label'` int `[B]` (softmax cross-entropy, top-1 accuracy) or, `multilabel`, float32
  multi-hot `[B, K]` (sigmoid cross-entropy per class, per-class accuracy, AP and mAP on evaluation).

  The model maps `[B, H, W, C]` images to logits `[B, K]`.

  Example:
    >>> import numpy as np
    >>> from deformjax.data import ArraySource
    >>> from deformjax.train.task import Classification
    >>> data = ArraySource(np.zeros((6, 30, 18, 2), np.float32), np.array([0, 1, 2, 3, 4, 6]))
    >>> spec = Classification().describe(data, data)
    >>> spec.image_shape, spec.num_classes
    ((30, 18, 2), 7)
  """

  multilabel: bool = False

  @property
  def name(self) -> str:
    return 'multilabel' if self.multilabel else 'classification'

  @property
  def eval_outputs(self) -> bool:
    return self.multilabel  # average precision needs the scores; single-label metrics are sums

  @property
  def summary_columns(self) -> Mapping[str, str]:
    return {'loss': '{:.4f}', 'accuracy': '{:.2%}', **({'mAP': '{:.2%}'} if self.multilabel else {})}

  def describe(self, train: RandomAccessSource, test: RandomAccessSource, num_classes: int = 0) -> DatasetSpec:
    shapes = {what: _image_shape(_first(src, what), what) for what, src in (('train', train), ('test', test))}
    if shapes['train'] != shapes['test']:
      raise ValueError(f"test images {shape_text(shapes['test'], False)} differ from train images "
                       f"{shape_text(shapes['train'], False)}: both splits need one image shape")
    labels = {what: _all_labels(src) for what, src in (('train', train), ('test', test))}
    if self.multilabel:
      k = _multilabel_classes(labels)
      if num_classes and num_classes != k:
        raise ValueError(f'num_classes={num_classes} but the multi-hot labels have {k} classes')
    else:
      k = _single_label_classes(labels, num_classes)
    return DatasetSpec('arrays', shapes['train'], k, multilabel=self.multilabel)

  def label_layout(self, spec: DatasetSpec) -> Mapping[str, jax.ShapeDtypeStruct]:
    if self.multilabel:
      return {'label': jax.ShapeDtypeStruct((spec.num_classes,), jnp.float32)}
    return {'label': jax.ShapeDtypeStruct((), jnp.int32)}

  def forward(self, model: nnx.Module, batch: Mapping[str, jax.Array], *, train: bool, rngs: nnx.Rngs) -> jax.Array:
    return call_model(model, batch['image'], train=train, rngs=rngs)

  def check_outputs(self, outputs: Any, spec: DatasetSpec) -> None:
    kind = 'multi-hot labels' if self.multilabel else 'labels'
    if not isinstance(outputs, jax.ShapeDtypeStruct) or not jnp.issubdtype(outputs.dtype, jnp.floating):
      got = (shape_text(outputs.shape) + f' {outputs.dtype}' if isinstance(outputs, jax.ShapeDtypeStruct)
             else type(outputs).__name__)
      raise ValueError(f'model output {got} does not fit {kind} with {spec.num_classes} classes: classification '
                       f'needs float logits [B, {spec.num_classes}]')
    if outputs.shape[1:] != (spec.num_classes,):
      raise ValueError(f'model output {shape_text(outputs.shape)} does not fit {kind} with {spec.num_classes} '
                       f'classes: classification needs logits [B, {spec.num_classes}]')

  def loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array],
           weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    return classification_loss(outputs, batch['label'], self.multilabel, weights)

  def evaluator(self, spec: DatasetSpec) -> Evaluator:
    return _ClassificationEvaluator(spec)


def _single_label_classes(labels: Mapping[str, np.ndarray], num_classes: int) -> int:
  for what, y in labels.items():
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)):
      raise ValueError(f'{what} labels {shape_text(y.shape, False)} {y.dtype} are not class indices [N] (a '
                       'multi-label task takes multi-hot [N, K]: task=Classification(multilabel=True))')
  low = min(int(y.min()) for y in labels.values() if y.size)
  high = max(int(y.max()) for y in labels.values() if y.size)
  if low < 0:
    raise ValueError(f'labels must be class indices >= 0, got {low}')
  if num_classes and high >= num_classes:
    raise ValueError(f'num_classes={num_classes} but the labels reach class {high}')
  return num_classes or high + 1


def _multilabel_classes(labels: Mapping[str, np.ndarray]) -> int:
  widths = set()
  for what, y in labels.items():
    if y.ndim != 2:
      raise ValueError(f'{what} labels {shape_text(y.shape, False)} are not multi-hot [N, K]')
    if not np.all((y == 0) | (y == 1)):
      raise ValueError(f'{what} multi-hot labels must be 0 or 1')
    widths.add(y.shape[1])
  if len(widths) != 1:
    raise ValueError(f"train and test multi-hot labels differ in classes: {sorted(widths)}")
  return widths.pop()


def classification_loss(logits: jax.Array, labels: jax.Array, multilabel: bool,
                        weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean loss and per-example metric sums (weighted by `weights`, 1 = real example).

  Args:
    logits: `[B, K]`.
    labels: int `[B]` class indices, or float32 `[B, K]` multi-hot when `multilabel`.
    multilabel: sigmoid cross-entropy per class (else softmax cross-entropy over the classes).
    weights: `[B]` float32 example weights (0 for padding); None: all 1.

  Returns:
    `(loss, sums)`: the weighted mean loss (a scalar) and the weighted sums 'loss', 'accuracy' (scalars) and,
    for multi-label, 'per_class_accuracy' `[K]`.
  """
  if weights is None:
    weights = jnp.ones(logits.shape[:1], jnp.float32)
  if multilabel:
    per_example = optax.sigmoid_binary_cross_entropy(logits, labels).mean(-1)
    correct = ((logits > 0) == (labels > 0.5)).astype(jnp.float32)
    sums = {'loss': jnp.sum(per_example * weights), 'accuracy': jnp.sum(correct.mean(-1) * weights),
            'per_class_accuracy': jnp.sum(correct * weights[:, None], axis=0)}
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1).astype(labels.dtype) == labels).astype(jnp.float32)
    sums = {'loss': jnp.sum(per_example * weights), 'accuracy': jnp.sum(correct * weights)}
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0), sums


def default_task(spec: DatasetSpec) -> Classification:
  """The built-in task for data of `spec`: `Classification(multilabel=spec.multilabel)`."""
  return Classification(multilabel=spec.multilabel)


def infer_task(train: RandomAccessSource) -> Classification:
  """Classification read from the first train label: multi-label when it is a vector, single-label otherwise."""
  label = np.asarray(_first(train, 'train')['label'])
  return Classification(multilabel=label.ndim == 1)
