"""Hungarian matching of predictions to targets, as Deformable DETR's matcher computes it.

The cost of giving target `t` to query `q` is transformers' `DeformableDetrHungarianMatcher`'s:
`class_cost * focal(q, t) + bbox_cost * L1(q, t) + giou_cost * (-GIoU(q, t))`, with the focal-style class cost
`alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8))` at `p = sigmoid(logit of t's class)`.
The assignment is scipy's `linear_sum_assignment` (a maintained, exact O(n^3) solver) called through
`jax.pure_callback`, so matching works inside `jax.jit` and under `jax.vmap`; scipy is imported when a match runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from deformjax.detection.boxes import _giou, box_cxcywh_to_xyxy

__all__ = ['hungarian_match', 'matching_cost']

# Padded target slots are given this box, so that no cost or loss term divides by an empty box's area.
_SAFE_BOX = (0.5, 0.5, 1.0, 1.0)


def _check_match_args(logits, pred_boxes, class_labels, boxes, fn: str) -> None:
  if logits.ndim != 3:
    raise ValueError(f'{fn}: logits must have shape [N, Q, num_labels], got {tuple(logits.shape)}')
  n, q, _ = logits.shape
  if pred_boxes.shape != (n, q, 4):
    raise ValueError(f'{fn}: pred_boxes must have shape [N, Q, 4] = {(n, q, 4)}, got {tuple(pred_boxes.shape)}')
  if class_labels.ndim != 2 or class_labels.shape[0] != n:
    raise ValueError(f'{fn}: class_labels must have shape [N, T] with N = {n}, got {tuple(class_labels.shape)}')
  if boxes.shape != (*class_labels.shape, 4):
    raise ValueError(f'{fn}: boxes must have shape [N, T, 4] = {(*class_labels.shape, 4)}, got {tuple(boxes.shape)}')


@functools.partial(jax.jit, static_argnames=('class_cost', 'bbox_cost', 'giou_cost', 'alpha', 'gamma'))
def matching_cost(logits: jax.Array, pred_boxes: jax.Array, class_labels: jax.Array, boxes: jax.Array, *,
                  class_cost: float = 1.0, bbox_cost: float = 5.0, giou_cost: float = 2.0, alpha: float = 0.25,
                  gamma: float = 2.0) -> jax.Array:
  """The matching cost of every query against every target of the same image.

  Args:
    logits: `[N, Q, num_labels]` class logits (sigmoid scores, no "no object" class).
    pred_boxes: `[N, Q, 4]` predicted boxes, (cx, cy, w, h) in [0, 1].
    class_labels: `[N, T]` integer target classes in `[0, num_labels)`.
    boxes: `[N, T, 4]` target boxes, (cx, cy, w, h) in [0, 1].
    class_cost, bbox_cost, giou_cost: the weights of the three costs (transformers' `DeformableDetrConfig`
      defaults).
    alpha, gamma: the focal cost's parameters (transformers' matcher fixes them at 0.25 and 2).

  Returns:
    `[N, Q, T]` cost, in the dtype of `logits`.
  """
  logits, pred_boxes = jnp.asarray(logits), jnp.asarray(pred_boxes)
  class_labels, boxes = jnp.asarray(class_labels), jnp.asarray(boxes)
  _check_match_args(logits, pred_boxes, class_labels, boxes, 'matching_cost')
  prob = jax.nn.sigmoid(logits)
  neg = (1 - alpha) * prob**gamma * -jnp.log(1 - prob + 1e-8)
  pos = alpha * (1 - prob) ** gamma * -jnp.log(prob + 1e-8)
  cls = jnp.take_along_axis(pos - neg, jnp.broadcast_to(class_labels[:, None, :], (*logits.shape[:2],
                                                                                   class_labels.shape[1])), axis=2)
  l1 = jnp.abs(pred_boxes[:, :, None, :] - boxes[:, None, :, :].astype(pred_boxes.dtype)).sum(-1)
  giou = _giou(box_cxcywh_to_xyxy(pred_boxes)[:, :, None, :], box_cxcywh_to_xyxy(boxes.astype(pred_boxes.dtype))[
      :, None, :, :])
  return bbox_cost * l1 + class_cost * cls - giou_cost * giou


def _assign_host(cost: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Host side of the match: for `cost [..., Q, T]` and `mask [..., T]`, the query of every target (-1: none)."""
  from scipy.optimize import linear_sum_assignment

  cost, mask = np.asarray(cost), np.asarray(mask, bool)
  lead = cost.shape[:-2]
  flat_cost = cost.reshape(-1, *cost.shape[-2:])
  flat_mask = np.broadcast_to(mask, (*lead, mask.shape[-1])).reshape(-1, mask.shape[-1])
  out = np.full(flat_mask.shape, -1, np.int32)
  big = np.finfo(cost.dtype).max
  for i, (c, m) in enumerate(zip(flat_cost, flat_mask)):
    cols = np.flatnonzero(m)
    if cols.size == 0 or c.shape[0] == 0:
      continue
    sub = np.nan_to_num(c[:, cols], nan=big, posinf=big, neginf=big)
    rows, picked = linear_sum_assignment(sub)
    out[i, cols[picked]] = rows
  return out.reshape(*lead, mask.shape[-1])


