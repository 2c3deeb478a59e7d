"""Detection as a training task: `deformjax.train.train(cfg, model=..., sources=..., task=Detection(...))`.

The task runs a DETR-style detector on a batch, scores it with :func:`detection_loss` and evaluates it with
COCO's metrics (:func:`coco_evaluate` on :func:`post_process_object_detection`'s detections). It follows the
train system's `Task` protocol structurally; nothing here imports the train system.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from deformjax.data.sources import DatasetSpec
from deformjax.detection.coco import coco_evaluate
from deformjax.detection.loss import _get, detection_loss
from deformjax.detection.postprocess import post_process_object_detection

__all__ = ['Detection']

_LABELS = ('class_labels', 'boxes', 'label_mask')
_LOGGED = ('loss_ce', 'loss_bbox', 'loss_giou', 'cardinality_error')  # the last decoder layer's terms


class _DetectionEvaluator:
  """Collects the mean loss terms and every image's detections and targets; COCO scores them at the end."""

  def __init__(self, task: Detection):
    self.task, self.count = task, 0
    self.sums: dict[str, float] = {}
    self.predictions: list[dict[str, np.ndarray]] = []
    self.targets: list[dict[str, np.ndarray]] = []
    self.sizes: list[tuple[int, ...]] = []

  def add(self, sums: Mapping[str, np.ndarray], count: int, outputs: Any | None,
          batch: Mapping[str, np.ndarray] | None) -> None:
    for k, v in sums.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(np.asarray(v))
    self.count += count
    if outputs is None or batch is None or count == 0:
      return
    size = tuple(np.asarray(batch['image']).shape[1:3])
    self.predictions += post_process_object_detection(
        {'logits': _get(outputs, 'logits'), 'pred_boxes': _get(outputs, 'pred_boxes')},
        threshold=self.task.threshold, target_sizes=[size] * count, top_k=self.task.top_k)
    self.targets += [{k: np.asarray(batch[k][i]) for k in _LABELS} for i in range(count)]
    self.sizes += [size] * count

  def result(self) -> dict[str, Any]:
    out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
    if self.targets:
      out.update(coco_evaluate(self.predictions, self.targets, self.sizes))
    return out


