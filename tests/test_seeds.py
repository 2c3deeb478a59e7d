"""Seeds trained together (`config.num_seeds`): each seed's numbers equal a run of it alone."""

from __future__ import annotations

import shutil

import pytest

from deformjax.train import train
from deformjax.train.config import ConfigError
from tests.helpers import assert_same_params, count_compiles, leaves, quiet, records, small_config


def small(**overrides):
  """6 steps of batch 32 on one device, a second (rotated) test set."""
  cfg = small_config(**{'log_every': 3, 'eval_batch_size': 128, 'num_devices': 1, **overrides})
  cfg.eval_sets.rotated = {'max_rotation_deg': 30.0, 'max_shift': 0.0, 'scale_range': (1.0, 1.0)}
  return cfg


@pytest.fixture(scope='module')
def alone():
  return [train(small(seed=s), echo=quiet) for s in (3, 4)]


# The loop batching in the slow tier; test_train_internimage runs it fast (every seed's own batch statistics).
@pytest.mark.parametrize('batching', [pytest.param('loop', marks=pytest.mark.slow), 'vmap'])
def test_seeds_together_equal_each_seed_alone(alone, batching, tmp_path):
  both = train(small(seed=3, num_seeds=2, seed_batching=batching, workdir=str(tmp_path)), echo=quiet)
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
  lines = records(tmp_path / 'metrics.jsonl')
  assert [(r['step'], r['split'], r['seed']) for r in lines] == [
      (3, 'train', 3), (3, 'train', 4), (6, 'train', 3), (6, 'train', 4), (6, 'eval', 3), (6, 'eval', 4)]


def test_a_resumed_multi_seed_run_ends_where_an_uninterrupted_one_does(tmp_path):
  cfg = small(seed=0, num_seeds=2, checkpoint_every=3, workdir=str(tmp_path / 'run'), keep_checkpoints=3)
  whole = train(cfg, echo=quiet)
  shutil.rmtree(tmp_path / 'run' / 'checkpoints' / '6')  # as if killed between steps 3 and 6
  resumed = train(cfg, echo=quiet)
  assert_same_params(leaves(resumed['params']), leaves(whole['params']))
  assert resumed['eval'] == whole['eval']


def test_one_compile_serves_every_seed_and_transform():
  # Two conditions of a study: the same model, other seeds and transforms.
  cfg_a = small(seed=0, num_seeds=2, steps=2)
  cfg_b = small(seed=5, num_seeds=2, steps=2)
  cfg_b.train_augment.max_rotation_deg, cfg_b.eval_sets.rotated.max_rotation_deg = 0.0, 45.0
  with count_compiles() as first:
    a = train(cfg_a, echo=quiet)
  with count_compiles() as second:
    b = train(cfg_b, echo=quiet)
  assert first[0] >= 2  # the train and eval steps at least: the counter sees compiles
  assert second[0] == 0  # the second condition runs on the first one's programs, nothing recompiles
  assert b['seeds'] == [5, 6] and a['param_checksum'] != b['param_checksum']


# Slow tier: its two halves run fast, 8 devices against 1 (test_train) and seeds together against alone (above).
@pytest.mark.slow
def test_eight_devices_train_seeds_together_like_each_seed_alone(alone):
  # 8 devices batch the seeds (the example-major gather of all seeds' rows across devices); each seed alone runs
  # on 1 device: the two must still agree.
  eight = train(small(seed=3, num_seeds=2, seed_batching='vmap', num_devices=8), echo=quiet)
  assert eight['seeds'] == [3, 4] and eight['devices'] == 8
  assert next(iter(leaves(eight['params']).values())).shape[0] == 2
  for i, one in enumerate(alone):
    # Tolerances as test_train.test_eight_devices_match_one_device: gradient sums in another order.
    assert_same_params(leaves(eight['params'], i), leaves(one['params']), rtol=1e-4, atol=6e-5)
    assert eight['eval'][i]['baseline']['accuracy'] == pytest.approx(one['eval']['baseline']['accuracy'], abs=1e-9)


@pytest.mark.parametrize('field, value, message', [
    ('num_seeds', 0, 'config.num_seeds must be a positive int, got 0'),
    ('seed_batching', 'threads', "config.seed_batching must be 'auto', 'vmap' or 'loop', got 'threads'"),
])
def test_bad_seed_settings_are_named(field, value, message):
  cfg = small(**{field: value})
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    train(cfg, echo=quiet)


def test_host_fed_data_cannot_train_several_seeds():
  with pytest.raises(ConfigError, match="num_seeds=2 trains from the train split on the devices"):
    train(small(num_seeds=2, data_placement='host'), echo=quiet)
