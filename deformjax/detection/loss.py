"""Deformable DETR's training loss: Hungarian matching, sigmoid focal classification, L1 and GIoU box losses.

The terms, their names and their normalisation are those of transformers' `DeformableDetrForObjectDetection`
(`transformers/loss/loss_deformable_detr.py`, from the original Deformable DETR):

- `loss_ce`: sigmoid focal loss (`focal_alpha`, gamma 2) of every query against its one-hot target (all zeros for
  an unmatched query), summed over queries and classes, divided by the number of target boxes;
- `loss_bbox`: L1 distance of matched (cx, cy, w, h) boxes, summed, divided by the number of target boxes;
- `loss_giou`: `1 - GIoU` of matched boxes, summed, divided by the number of target boxes;
- `cardinality_error`: mean absolute difference between the number of queries whose best score exceeds 0.5 and
  the number of targets (logged, not optimised);
- with `auxiliary_loss`, the same four for each earlier decoder layer, suffixed `_0`, `_1`, ...;
- with `encoder_loss=True` (two-stage), the same four for the encoder's proposals against class-agnostic targets
  (every label 0), suffixed `_enc`, as the original Deformable DETR trains them (transformers leaves them out).

`loss = loss_ce + bbox_loss_coefficient * loss_bbox + giou_loss_coefficient * loss_giou`, summed over the output
sets. The number of boxes is the batch's total, at least 1; under a sharded `jax.jit` it is the global batch's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deformjax.detection.boxes import _giou, box_cxcywh_to_xyxy
from deformjax.detection.matcher import _SAFE_BOX, hungarian_match

__all__ = ['detection_loss', 'pad_labels', 'sigmoid_focal_loss']

_LABEL_KEYS = ('class_labels', 'boxes', 'label_mask')


def pad_labels(labels: Sequence[Mapping[str, Any]], max_targets: int | None = None) -> dict[str, np.ndarray]:
  """transformers' per-image labels as padded arrays, for use under `jax.jit`.

  Args:
    labels: one dict per image with `class_labels [k]` (ints) and `boxes [k, 4]` ((cx, cy, w, h) in [0, 1]).
    max_targets: T, the padded length; None: the largest k of the batch (at least 1).

  Returns:
    `{'class_labels': [N, T] int32, 'boxes': [N, T, 4], 'label_mask': [N, T] bool}`; boxes are float32, or
    float64 where the input's are; padded slots hold class 0 and a zero box with mask False.

  Example:
    >>> padded = pad_labels([{'class_labels': [3], 'boxes': [[0.5, 0.5, 0.2, 0.2]]},
    ...                      {'class_labels': [], 'boxes': np.zeros((0, 4))}])
    >>> padded['class_labels'].tolist(), padded['label_mask'].tolist()
    ([[3], [0]], [[True], [False]])
  """
  counts = [len(np.asarray(lab['class_labels']).reshape(-1)) for lab in labels]
  t = max(max(counts, default=0), 1) if max_targets is None else int(max_targets)
  if counts and max(counts) > t:
    raise ValueError(f'pad_labels: an image has {max(counts)} targets, more than max_targets={t}')
  dtype = np.result_type(np.float32, *(np.asarray(lab['boxes']).dtype for lab in labels))
  out = {'class_labels': np.zeros((len(labels), t), np.int32), 'boxes': np.zeros((len(labels), t, 4), dtype),
         'label_mask': np.zeros((len(labels), t), bool)}
  for i, (lab, k) in enumerate(zip(labels, counts)):
    b = np.asarray(lab['boxes'], dtype).reshape(-1, 4)
    if b.shape[0] != k:
      raise ValueError(f'pad_labels: labels[{i}] has {k} class_labels but boxes of shape {b.shape}; want [{k}, 4]')
    out['class_labels'][i, :k] = np.asarray(lab['class_labels']).reshape(-1)
    out['boxes'][i, :k] = b
    out['label_mask'][i, :k] = True
  return out


def _as_padded(labels: Any) -> dict[str, jax.Array]:
  """Padded labels (a mapping with the three keys) as they are; a list of per-image dicts padded."""
  if isinstance(labels, Mapping):
    missing = [k for k in _LABEL_KEYS if k not in labels]
    if missing:
      raise ValueError(f'labels: padded labels need the keys {list(_LABEL_KEYS)}; missing {missing}')
    return {k: jnp.asarray(labels[k]) for k in _LABEL_KEYS}
  if isinstance(labels, Sequence):
    return {k: jnp.asarray(v) for k, v in pad_labels(labels).items()}
  raise TypeError(f'labels: want a list of per-image dicts or a dict of padded arrays, got {type(labels).__name__}')


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, *, alpha: float = 0.25,
                       gamma: float = 2.0) -> jax.Array:
  """Elementwise sigmoid focal loss (Lin et al., 2017), as RetinaNet and Deformable DETR use it.

  `alpha_t * (1 - p_t)^gamma * BCE(logits, targets)` with `p = sigmoid(logits)`,
  `p_t = p t + (1 - p)(1 - t)`, `alpha_t = alpha t + (1 - alpha)(1 - t)` (no alpha weighting when `alpha < 0`).

  Args:
    logits: `[...]` logits.
    targets: `[...]` binary targets, the shape of `logits`.
    alpha, gamma: the positive-class weight and the focusing exponent.

  Returns:
    `[...]` loss, unreduced.
  """
  logits = jnp.asarray(logits)
  targets = jnp.asarray(targets, logits.dtype)
  if targets.shape != logits.shape:
    raise ValueError(f'sigmoid_focal_loss: targets must have the shape of logits {tuple(logits.shape)}, '
                     f'got {tuple(targets.shape)}')
  prob = jax.nn.sigmoid(logits)
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = prob * targets + (1 - prob) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss


@jax.jit(static_argnames=('costs', 'focal_alpha'))
def _set_losses(logits, pred_boxes, labels, num_boxes, image_weights, costs, focal_alpha) -> dict[str, jax.Array]:
  """loss_ce, loss_bbox, loss_giou and cardinality_error of one output set against padded labels."""
  cls, tgt, mask = labels['class_labels'], labels['boxes'].astype(pred_boxes.dtype), labels['label_mask']
  class_cost, bbox_cost, giou_cost = costs
  query = hungarian_match(logits, pred_boxes, cls, tgt, mask, class_cost=class_cost, bbox_cost=bbox_cost,
                          giou_cost=giou_cost)
  matched = query >= 0  # [N, T]
  queries = jnp.arange(logits.shape[1], dtype=query.dtype)
  hit = (query[:, None, :] == queries[None, :, None]) & matched[:, None, :]  # [N, Q, T]
  onehot = jnp.einsum('nqt,ntc->nqc', hit.astype(logits.dtype), jax.nn.one_hot(cls, logits.shape[2],
                                                                                 dtype=logits.dtype))
  focal = sigmoid_focal_loss(logits, onehot, alpha=focal_alpha, gamma=2.0) * image_weights[:, None, None]
  src = jnp.take_along_axis(pred_boxes, jnp.maximum(query, 0)[..., None], axis=1)  # [N, T, 4]
  safe = jnp.asarray(_SAFE_BOX, pred_boxes.dtype)
  src, tgt = jnp.where(matched[..., None], src, safe), jnp.where(matched[..., None], tgt, safe)
  l1 = jnp.where(matched[..., None], jnp.abs(src - tgt), 0).sum()
  giou = jnp.where(matched, 1 - _giou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)), 0).sum()
  card_pred = (jax.nn.sigmoid(jax.lax.stop_gradient(logits)).max(-1) > 0.5).sum(1)
  card_err = jnp.abs(card_pred.astype(logits.dtype) - mask.sum(1).astype(logits.dtype))
  card = (card_err * image_weights).sum() / jnp.maximum(image_weights.sum(), 1)
  return {'loss_ce': focal.sum() / num_boxes, 'loss_bbox': l1 / num_boxes, 'loss_giou': giou / num_boxes,
          'cardinality_error': card}


def _get(outputs: Any, name: str) -> Any:
  if isinstance(outputs, Mapping):
    return outputs.get(name)
  return getattr(outputs, name, None)


def _output_sets(outputs: Any, config: Mapping[str, Any], encoder_loss: bool) -> list[tuple[str, Any, Any, bool]]:
  """(suffix, logits, pred_boxes, class_agnostic) of every output set the loss covers."""
  sets = [('', _get(outputs, 'logits'), _get(outputs, 'pred_boxes'), False)]
  if sets[0][1] is None or sets[0][2] is None:
    raise ValueError('detection_loss: outputs need logits [N, Q, num_labels] and pred_boxes [N, Q, 4]')
  if config.get('auxiliary_loss', False):
    aux = _get(outputs, 'auxiliary_outputs')
    if aux is None:
      raise ValueError("detection_loss: config['auxiliary_loss'] is set but outputs have no auxiliary_outputs")
    sets += [(f'_{i}', _get(a, 'logits'), _get(a, 'pred_boxes'), False) for i, a in enumerate(aux)]
  if encoder_loss:
    enc_class, enc_coord = _get(outputs, 'enc_outputs_class'), _get(outputs, 'enc_outputs_coord_logits')
    if enc_class is None or enc_coord is None:
      raise ValueError('detection_loss: encoder_loss=True needs enc_outputs_class and enc_outputs_coord_logits '
                       '(a two-stage detector)')
    sets.append(('_enc', enc_class, jax.nn.sigmoid(jnp.asarray(enc_coord)), True))
  return sets


def detection_loss(outputs: Any, labels: Any, config: Mapping[str, Any], *, encoder_loss: bool = False,
                   image_weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Deformable DETR's loss and its parts, as transformers' `DeformableDetrForObjectDetection` returns them.

  Works under `jax.jit` (with padded labels), `jax.grad` and sharded batches; see the module docstring for the
  terms.

  Args:
    outputs: the detector's output (attributes or a mapping): `logits [N, Q, num_labels]`, `pred_boxes [N, Q, 4]`
      ((cx, cy, w, h) in [0, 1]); with `config['auxiliary_loss']`, `auxiliary_outputs`: one `{'logits',
      'pred_boxes'}` per earlier decoder layer; with `encoder_loss`, `enc_outputs_class [N, S, num_labels]` and
      `enc_outputs_coord_logits [N, S, 4]` (before the sigmoid).
    labels: a list of N dicts with `class_labels [k]` and `boxes [k, 4]` (cx, cy, w, h in [0, 1]), or padded
      arrays `{'class_labels': [N, T] int, 'boxes': [N, T, 4], 'label_mask': [N, T] bool}`.
    config: transformers' `DeformableDetrConfig.to_dict()` or any mapping with the keys it reads:
      `class_cost` (1), `bbox_cost` (5), `giou_cost` (2), `focal_alpha` (0.25), `bbox_loss_coefficient` (5),
      `giou_loss_coefficient` (2), `auxiliary_loss` (False); missing keys take these defaults.
    encoder_loss: add the two-stage encoder proposals' terms (`_enc`), as the original Deformable DETR does.
    image_weights: optional `[N]`, 1 for a real image and 0 for a padding one (a batch filled up to its size):
      a padding image's targets, queries and cardinality leave every term. None: every image is real.

  Returns:
    `(loss, loss_dict)`: the weighted scalar loss and every term by transformers' name (`loss_ce`, `loss_bbox`,
    `loss_giou`, `cardinality_error`, each also with `_0`, `_1`, ... and `_enc` suffixes where those sets apply).

  Example:
    >>> outputs = {'logits': jnp.zeros((1, 4, 3)), 'pred_boxes': jnp.full((1, 4, 4), 0.5)}
    >>> labels = [{'class_labels': jnp.array([1]), 'boxes': jnp.array([[0.5, 0.5, 0.5, 0.5]])}]
    >>> loss, parts = detection_loss(outputs, labels, {})
    >>> sorted(parts)
    ['cardinality_error', 'loss_bbox', 'loss_ce', 'loss_giou']
  """
  padded = _as_padded(labels)
  n = padded['label_mask'].shape[0]
  dtype = jnp.asarray(_get(outputs, 'logits')).dtype
  weights = jnp.ones((n,), dtype) if image_weights is None else jnp.asarray(image_weights).astype(dtype)
  if weights.shape != (n,):
    raise ValueError(f'detection_loss: image_weights must have shape [N] = ({n},), got {tuple(weights.shape)}')
  padded['label_mask'] = padded['label_mask'] & (weights > 0)[:, None]
  num_boxes = jnp.maximum(padded['label_mask'].sum(), 1).astype(jnp.asarray(_get(outputs, 'logits')).dtype)
  coefficients = {'loss_ce': 1.0, 'loss_bbox': config.get('bbox_loss_coefficient', 5),
                  'loss_giou': config.get('giou_loss_coefficient', 2)}
  costs = tuple(float(config.get(k, v)) for k, v in (('class_cost', 1), ('bbox_cost', 5), ('giou_cost', 2)))
  loss_dict: dict[str, jax.Array] = {}
  loss = jnp.zeros((), num_boxes.dtype)
  for suffix, logits, pred_boxes, agnostic in _output_sets(outputs, config, encoder_loss):
    set_labels = dict(padded, class_labels=jnp.zeros_like(padded['class_labels'])) if agnostic else padded
    parts = _set_losses(jnp.asarray(logits), jnp.asarray(pred_boxes), set_labels, num_boxes, weights, costs,
                        float(config.get('focal_alpha', 0.25)))
    for name, value in parts.items():
      loss_dict[name + suffix] = value
      if name in coefficients:
        loss = loss + coefficients[name] * value
  return loss, loss_dict