def hungarian_match(logits: jax.Array, pred_boxes: jax.Array, class_labels: jax.Array, boxes: jax.Array,
                    label_mask: jax.Array | None = None, *, class_cost: float = 1.0, bbox_cost: float = 5.0,
                    giou_cost: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """One-to-one assignment of queries to targets at the least total :func:`matching_cost`, per image.

  Works under `jax.jit` and `jax.vmap` (the solver runs on the host through `jax.pure_callback`); no gradient
  flows through the match (its inputs are wrapped in `jax.lax.stop_gradient`). Non-finite costs are replaced by
  the dtype's largest value before solving, as transformers does, so such a pair is chosen only when nothing else
  can be.

  Args:
    logits: `[N, Q, num_labels]` class logits.
    pred_boxes: `[N, Q, 4]` predicted boxes, (cx, cy, w, h) in [0, 1].
    class_labels: `[N, T]` integer target classes (padded).
    boxes: `[N, T, 4]` target boxes, (cx, cy, w, h) in [0, 1] (padded).
    label_mask: `[N, T]` bool, True for a real target; None: all are real.
    class_cost, bbox_cost, giou_cost, alpha, gamma: as :func:`matching_cost`.

  Returns:
    `[N, T]` int32: the query matched to each target, -1 for padded targets and for targets left unmatched
    (only when an image has more targets than queries).

  Example:
    >>> logits = jnp.zeros((1, 3, 2))
    >>> pred = jnp.array([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    >>> target = jnp.array([[[0.8, 0.8, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]])
    >>> hungarian_match(logits, pred, jnp.array([[0, 1]]), target).tolist()
    [[2, 0]]
  """
  class_labels = jnp.asarray(class_labels)
  if label_mask is None:
    label_mask = jnp.ones(class_labels.shape, bool)
  label_mask = jnp.asarray(label_mask, bool)
  if label_mask.shape != class_labels.shape:
    raise ValueError(f'hungarian_match: label_mask must have the shape of class_labels [N, T] = '
                     f'{tuple(class_labels.shape)}, got {tuple(label_mask.shape)}')
  boxes = jnp.where(label_mask[..., None], jnp.asarray(boxes), jnp.asarray(_SAFE_BOX, jnp.asarray(boxes).dtype))
  cost = jax.lax.stop_gradient(matching_cost(
      logits, pred_boxes, jnp.where(label_mask, class_labels, 0), boxes, class_cost=class_cost,
      bbox_cost=bbox_cost, giou_cost=giou_cost, alpha=alpha, gamma=gamma))
  out = jax.ShapeDtypeStruct(class_labels.shape, jnp.int32)
  return jax.pure_callback(_assign_host, out, cost, label_mask, vmap_method='broadcast_all')
