"""Detector outputs to scored corner boxes, as transformers' `DeformableDetrImageProcessor` does it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deformjax.detection.boxes import box_cxcywh_to_xyxy

__all__ = ['post_process_object_detection']


def _field(outputs: Any, name: str) -> jax.Array:
  value = outputs.get(name) if isinstance(outputs, dict) else getattr(outputs, name, None)
  if value is None:
    raise ValueError(f'post_process_object_detection: outputs have no {name}')
  return jnp.asarray(value)


@jax.jit(static_argnames='top_k')
def _top_detections(logits: jax.Array, pred_boxes: jax.Array, scale: jax.Array, top_k: int):
  """Top-k scores over queries x classes, their labels and their boxes in corner form, scaled by `scale [N, 4]`."""
  n, q, c = logits.shape
  prob = jax.nn.sigmoid(logits).reshape(n, q * c)
  scores, index = jax.lax.top_k(prob, min(top_k, q * c))
  boxes = jnp.take_along_axis(box_cxcywh_to_xyxy(pred_boxes), (index // c)[..., None], axis=1)
  return scores, index % c, boxes * scale[:, None, :]


def post_process_object_detection(outputs: Any, threshold: float = 0.5,
                                  target_sizes: Sequence[Sequence[int]] | jax.Array | None = None,
                                  top_k: int = 100) -> list[dict[str, np.ndarray]]:
  """Scored boxes per image: transformers' `DeformableDetrImageProcessor.post_process_object_detection`.

  Takes the `top_k` highest sigmoid scores over all (query, class) pairs of an image, so one query can give
  boxes of several classes; converts their boxes to corners, scales them to `target_sizes`, and keeps those
  scoring above `threshold`, in descending score order.

  Args:
    outputs: the detector's output (attributes or a dict): `logits [N, Q, num_labels]` and `pred_boxes [N, Q, 4]`
      ((cx, cy, w, h) in [0, 1]).
    threshold: keep scores strictly above it.
    target_sizes: `[N, 2]` (height, width) of each image; None leaves boxes relative, in [0, 1].
    top_k: how many (query, class) pairs to consider per image (fewer when `Q * num_labels` is smaller).

  Returns:
    one dict per image: `scores [k]`, `labels [k]` (int), `boxes [k, 4]` as (x0, y0, x1, y1), numpy arrays.

  Example:
    >>> outputs = {'logits': jnp.array([[[3.0, -3.0], [-3.0, -3.0]]]),
    ...            'pred_boxes': jnp.array([[[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]]])}
    >>> result = post_process_object_detection(outputs, target_sizes=[(100, 200)])[0]
    >>> result['labels'].tolist(), result['boxes'].tolist()
    ([0], [[50.0, 25.0, 150.0, 75.0]])
  """
  logits, pred_boxes = _field(outputs, 'logits'), _field(outputs, 'pred_boxes')
  if logits.ndim != 3 or pred_boxes.shape != (*logits.shape[:2], 4):
    raise ValueError(f'post_process_object_detection: want logits [N, Q, num_labels] and pred_boxes [N, Q, 4], '
                     f'got {tuple(logits.shape)} and {tuple(pred_boxes.shape)}')
  n = logits.shape[0]
  if target_sizes is None:
    scale = jnp.ones((n, 4), pred_boxes.dtype)
  else:
    sizes = jnp.asarray(target_sizes, pred_boxes.dtype)
    if sizes.shape != (n, 2):
      raise ValueError(f'post_process_object_detection: target_sizes must be [N, 2] (height, width) with N = {n}, '
                       f'got {tuple(sizes.shape)}')
    scale = jnp.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], axis=1)
  scores, labels, boxes = (np.asarray(a) for a in _top_detections(logits, pred_boxes, scale, top_k))
  keep = scores > threshold
  return [{'scores': s[k], 'labels': lab[k], 'boxes': b[k]} for s, lab, b, k in zip(scores, labels, boxes, keep)]
