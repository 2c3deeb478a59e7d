"""Your model, your data: a plain NNX module the library has never seen, trained through `deformjax.train.train` on
arrays no built-in dataset resembles, single-label, multi-label and under a task of its own; the one-line errors a
model or data that cannot train gets before the first step; the config fields that --help and the docs list."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax.data import ArraySource, DatasetSpec
from deformjax.train import ConfigError, base_config, cli, train
from deformjax.train.config import FIELDS, field_table, model_label
from tests.helpers import ROOT, assert_same_params, leaves, quiet

SHAPE, CLASSES = (30, 18, 2), 7  # no built-in dataset is 30x18 with 2 channels and 7 classes


class TinyNet(nnx.Module):
  """A user's model: conv, BatchNorm, dropout, a linear head; `__call__(x)` with no train keyword."""

  def __init__(self, in_features: int, num_outputs: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_features, 8, (3, 3), strides=(2, 2), rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(8, num_outputs, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.norm(self.conv(x)))
    return self.head(self.drop(x.mean(axis=(1, 2))))


def arrays(n: int, seed: int, multilabel: bool = False):
  """`(images [n, 30, 18, 2] uint8, labels)`: int labels in [0, 7), or multi-hot [n, 7] with 1-3 classes each."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n,) + SHAPE, dtype=np.uint8)
  if not multilabel:
    return images, rng.permutation(np.arange(n) % CLASSES)
  return images, (rng.random((n, CLASSES)) < 0.3).astype(np.float32)


def config(workdir=None, **overrides):
  cfg = base_config()
  cfg.steps, cfg.batch_size, cfg.eval_batch_size, cfg.log_every, cfg.progress = 4, 16, 32, 2, False
  cfg.num_devices, cfg.checkpoint_every = 2, 2
  cfg.train_augment.max_shift = 2.0  # augmentation of 2-channel images
  cfg.workdir = None if workdir is None else str(workdir)
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def model_fn(rngs: nnx.Rngs) -> TinyNet:
  return TinyNet(SHAPE[-1], CLASSES, rngs=rngs)


class Crash(Exception):
  """Stands for a run that dies between checkpoints."""


def crash_after(n: int):
  count = [0]

  def hook():
    count[0] += 1
    if count[0] == n:
      raise Crash

  return hook


def key_data(tree):
  """`tree` with its PRNG keys as their integer data (numpy cannot hold a key)."""
  is_key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def straight_and_resumed(tmp_path, sources, **overrides):
  """A 4-step run straight through, and the same run crashed after step 3 (checkpoint 2) and resumed (its
  sources as `ArraySource`s, the straight run's as the plain `(images, labels)` pairs)."""
  straight = train(config(**overrides), model=model_fn, sources=sources, echo=quiet)
  wrapped = tuple(ArraySource(*s) for s in sources)
  with pytest.raises(Crash):
    train(config(tmp_path, **overrides), model=model_fn, sources=wrapped, echo=quiet, on_step=crash_after(3))
  lines = []
  resumed = train(config(tmp_path, **overrides), model=model_fn, sources=wrapped, echo=lines.append)
  assert lines[0] == f"resumed from {tmp_path / 'checkpoints'} at step 2"
  return straight, resumed


def test_a_user_model_trains_on_30x18x2_arrays_with_7_classes_and_resumes(tmp_path):
  """Two seeds together, the train split on the devices: every parameter and BatchNorm statistic moves, each seed
  its own, and a crashed run resumes to the same parameters, statistics and metrics."""
  sources = arrays(96, 0), arrays(40, 1)
  straight, resumed = straight_and_resumed(tmp_path, sources, num_seeds=2)
  assert straight['trained'] == 'TinyNet' and straight['task'] == 'classification'
  assert straight['data_placement'] == 'device' and straight['seeds'] == [0, 1]
  for i in range(2):
    assert_same_params(leaves(resumed['params'], i), leaves(straight['params'], i))
    # BatchNorm statistics and the dropout stream's RNG count
    assert_same_params({**leaves(resumed['params'], i), **leaves(key_data(resumed['model_state']), i)},
                       {**leaves(straight['params'], i), **leaves(key_data(straight['model_state']), i)})
  assert resumed['eval'] == straight['eval']
  start = leaves(nnx.state(model_fn(nnx.Rngs(0)), nnx.Param))
  trained = leaves(straight['params'], 0)
  assert sorted(start) == sorted(trained) and all(not np.array_equal(start[k], trained[k]) for k in start)
  assert not np.array_equal(*(leaves(straight['params'], i)["['head']['kernel'].value"] for i in range(2)))
  ev = straight['eval'][0]['baseline']
  assert set(ev) == {'loss', 'accuracy'} and 0 <= ev['accuracy'] <= 1 and np.isfinite(ev['loss'])


# Host feeding of a user's data: test_feeding's prefetcher test reads it through feeding.host_batches; its
# checkpointed position is test_train's (host-fed resume, slow tier).
def test_a_user_model_trains_on_multilabel_targets_and_resumes(tmp_path):
  """Multi-hot [N, 7] labels, read as multi-label: the resumed run ends on the same parameters; evaluation reports
  per-class accuracy and mAP."""
  sources = arrays(96, 2, multilabel=True), arrays(40, 3, multilabel=True)
  straight, resumed = straight_and_resumed(tmp_path, sources, num_devices=1)
  assert straight['task'] == 'multilabel' and straight['data_placement'] == 'device'
  assert_same_params(leaves(resumed['params']), leaves(straight['params']))
  ev = straight['eval']['baseline']
  assert set(ev['per_class_accuracy']) == {str(k) for k in range(CLASSES)} == set(ev['average_precision'])
  assert ev['mAP'] == pytest.approx(np.nanmean(list(ev['average_precision'].values())))
  assert resumed['eval'] == straight['eval']


@dataclasses.dataclass(frozen=True)
class CentreTask:
  """A task of the test's own: regress where the brightest pixel is, from labels of two keys (one bool)."""

  name: str = 'centre'
  eval_outputs: bool = True
  summary_columns: tuple = (('loss', '{:.4f}'),)

  def describe(self, train, test, num_classes=0):
    return DatasetSpec('arrays', tuple(np.asarray(train[0]['image']).shape), 2)

  def label_layout(self, spec):
    return {'centre': jax.ShapeDtypeStruct((2,), jnp.float32), 'present': jax.ShapeDtypeStruct((), jnp.bool_)}

  def forward(self, model, batch, *, train, rngs):
    from deformjax.train.task import call_model

    return call_model(model, batch['image'], train=train, rngs=rngs)

  def check_outputs(self, outputs, spec):
    if outputs.shape[1:] != (2,):
      raise ValueError(f'model output {outputs.shape} does not fit centres (y, x)')

  def loss(self, outputs, batch, weights):
    w = weights * batch['present'].astype(jnp.float32)
    per_example = jnp.sum((outputs - batch['centre']) ** 2, axis=-1)
    return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0), {'loss': jnp.sum(per_example * w)}

  def evaluator(self, spec):
    return CentreEvaluator()


class CentreEvaluator:
  def __init__(self):
    self.sums, self.count, self.outputs = 0.0, 0, []

  def add(self, sums, count, outputs, batch):
    self.sums += float(sums['loss'])
    self.count += count
    assert outputs.shape == (count, 2) and batch['present'].dtype == bool and len(batch['centre']) == count
    self.outputs.append(outputs)

  def result(self):
    return {'loss': self.sums / self.count, 'examples': sum(len(o) for o in self.outputs)}


def test_a_task_of_its_own_plugs_into_the_loop():
  """The Task protocol with a dict of labels (float and bool): trained on the devices, evaluated with the outputs
  on the host, every test example seen once."""
  rng = np.random.default_rng(4)

  class Source:
    def __init__(self, n):
      self.images = rng.random((n,) + SHAPE).astype(np.float32)
      self.present = rng.random(n) < 0.8

    def __len__(self):
      return len(self.images)

    def __getitem__(self, i):
      flat = int(np.argmax(self.images[i, ..., 0]))
      return {'image': self.images[i], 'centre': np.array(divmod(flat, SHAPE[1]), np.float32) / SHAPE[:2],
              'present': self.present[i]}

  cfg = config(train_augment=base_config().train_augment, steps=2, num_devices=1)
  summary = train(cfg, model=lambda rngs: TinyNet(SHAPE[-1], 2, rngs=rngs), sources=(Source(64), Source(37)),
                  task=CentreTask(), echo=quiet)
  assert summary['task'] == 'centre' and summary['data_placement'] == 'device'
  assert summary['eval']['baseline']['examples'] == 37 and np.isfinite(summary['eval']['baseline']['loss'])
  assert all(np.isfinite(h['loss']) for h in summary['train_history'])


@pytest.mark.parametrize('model,labels,message', [
    (lambda rngs: TinyNet(2, 10, rngs=rngs), None,
     'model output [B, 10] does not fit labels with 7 classes: classification needs logits [B, 7]'),
    (lambda rngs: TinyNet(2, 10, rngs=rngs), 'multilabel',
     'model output [B, 10] does not fit multi-hot labels with 7 classes'),
    (lambda rngs: TinyNet(3, 7, rngs=rngs), None, 'model TinyNet cannot take images [B, 30, 18, 2] of the data: '),
])
def test_a_model_that_does_not_fit_the_data_fails_before_the_first_step_in_one_line(model, labels, message):
  sources = arrays(32, 0, labels == 'multilabel'), arrays(16, 1, labels == 'multilabel')
  with pytest.raises(ConfigError) as err:
    train(config(), model=model, sources=sources, echo=quiet, on_step=crash_after(1))
  assert str(err.value).startswith(message) and '\n' not in str(err.value), str(err.value)


@pytest.mark.parametrize('test,message', [
    (arrays(16, 1)[0][:, :16, :16], 'sources: test images [16, 16, 2] differ from train images [30, 18, 2]'),
    (np.zeros((16, 4), np.float32), 'sources: test images must be [H, W, C] (or [H, W]) each, got [4]'),
])
def test_data_that_cannot_train_is_one_line(test, message):
  from deformjax.data import DataError

  train_split = arrays(32, 0)
  with pytest.raises(DataError) as err:
    train(config(), model=model_fn, sources=(train_split, (test, np.zeros(16, np.int32))), echo=quiet)
  assert str(err.value).startswith(message) and '\n' not in str(err.value), str(err.value)


def test_a_built_module_trains_one_seed_and_refuses_several():
  with pytest.raises(ConfigError, match=r'config.num_seeds=2 needs a model per seed: pass model= a callable'):
    train(config(num_seeds=2), model=model_fn(nnx.Rngs(0)), sources=(arrays(32, 0), arrays(16, 1)), echo=quiet)


def test_help_lists_every_config_field_and_the_docs_table_is_the_same_table(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(['--help'])
  out = capsys.readouterr().out
  assert exit_.value.code == 0
  assert sorted(f.name for f in FIELDS) == sorted(base_config().keys())
  for f in FIELDS:
    assert re.search(rf'^  {f.name} +{re.escape(f.meaning)} \(default: ', out, re.M), f.name
  docs = (ROOT / 'docs' / 'training.md').read_text()
  table = re.search(r'<!-- config-fields -->\n(.*?)\n<!-- /config-fields -->', docs, re.S)
  assert table is not None and table.group(1) == field_table()


@pytest.mark.parametrize('overrides,label', [
    ({}, 'conv5 dcnv1 last 2'),
    ({'conv': 'dcnv3'}, 'conv5 dcnv3 last 2'),
    ({'deformable': 'none'}, 'conv5 regular'),
    ({'model': 'cifarnet', 'deformable': 'all', 'modulated': True}, 'cifarnet dcnv2 all'),
    ({'model': 'internimage'}, 'internimage micro'),
])
def test_the_progress_label_names_what_is_trained(overrides, label):
  cfg = base_config()
  for k, v in overrides.items():
    cfg[k] = v
  assert model_label(cfg) == label
