"""Seeds trained together (`config.num_seeds`): each seed's numbers equal a run of it alone."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from deformjax.train import base_config, train
from deformjax.train.config import ConfigError
from tests.test_train import SMALL, assert_same_params, params_of, summary_of


def small(**overrides):
  cfg = base_config()
  cfg.steps, cfg.batch_size, cfg.log_every, cfg.progress, cfg.eval_batch_size = 6, 32, 3, False, 128
  cfg.train_augment.max_rotation_deg, cfg.train_augment.max_shift = 30.0, 2.0
  cfg.eval_sets.rotated = {'max_rotation_deg': 30.0, 'max_shift': 0.0, 'scale_range': (1.0, 1.0)}
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def leaves(params, seed_index=None):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(k): np.asarray(v if seed_index is None else v[seed_index]) for k, v in flat}


@pytest.fixture(scope='module')
def alone():
  return [train(small(seed=s), echo=lambda *_: None) for s in (3, 4)]


@pytest.mark.parametrize('batching', ['loop', 'vmap'])
def test_seeds_together_equal_each_seed_alone(alone, batching, tmp_path):
  both = train(small(seed=3, num_seeds=2, seed_batching=batching, workdir=str(tmp_path)), echo=lambda *_: None)
  assert both['seeds'] == [3, 4]
  for i, one in enumerate(alone):
    # Inside one program XLA fuses and orders sums differently from the single
    # run ('vmap' batches the convolutions too): float32 rounding, which Adam
    # magnifies for near-zero gradients (see test_train). 6 steps of lr 1e-3 move
    # a parameter by up to 6e-3; the runs agree to 0.2 % of that.
    assert_same_params(leaves(both['params'], i), leaves(one['params']), rtol=1e-4, atol=1e-5)
    for name in ('baseline', 'rotated'):
      assert both['eval'][i][name]['accuracy'] == pytest.approx(one['eval'][name]['accuracy'], abs=1e-9)
      assert both['eval'][i][name]['loss'] == pytest.approx(one['eval'][name]['loss'], rel=1e-5)
    assert both['train'][i]['loss'] == pytest.approx(one['train']['loss'], rel=1e-5)
    assert both['param_checksum'][i] == pytest.approx(one['param_checksum'], rel=1e-5)
  lines = [json.loads(x) for x in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['split'], r['seed']) for r in lines] == [
      (3, 'train', 3), (3, 'train', 4), (6, 'train', 3), (6, 'train', 4), (6, 'eval', 3), (6, 'eval', 4)]


def test_a_resumed_multi_seed_run_ends_where_an_uninterrupted_one_does(tmp_path):
  cfg = small(seed=0, num_seeds=2, checkpoint_every=3, workdir=str(tmp_path / 'run'), keep_checkpoints=3)
  whole = train(cfg, echo=lambda *_: None)
  shutil.rmtree(tmp_path / 'run' / 'checkpoints' / '6')  # as if killed between steps 3 and 6
  resumed = train(cfg, echo=lambda *_: None)
  assert_same_params(leaves(resumed['params']), leaves(whole['params']))
  assert resumed['eval'] == whole['eval']


def test_one_compile_serves_every_seed_and_transform():
  # Two conditions of a study: the same model, other seeds and transforms.
  cfg_a = small(seed=0, num_seeds=2, steps=2)
  cfg_b = small(seed=5, num_seeds=2, steps=2)
  cfg_b.train_augment.max_rotation_deg, cfg_b.eval_sets.rotated.max_rotation_deg = 0.0, 45.0
  from deformjax.data import get_spec
  from deformjax.train import mesh as mesh_lib
  from deformjax.train.loop import model_factory
  from deformjax.train.steps import make_trainer

  spec, mesh = get_spec('digits'), mesh_lib.data_mesh()
  trainer = make_trainer(model_factory(cfg_a, spec), cfg_a, spec, mesh, 44, 2, num_seeds=2)
  sizes = lambda: [f._cache_size() for f in trainer.compiled]
  before = sizes()
  train(cfg_a, echo=lambda *_: None)
  train(cfg_b, echo=lambda *_: None)
  assert make_trainer(model_factory(cfg_b, spec), cfg_b, spec, mesh, 44, 2, num_seeds=2).compiled == trainer.compiled
  train_step, resident_step, eval_step = (after - b for after, b in zip(sizes(), before))
  assert (train_step, resident_step, eval_step) == (0, 1, 1)


def test_eight_devices_train_seeds_together_like_one(tmp_path):
  # 8 devices batch the seeds (the example-major gather of all seeds' rows across
  # devices); 1 device loops over them: the two must still agree.
  args = [*SMALL, '--config.num_seeds=2']
  one = summary_of([*args, '--config.seed_batching=loop'], tmp_path, 'one', {'JAX_NUM_CPU_DEVICES': '1'})
  eight = summary_of([*args, '--config.seed_batching=vmap'], tmp_path, 'eight', {'JAX_NUM_CPU_DEVICES': '8'})
  assert one['seeds'] == eight['seeds'] == [0, 1] and eight['devices'] == 8
  # Tolerances as test_train.test_eight_devices_match_one_device: gradient sums in another order.
  assert_same_params(eight['params'], one['params'], rtol=1e-4, atol=6e-5)
  assert params_of(tmp_path / 'eight.npz')[next(iter(eight['params']))].shape[0] == 2
  for a, b in zip(eight['eval'], one['eval']):
    assert a['baseline']['accuracy'] == pytest.approx(b['baseline']['accuracy'], abs=1e-9)


@pytest.mark.parametrize('field, value, message', [
    ('num_seeds', 0, 'config.num_seeds must be a positive int, got 0'),
    ('seed_batching', 'threads', "config.seed_batching must be 'auto', 'vmap' or 'loop', got 'threads'"),
])
def test_bad_seed_settings_are_named(field, value, message):
  cfg = small(**{field: value})
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    train(cfg, echo=lambda *_: None)


def test_host_fed_data_cannot_train_several_seeds():
  with pytest.raises(ConfigError, match="num_seeds=2 trains from the train split on the devices"):
    train(small(num_seeds=2, data_placement='host'), echo=lambda *_: None)
