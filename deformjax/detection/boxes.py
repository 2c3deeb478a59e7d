"""Box formats and overlaps: (cx, cy, w, h) <-> (x0, y0, x1, y1), IoU and generalized IoU.

The formulas are those of DETR's `box_ops` (and transformers' copies of them): corner boxes with
`x0 <= x1`, `y0 <= y1`; the pairwise functions broadcast over leading batch dimensions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ['box_area', 'box_cxcywh_to_xyxy', 'box_iou', 'box_xyxy_to_cxcywh', 'generalized_box_iou']


def _check_boxes(boxes: jax.Array, name: str, fn: str) -> None:
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f'{fn}: {name} must have shape [..., 4], got {tuple(boxes.shape)}')


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """Centre boxes to corner boxes.

  Args:
    boxes: `[..., 4]` as (cx, cy, w, h).

  Returns:
    `[..., 4]` as (x0, y0, x1, y1) = (cx - w/2, cy - h/2, cx + w/2, cy + h/2).

  Example:
    >>> box_cxcywh_to_xyxy(jnp.array([0.5, 0.5, 0.25, 0.5])).tolist()
    [0.375, 0.25, 0.625, 0.75]
  """
  boxes = jnp.asarray(boxes)
  _check_boxes(boxes, 'boxes', 'box_cxcywh_to_xyxy')
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """Corner boxes to centre boxes (the inverse of :func:`box_cxcywh_to_xyxy`).

  Args:
    boxes: `[..., 4]` as (x0, y0, x1, y1).

  Returns:
    `[..., 4]` as (cx, cy, w, h).

  Example:
    >>> box_xyxy_to_cxcywh(jnp.array([0.0, 0.0, 2.0, 4.0])).tolist()
    [1.0, 2.0, 2.0, 4.0]
  """
  boxes = jnp.asarray(boxes)
  _check_boxes(boxes, 'boxes', 'box_xyxy_to_cxcywh')
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
  """Area of corner boxes.

  Args:
    boxes: `[..., 4]` as (x0, y0, x1, y1).

  Returns:
    `[...]`: `(x1 - x0) * (y1 - y0)`.
  """
  boxes = jnp.asarray(boxes)
  _check_boxes(boxes, 'boxes', 'box_area')
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou_union(boxes1: jax.Array, boxes2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Elementwise IoU and union of broadcastable corner boxes `[..., 4]`."""
  area1, area2 = box_area(boxes1), box_area(boxes2)
  left_top = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
  right_bottom = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
  wh = jnp.clip(right_bottom - left_top, min=0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1 + area2 - inter
  return inter / union, union


def _giou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Elementwise generalized IoU of broadcastable corner boxes `[..., 4]`."""
  iou, union = _iou_union(boxes1, boxes2)
  top_left = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
  bottom_right = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
  wh = jnp.clip(bottom_right - top_left, min=0)
  area = wh[..., 0] * wh[..., 1]
  return iou - (area - union) / area


def _pairwise(boxes1: jax.Array, boxes2: jax.Array, fn: str) -> tuple[jax.Array, jax.Array]:
  boxes1, boxes2 = jnp.asarray(boxes1), jnp.asarray(boxes2)
  _check_boxes(boxes1, 'boxes1', fn)
  _check_boxes(boxes2, 'boxes2', fn)
  if boxes1.ndim < 2 or boxes2.ndim < 2 or boxes1.shape[:-2] != boxes2.shape[:-2]:
    raise ValueError(f'{fn}: boxes1 [..., N, 4] and boxes2 [..., M, 4] need the same leading dimensions, got '
                     f'{tuple(boxes1.shape)} and {tuple(boxes2.shape)}')
  return boxes1[..., :, None, :], boxes2[..., None, :, :]


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise intersection over union of corner boxes.

  Args:
    boxes1: `[..., N, 4]` as (x0, y0, x1, y1).
    boxes2: `[..., M, 4]`, the same leading dimensions.

  Returns:
    `[..., N, M]`: `inter / union` (NaN for two empty boxes).

  Example:
    >>> box_iou(jnp.array([[0.0, 0.0, 2.0, 1.0]]), jnp.array([[1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 4.0, 1.0]])).tolist()
    [[0.5, 0.5]]
  """
  a, b = _pairwise(boxes1, boxes2, 'box_iou')
  return _iou_union(a, b)[0]


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise generalized IoU (Rezatofighi et al., 2019) of corner boxes, as DETR computes it.

  `giou = iou - (enclosing - union) / enclosing`, with `enclosing` the area of the smallest box that holds both.

  Args:
    boxes1: `[..., N, 4]` as (x0, y0, x1, y1), `x0 <= x1`, `y0 <= y1`.
    boxes2: `[..., M, 4]`, the same leading dimensions.

  Returns:
    `[..., N, M]` in [-1, 1] (NaN where both boxes are empty points at one place).

  Example:
    >>> generalized_box_iou(jnp.array([[0.0, 0.0, 1.0, 1.0]]), jnp.array([[3.0, 0.0, 4.0, 1.0]])).tolist()
    [[-0.5]]
  """
  a, b = _pairwise(boxes1, boxes2, 'generalized_box_iou')
  return _giou(a, b)
