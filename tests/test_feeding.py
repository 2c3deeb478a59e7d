"""Batches on the device: the resident split's gather, the host prefetcher, every model trained through them."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax.data import ArraySource, DatasetSpec, get_spec, load_source, to_model_inputs, train_iterator
from deformjax.train import base_config, feeding, train
from deformjax.train import mesh as mesh_lib


def test_gather_batch_returns_the_requested_rows_as_model_inputs():
  mesh = mesh_lib.data_mesh()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(37, 4, 4, 3), dtype=np.uint8)  # 37: padded to the device count
  labels = rng.integers(0, 10, size=37).astype(np.int32)
  split = feeding.DeviceSplit.place(images, labels, mesh)
  assert split.size == 37 and split.images.dtype == jnp.uint8
  idx = jnp.asarray([36, 0, 5, 5, 17, 2, 30, 1], jnp.int32)
  got_images, got_labels = jax.jit(lambda i, l, x: feeding.gather_batch(mesh, i, l, x))(split.images, split.labels,
                                                                                         idx)
  want = to_model_inputs([{'image': images[i], 'label': labels[i]} for i in np.asarray(idx)],
                         DatasetSpec('tiny', (4, 4, 3), 10))
  np.testing.assert_array_equal(np.asarray(got_images), want['image'])
  np.testing.assert_array_equal(np.asarray(got_labels), want['label'])


def test_epoch_permutation_depends_on_seed_and_epoch_only():
  mesh = mesh_lib.data_mesh()
  a = np.asarray(feeding.epoch_permutation(mesh, 3, 1, 50))
  assert sorted(a.tolist()) == list(range(50))
  np.testing.assert_array_equal(a, np.asarray(feeding.epoch_permutation(mesh, 3, 1, 50)))
  assert not np.array_equal(a, np.asarray(feeding.epoch_permutation(mesh, 3, 2, 50)))
  assert not np.array_equal(a, np.asarray(feeding.epoch_permutation(mesh, 4, 1, 50)))


def test_read_split_keeps_uint8_and_the_placement_follows_the_size():
  spec = get_spec('cifar10')
  src = ArraySource(np.zeros((6, 32, 32, 3), np.uint8), np.arange(6))
  images, labels = feeding.read_split(src, spec)
  assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 3)
  assert list(labels) == ['label'] and labels['label'].dtype == np.int32
  assert feeding.fits_on_device(spec, 50_000)  # CIFAR-10's train split
  assert not feeding.fits_on_device(get_spec('coco9'), 118_287)


def test_prefetcher_state_is_the_next_batch_not_handed_out():
  """Over `host_batches`, the grain pipeline a host-fed run trains from, checked against the data loader's own
  `train_iterator` (the same batches)."""
  from deformjax.train.task import default_task

  src = load_source('digits', 'train')
  spec = get_spec('digits')
  layout = default_task(spec).label_layout(spec)
  loader = train_iterator(src, spec, global_batch=16, seed=1)
  make = lambda: feeding.host_batches(src, spec, layout, global_batch=16, seed=1)
  first = next(make())
  np.testing.assert_array_equal(first['image'], next(loader)['image'])
  plain = make()
  want = [next(plain)['label'] for _ in range(6)]
  fetch = feeding.Prefetcher(make(), put=lambda b: b, depth=3)
  got = [next(fetch)['label'] for _ in range(2)]
  state = fetch.get_state()  # three more batches are already in flight
  json.loads(state.decode())
  resumed = feeding.Prefetcher(make(), put=lambda b: b, depth=3)
  resumed.set_state(state)
  got += [next(resumed)['label'] for _ in range(4)]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


MODEL_DATA = {'conv5': ('mnist', 28, 1), 'cifarnet': ('cifar10', 32, 3)}


def model_accuracy(cfg, spec, params, source) -> float:
  """Top-1 accuracy of `params` on every example of `source`, computed here outside the train loop."""
  from flax import nnx

  from deformjax.train.loop import model_factory
  from deformjax.train.steps import normalise

  model = model_factory(cfg, spec)(0)
  nnx.update(model, jax.device_get(params))
  batch = to_model_inputs([source[i] for i in range(len(source))], spec)
  logits = model(normalise(jnp.asarray(batch['image'])))
  return float(np.mean(np.argmax(np.asarray(logits), -1) == batch['label']))


# conv5 with unmodulated deformable layers trains in test_train's small runs (6 steps; 150 steps in its
# digits-default test, slow tier). The fast tier trains the regular CifarNet on TFDS data; that offset and mask
# predictors receive updates is test_nn's (a fresh layer's zero heads get gradients) and the slow tier's here
# (deformable, modulated CifarNet and conv5).
@pytest.mark.parametrize('model,deformable,modulated', [
    ('cifarnet', 'none', False),
    pytest.param('cifarnet', 'all', False, marks=pytest.mark.slow),
    pytest.param('cifarnet', 'all', True, marks=pytest.mark.slow),
    pytest.param('conv5', 'none', False, marks=pytest.mark.slow),
    pytest.param('conv5', 'all', True, marks=pytest.mark.slow)], ids=lambda v: str(v))
def test_every_model_trains_through_the_train_loop(model, deformable, modulated):
  """Two steps of deformjax.train.train on TFDS mock data of the model's dataset, strict promotion (conftest):
  every parameter (offset and mask predictors included) receives an update, and the reported accuracy is the
  trained model's own on the test split."""
  tfds = pytest.importorskip('tensorflow_datasets')
  from deformjax.train.loop import model_factory

  dataset, size, channels = MODEL_DATA[model]
  cfg = base_config()
  cfg.dataset, cfg.model, cfg.deformable, cfg.modulated = dataset, model, deformable, modulated
  cfg.steps, cfg.batch_size, cfg.eval_batch_size, cfg.log_every, cfg.progress = 2, 8, 16, 1, False
  cfg.num_devices, cfg.train_augment.max_rotation_deg = 1, 15.0
  spec = get_spec(dataset)
  with tfds.testing.mock_data(num_examples=24):
    summary = train(cfg, echo=lambda *_: None)
    test = load_source(dataset, spec.splits[1])
    accuracy = model_accuracy(cfg, spec, summary['params'], test)
  assert summary['data_placement'] == 'device'
  assert [h['step'] for h in summary['train_history']] == [1, 2]
  assert all(np.isfinite(h['loss']) for h in summary['train_history'])
  init = nnx_leaves(nnx.state(model_factory(cfg, spec)(cfg.seed), nnx.Param))
  trained = nnx_leaves(summary['params'])
  assert sorted(init) == sorted(trained)
  unchanged = [k for k in init if np.array_equal(init[k], trained[k])]
  assert unchanged == []
  assert summary['eval']['baseline']['accuracy'] == pytest.approx(accuracy, abs=1e-6)


