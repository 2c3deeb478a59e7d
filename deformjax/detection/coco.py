"""COCO box evaluation (AP, AP50, AP75, ...) through pycocotools, from arrays in memory.

pycocotools is imported when an evaluation runs (`pip install 'deformjax[detection]'`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ['COCO_METRICS', 'coco_evaluate']

COCO_METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


def _ground_truth(targets: Sequence[Mapping[str, Any]], image_sizes: np.ndarray) -> tuple[list, set]:
  """COCO annotations ([x, y, w, h] in pixels, area w*h) from normalised (cx, cy, w, h) targets."""
  anns: list[dict[str, Any]] = []
  cats: set[int] = set()
  for i, (target, (h, w)) in enumerate(zip(targets, image_sizes)):
    boxes = np.asarray(target['boxes'], np.float64).reshape(-1, 4) * np.array([w, h, w, h])
    labels = np.asarray(target['class_labels']).reshape(-1)
    if 'label_mask' in target:
      keep = np.asarray(target['label_mask'], bool).reshape(-1)
      boxes, labels = boxes[keep], labels[keep]
    for (cx, cy, bw, bh), label in zip(boxes, labels):
      cats.add(int(label))
      anns.append({'id': len(anns) + 1, 'image_id': i, 'category_id': int(label), 'iscrowd': 0,
                   'bbox': [cx - bw / 2, cy - bh / 2, bw, bh], 'area': bw * bh})
  return anns, cats


def _detections(predictions: Sequence[Mapping[str, Any]]) -> list:
  """COCO results ([x, y, w, h] in pixels, score) from corner boxes in pixels."""
  dets: list[dict[str, Any]] = []
  for i, pred in enumerate(predictions):
    boxes = np.asarray(pred['boxes'], np.float64).reshape(-1, 4)
    for (x0, y0, x1, y1), label, score in zip(boxes, np.asarray(pred['labels']).reshape(-1),
                                              np.asarray(pred['scores']).reshape(-1)):
      dets.append({'id': len(dets) + 1, 'image_id': i, 'category_id': int(label), 'score': float(score),
                   'iscrowd': 0, 'bbox': [x0, y0, x1 - x0, y1 - y0], 'area': (x1 - x0) * (y1 - y0)})
  return dets


def _coco(images: list, categories: list, anns: list) -> Any:
  from pycocotools.coco import COCO

  coco = COCO()
  coco.dataset = {'images': images, 'categories': categories, 'annotations': anns}
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def coco_evaluate(predictions: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]],
                  image_sizes: Sequence[Sequence[int]] | np.ndarray) -> dict[str, float]:
  """COCO's box metrics of predictions against ground truth, by pycocotools' `COCOeval`.

  Both sets are built as COCO objects in memory (no files). Categories are the labels present in the ground truth
  and the predictions; COCO's area ranges (small < 32^2 < medium < 96^2 pixels) apply to the sizes given.

  Args:
    predictions: one dict per image, as :func:`post_process_object_detection` returns with `target_sizes`:
      `scores [k]`, `labels [k]` (int), `boxes [k, 4]` as (x0, y0, x1, y1) in pixels. COCO counts at most the
      100 highest-scoring boxes of an image.
    targets: one dict per image, transformers' labels: `class_labels [t]` (int), `boxes [t, 4]` as (cx, cy, w, h)
      in [0, 1]; an optional `label_mask [t]` drops padded slots.
    image_sizes: `[N, 2]` (height, width) of each image in pixels.

  Returns:
    `{name: value}` for every name of :data:`COCO_METRICS` (AP averaged over IoU 0.5:0.95, AP50, AP75, AP by
    area, AR at 1/10/100 detections, AR by area); COCO reports -1 where a metric has no ground truth.

  Example:
    >>> target = {'class_labels': np.array([0]), 'boxes': np.array([[0.5, 0.5, 0.5, 0.5]])}
    >>> pred = {'scores': np.array([0.9]), 'labels': np.array([0]), 'boxes': np.array([[16.0, 16.0, 48.0, 48.0]])}
    >>> coco_evaluate([pred], [target], [(64, 64)])['AP']
    1.0
  """
  from pycocotools.cocoeval import COCOeval

  sizes = np.asarray(image_sizes, np.float64).reshape(-1, 2)
  if len(predictions) != len(targets) or len(sizes) != len(targets):
    raise ValueError(f'coco_evaluate: predictions ({len(predictions)}), targets ({len(targets)}) and image_sizes '
                     f'({len(sizes)}) must describe the same images')
  anns, cats = _ground_truth(targets, sizes)
  dets = _detections(predictions)
  cats |= {d['category_id'] for d in dets}
  images = [{'id': i, 'height': float(h), 'width': float(w)} for i, (h, w) in enumerate(sizes)]
  categories = [{'id': c, 'name': str(c)} for c in sorted(cats)]
  gt, dt = _coco(images, categories, anns), _coco(images, categories, dets)
  evaluator = COCOeval(gt, dt, iouType='bbox')
  with contextlib.redirect_stdout(io.StringIO()):
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(v) for name, v in zip(COCO_METRICS, evaluator.stats)}
