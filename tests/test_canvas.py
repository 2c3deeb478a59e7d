"""deformjax.data.digit_canvases: digits placed on canvases with their boxes, a detection data set."""

from __future__ import annotations

import numpy as np
import pytest

from deformjax.data.canvas import digit_canvases


@pytest.fixture(scope='module')
def canvases():
  pytest.importorskip('sklearn')
  return digit_canvases('train', 24, size=48, num_digits=(1, 3), digit_size=(12, 20), source='digits', seed=3)


def test_shapes_dtypes_and_counts(canvases):
  assert canvases.images.shape == (24, 48, 48, 3) and canvases.images.dtype == np.float32
  assert canvases.class_labels.shape == (24, 3) and canvases.class_labels.dtype == np.int32
  assert canvases.boxes.shape == (24, 3, 4) and canvases.label_mask.shape == (24, 3)
  counts = canvases.label_mask.sum(1)
  assert counts.min() >= 1 and counts.max() <= 3
  assert (canvases.label_mask[:, :-1] >= canvases.label_mask[:, 1:]).all()  # real targets first, then padding
  assert ((canvases.class_labels >= 0) & (canvases.class_labels <= 9)).all()
  assert len(canvases) == 24 and set(canvases[0]) == {'image', 'class_labels', 'boxes', 'label_mask'}


def test_boxes_are_tight_around_the_ink_and_apart(canvases):
  for image, boxes, mask in zip(canvases.images[..., 0], canvases.boxes, canvases.label_mask):
    ink = np.zeros(image.shape, bool)
    xyxy = []
    for cx, cy, w, h in boxes[mask] * 48:
      x0, y0, x1, y1 = (int(round(v)) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
      assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
      region = image[y0:y1, x0:x1] > 0.25
      # Tight: ink on each of the box's four edges.
      assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
      ink[y0:y1, x0:x1] = True
      xyxy.append((x0, y0, x1, y1))
    assert not (image[~ink] > 0.25).any()  # every ink pixel is in some box
    for i, a in enumerate(xyxy):
      for b in xyxy[:i]:
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        assert inter / area <= 0.1 + 1e-9


def test_deterministic_by_seed_and_the_splits_differ(canvases):
  again = digit_canvases('train', 24, size=48, num_digits=(1, 3), digit_size=(12, 20), source='digits', seed=3)
  np.testing.assert_array_equal(again.images, canvases.images)
  np.testing.assert_array_equal(again.boxes, canvases.boxes)
  other = digit_canvases('train', 24, size=48, num_digits=(1, 3), digit_size=(12, 20), source='digits', seed=4)
  assert not np.array_equal(other.images, canvases.images)
  labels = canvases.labels()
  assert len(labels) == 24 and labels[0]['boxes'].shape == (canvases.label_mask[0].sum(), 4)


def test_train_and_test_canvases_use_disjoint_source_digits():
  pytest.importorskip('sklearn')
  from deformjax.data import load_source

  train, test = load_source('digits', 'train').images, load_source('digits', 'test').images
  train_keys = {d.tobytes() for d in train}
  assert not any(d.tobytes() in train_keys for d in test)  # the source splits share no image
  one = digit_canvases('test', 1, size=28, num_digits=(1, 1), digit_size=(28, 28), source='digits', seed=0)
  assert any(np.allclose(one.images[0, ..., 0], d[..., 0]) for d in test)  # a full-size digit: one of the test split


def test_bad_arguments_are_refused_by_name():
  with pytest.raises(ValueError, match='num_digits must be'):
    digit_canvases('train', 1, num_digits=(0, 2), source='digits')
  with pytest.raises(ValueError, match='digit_size must be .* <= size=32'):
    digit_canvases('train', 1, size=32, digit_size=(16, 40), source='digits')
  with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
    digit_canvases('val', 1, source='digits')