def nnx_leaves(state) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


# The fast tier's multi-label run is test_train_user's (a small model of the test's own, resumed from a checkpoint).
@pytest.mark.slow
def test_a_multilabel_dataset_trains_and_reports_map(monkeypatch):
  """The COCO path (BCE, per-class accuracy, mAP) on in-memory data: each digit image labelled with its digit
  and the next one, so every class has positives."""
  from deformjax.data import sources

  spec = sources.DatasetSpec('digits_pairs', (28, 28, 1), 10, multilabel=True,
                             class_names=tuple(str(i) for i in range(10)))
  monkeypatch.setitem(sources._DATASETS, 'digits_pairs', spec)

  def pairs(split, n):
    base = sources.digits_source(split)
    labels = np.zeros((n, 10), np.float32)
    labels[np.arange(n), base.labels[:n]] = 1
    labels[np.arange(n), (base.labels[:n] + 1) % 10] = 1
    return ArraySource(base.images[:n], labels)

  cfg = base_config()
  cfg.dataset, cfg.deformable, cfg.num_devices, cfg.progress = 'digits_pairs', 'none', 1, False
  cfg.steps, cfg.batch_size, cfg.eval_batch_size = 3, 32, 64
  summary = train(cfg, echo=lambda *_: None, sources=(pairs('train', 96), pairs('test', 64)))
  ev = summary['eval']['baseline']
  assert set(ev['per_class_accuracy']) == set(spec.class_names) == set(ev['average_precision'])
  assert ev['mean_accuracy'] == pytest.approx(np.mean(list(ev['per_class_accuracy'].values())))
  assert ev['mAP'] == pytest.approx(np.mean(list(ev['average_precision'].values())))


def test_runs_that_differ_only_in_seed_or_transform_share_compiled_steps():
  from deformjax.train.loop import model_factory
  from deformjax.train.steps import make_trainer

  mesh = mesh_lib.data_mesh()
  spec = get_spec('digits')

  def trainer(seed, rotation=0.0, lr=1e-3):
    cfg = base_config()
    cfg.seed, cfg.workdir, cfg.log_every, cfg.learning_rate = seed, f'/tmp/run{seed}', 7 + seed, lr
    cfg.train_augment.max_rotation_deg = rotation
    return make_trainer(model_factory(cfg, spec), cfg, spec, mesh, 22, 44)

  a, b, c, d = trainer(0), trainer(1), trainer(0, rotation=30.0), trainer(0, lr=1e-2)
  assert a.train_step is b.train_step and a.resident_step is b.resident_step and a.eval_step is b.eval_step
  assert a.train_step is c.train_step and a.resident_step is c.resident_step and a.eval_step is c.eval_step
  assert a.train_step is not d.train_step
  pa, pb = a.init_state(0)['params'], b.init_state(1)['params']
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