@dataclasses.dataclass(frozen=True)
class Detection:
  """Object detection with Deformable DETR's loss and COCO's evaluation, for the train system.

  Records of the sources are dicts with `image [H, W, C]` and the padded targets `class_labels [T]` int32,
  `boxes [T, 4]` float32 (cx, cy, w, h in [0, 1]) and `label_mask [T]` bool, as
  `deformjax.data.digit_canvases` makes them. The model is called as `model(images, deterministic=not train)`
  and returns `logits [B, Q, num_classes]` and `pred_boxes [B, Q, 4]` (and the auxiliary and two-stage outputs
  the loss config asks for), as `deformjax.models.DeformableDetr` does. Boxes are not warped: train without
  augmentation.

  Attributes:
    max_targets: T, the padded number of targets per image.
    loss_config: the loss's config entries (transformers' names: `class_cost`, `bbox_cost`, `giou_cost`,
      `focal_alpha`, `bbox_loss_coefficient`, `giou_loss_coefficient`, `auxiliary_loss`) as `(key, value)`
      pairs, so that the task stays hashable; missing keys take transformers' defaults.
    encoder_loss: add the two-stage encoder terms (see :func:`detection_loss`).
    threshold, top_k: the post-processing of evaluation (keep a threshold of 0 for AP).

  `name` ('detection'), `eval_outputs` (True) and `summary_columns` are what the train system reads.

  Example:
    >>> task = Detection(max_targets=3, loss_config=(('auxiliary_loss', True),))
    >>> {k: v.shape for k, v in task.label_layout(None).items()}
    {'class_labels': (3,), 'boxes': (3, 4), 'label_mask': (3,)}
  """

  max_targets: int
  loss_config: tuple[tuple[str, Any], ...] = ()
  encoder_loss: bool = False
  threshold: float = 0.0
  top_k: int = 100
  name: ClassVar[str] = 'detection'
  eval_outputs: ClassVar[bool] = True
  #: The entries of a detector config the loss reads (transformers' names).
  LOSS_KEYS: ClassVar[tuple[str, ...]] = ('auxiliary_loss', 'class_cost', 'bbox_cost', 'giou_cost', 'focal_alpha',
                                          'bbox_loss_coefficient', 'giou_loss_coefficient')

  @classmethod
  def from_config(cls, config: Mapping[str, Any], max_targets: int, **kwargs: Any) -> Detection:
    """The task that trains the detector `config` describes (transformers' `DeformableDetrConfig` fields).

    Args:
      config: the detector's config; its loss weights, matching costs and `auxiliary_loss` are kept, and
        `two_stage` turns on the encoder's loss terms (as the original Deformable DETR trains; transformers'
        `loss` leaves them out, see :func:`detection_loss`).
      max_targets: T, the padded number of targets per image.
      **kwargs: the other attributes (`threshold`, `top_k`).

    Returns:
      The task.
    """
    loss_config = tuple((k, config[k]) for k in cls.LOSS_KEYS if k in config)
    return cls(max_targets, loss_config, encoder_loss=bool(config.get('two_stage', False)), **kwargs)

  @property
  def summary_columns(self) -> dict[str, str]:
    """The final table's columns: the loss and COCO's AP, AP50, AP75."""
    return {'loss': '{:.4f}', 'AP': '{:.3f}', 'AP50': '{:.3f}', 'AP75': '{:.3f}'}

  def describe(self, train: Any, test: Any, num_classes: int = 0) -> DatasetSpec:
    """The spec of detection sources: image shape from the first record, classes from `num_classes` or the
    largest class in the train split's targets."""
    for what, source in (('train', train), ('test', test)):
      if len(source) == 0:
        raise ValueError(f'Detection: the {what} split is empty')
      missing = [k for k in ('image', *_LABELS) if k not in source[0]]
      if missing:
        raise ValueError(f'Detection: {what} records need image, class_labels, boxes and label_mask; missing '
                         f'{missing}')
    image = np.asarray(train[0]['image'])
    if image.ndim != 3:
      raise ValueError(f'Detection: images must be [H, W, C] each, got {image.shape}')
    if num_classes <= 0:
      labels = getattr(train, 'class_labels', None)
      if labels is None:
        labels = np.stack([np.asarray(train[i]['class_labels']) for i in range(len(train))])
      mask = getattr(train, 'label_mask', None)
      num_classes = int(np.asarray(labels)[np.asarray(mask, bool)].max() + 1 if mask is not None
                        else np.asarray(labels).max() + 1)
    return DatasetSpec('arrays', tuple(image.shape), int(num_classes))

  def label_layout(self, spec: DatasetSpec | None) -> dict[str, jax.ShapeDtypeStruct]:
    """`class_labels [T]` int32, `boxes [T, 4]` float32, `label_mask [T]` bool, per example."""
    t = self.max_targets
    return {'class_labels': jax.ShapeDtypeStruct((t,), jnp.int32),
            'boxes': jax.ShapeDtypeStruct((t, 4), jnp.float32), 'label_mask': jax.ShapeDtypeStruct((t,), jnp.bool_)}

  def forward(self, model: Any, batch: Mapping[str, jax.Array], *, train: bool, rngs: Any) -> Any:
    """`model(batch['image'], deterministic=not train)` (a `pixel_mask` in the batch is passed on)."""
    return model(batch['image'], batch.get('pixel_mask'), deterministic=not train)

  def check_outputs(self, outputs: Any, spec: DatasetSpec) -> None:
    """Refuses outputs without `logits [B, Q, num_classes]` and `pred_boxes [B, Q, 4]`."""
    logits, boxes = _get(outputs, 'logits'), _get(outputs, 'pred_boxes')
    if logits is None or boxes is None:
      raise ValueError('Detection: the model output has no logits and pred_boxes (a DETR-style detector is needed)')
    if len(logits.shape) != 3 or logits.shape[-1] != spec.num_classes or tuple(boxes.shape) != (
        *logits.shape[:2], 4):
      raise ValueError(f'Detection: model output logits {list(logits.shape)} and pred_boxes {list(boxes.shape)} '
                       f'do not fit [B, Q, {spec.num_classes}] and [B, Q, 4]')

  def loss(self, outputs: Any, batch: Mapping[str, jax.Array],
           weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`detection_loss` over the real examples; sums are the loss terms times the real example count."""
    labels = {'class_labels': batch['class_labels'], 'boxes': batch['boxes'],
              'label_mask': batch['label_mask'].astype(bool)}
    loss, parts = detection_loss(outputs, labels, dict(self.loss_config), encoder_loss=self.encoder_loss,
                                 image_weights=weights)
    count = weights.sum().astype(jnp.float32)
    sums = {'loss': loss.astype(jnp.float32) * count}
    sums.update({k: parts[k].astype(jnp.float32) * count for k in _LOGGED})
    return loss, sums

  def evaluator(self, spec: DatasetSpec) -> _DetectionEvaluator:
    """A fresh evaluator: mean loss terms, then COCO's metrics of the pass's detections."""
    return _DetectionEvaluator(self)
