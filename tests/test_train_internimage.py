"""The trainer on models with variables besides their parameters: the InternImage classifiers' BatchNorm statistics.

The statistics ride in the train state as 'model_state': updated by every train step, read unchanged by evaluation,
saved and restored with the checkpoints, one copy per seed. The fast tier proves that on a one-conv network with a
BatchNorm (it compiles in a second); the InternImage models themselves, whose train step alone takes some 15 s of
CPU to compile, train in the slow tier.
"""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax.data.sources import get_spec
from deformjax.models import build_model
from deformjax.train import ConfigError, evaluate, loop, train, validate
from deformjax.train.mesh import data_mesh, replicated
from deformjax.train.steps import make_trainer
from tests.helpers import DIGITS_CONFIG, assert_same_params, leaves, quiet, small_config, tiny_digits


class BatchNormNet(nnx.Module):
  """conv 3x3 stride 2 -> BatchNorm -> ReLU -> global mean -> linear: the smallest model with BatchNorm statistics."""

  def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
    # No conv bias: the BatchNorm cancels it, and its gradient is rounding noise that Adam would amplify.
    self.conv = nnx.Conv(in_features, 4, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(4, num_classes, rngs=rngs)

  def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
    del rngs
    x = jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))
    return self.head(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


def batchnorm_factory(cfg, spec):
  return lambda seed: BatchNormNet(spec.image_shape[-1], spec.num_classes, rngs=nnx.Rngs(seed))


@pytest.fixture
def batchnorm_model(monkeypatch):
  monkeypatch.setattr(loop, 'model_factory', batchnorm_factory)


def initial_model_state(seed: int = 0) -> nnx.State:
  spec = get_spec('digits')
  return nnx.split(batchnorm_factory(None, spec)(seed), nnx.Param, ...)[2]


def test_build_model_and_the_config_take_the_internimage_models():
  for name, core in (('internimage', 'DCNv3'), ('flash_internimage', 'DCNv4')):
    model = nnx.eval_shape(lambda name=name: build_model(name, in_features=1, num_classes=10, image_size=28,
                                                         deformable='2', modulated=False, rngs=nnx.Rngs(0)))
    assert type(model.levels[0].blocks[0].dcn).__name__ == core
    assert model.head.kernel.shape == (192, 10) and model.patch_embed.conv1.in_features == 1
    validate(small_config(model=name), 1)  # the default deformable='2' does not apply and is not refused
    validate(small_config(model=name, preset='T'), 1)
    with pytest.raises(ConfigError, match=r"config\.preset must be one of 't', 's', 'b', 'micro' .* got 'xl'"):
      validate(small_config(model=name, preset='xl'), 1)
    with pytest.raises(ConfigError, match=rf"config\.conv='dcnv3' does not apply to model '{name}'.*{core}"):
      validate(small_config(model=name, conv='dcnv3'), 1)
    with pytest.raises(ConfigError, match=r'config\.dropout=0\.2 does not apply'):
      validate(small_config(model=name, dropout=0.2), 1)
    with pytest.raises(ValueError, match=r"^conv='dcnv1' does not apply"):
      build_model(name, in_features=1, num_classes=10, image_size=28, deformable='none', modulated=False,
                  conv='dcnv1', rngs=nnx.Rngs(0))


def test_batchnorm_statistics_train_evaluate_checkpoint_and_resume(tmp_path, batchnorm_model):
  sources = tiny_digits(96, 64)
  cfg = small_config(steps=4, batch_size=16, num_devices=1, checkpoint_every=2, keep_checkpoints=3,
                     workdir=str(tmp_path / 'run'))
  whole = train(cfg, echo=quiet, sources=sources)
  start, stats = leaves(initial_model_state()), leaves(whole['model_state'])
  assert sorted(stats) == sorted(start) and len(stats) == 2  # the BatchNorm's mean and var, nothing else
  for key, value in stats.items():
    assert np.all(np.isfinite(value)) and np.abs(value - start[key]).min() > 0, key  # every statistic moved
  assert np.isfinite(whole['train']['loss'])

  shutil.rmtree(tmp_path / 'run' / 'checkpoints' / '4')  # as if killed between steps 2 and 4
  resumed = train(cfg, echo=quiet, sources=sources)
  assert_same_params(leaves(resumed['params']), leaves(whole['params']))
  np.testing.assert_equal(leaves(resumed['model_state']), stats)  # the statistics came back from checkpoint 2
  assert resumed['eval'] == whole['eval']

  # Evaluation runs on the running statistics it is given: the trained ones reproduce the run's result, the initial
  # ones do not, and a model that has them cannot be evaluated without them.
  spec, mesh = get_spec('digits'), data_mesh(1)
  trainer = make_trainer(batchnorm_factory(cfg, spec), cfg, spec, mesh, 6, 4)
  params = jax.device_put(whole['params'], replicated(mesh))
  assert evaluate(trainer, params, sources[1], spec, cfg, mesh, model_state=whole['model_state']) == whole['eval']
  fresh = evaluate(trainer, params, sources[1], spec, cfg, mesh,
                   model_state=jax.device_put(initial_model_state(), replicated(mesh)))
  assert fresh['baseline']['loss'] != whole['eval']['baseline']['loss']
  with pytest.raises(ValueError, match="pass the train state's 'model_state'"):
    evaluate(trainer, params, sources[1], spec, cfg, mesh)


@pytest.mark.parametrize('batching', ['loop', 'vmap'])
def test_every_seed_carries_its_own_batchnorm_statistics(batching, batchnorm_model):
  sources = tiny_digits(96, 64)
  kw = dict(steps=3, batch_size=16, num_devices=1, data_placement='device')
  both = train(small_config(seed=3, num_seeds=2, seed_batching=batching, **kw), echo=quiet, sources=sources)
  for i, seed in enumerate((3, 4)):
    one = train(small_config(seed=seed, **kw), echo=quiet, sources=sources)
    assert_same_params(leaves(both['params'], i), leaves(one['params']), rtol=1e-4, atol=1e-5)
    got, want = leaves(both['model_state'], i), leaves(one['model_state'])
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert both['eval'][i]['baseline']['accuracy'] == pytest.approx(one['eval']['baseline']['accuracy'], abs=0.02)


@pytest.mark.slow
def test_micro_internimage_trains_and_resumes_to_the_same_state(tmp_path):
  sources = tiny_digits(32, 32)
  cfg = small_config(model='internimage', steps=2, batch_size=8, eval_batch_size=32, num_devices=1,
                     checkpoint_every=1, keep_checkpoints=3, workdir=str(tmp_path / 'run'))
  whole = train(cfg, echo=quiet, sources=sources)
  spec = get_spec('digits')
  _, params0, stats0 = nnx.split(loop.model_factory(cfg, spec)(cfg.seed), nnx.Param, ...)
  start, trained = leaves(params0), leaves(whole['params'])
  assert sorted(trained) == sorted(start)
  unchanged = [k for k in start if np.array_equal(trained[k], start[k])]
  assert not unchanged, f'parameters that did not train: {unchanged}'
  start_stats, stats = leaves(stats0), leaves(whole['model_state'])
  assert len(stats) == 2 and all(np.abs(stats[k] - start_stats[k]).min() > 0 for k in stats)
  assert all(np.isfinite(h['loss']) for h in whole['train_history'])
  assert np.isfinite(whole['eval']['baseline']['loss'])

  shutil.rmtree(tmp_path / 'run' / 'checkpoints' / '2')
  resumed = train(cfg, echo=quiet, sources=sources)
  assert_same_params(leaves(resumed['params']), trained)
  np.testing.assert_equal(leaves(resumed['model_state']), stats)
  assert resumed['eval'] == whole['eval']


@pytest.mark.slow
def test_flash_internimage_trains_its_parameters_and_statistics():
  cfg = small_config(model='flash_internimage', steps=2, batch_size=8, eval_batch_size=32, num_devices=1)
  summary = train(cfg, echo=quiet, sources=tiny_digits(32, 32))
  _, params0, stats0 = nnx.split(loop.model_factory(cfg, get_spec('digits'))(cfg.seed), nnx.Param, ...)
  start, trained = leaves(params0), leaves(summary['params'])
  moved = sum(not np.array_equal(trained[k], start[k]) for k in start)
  assert moved > len(start) // 2  # a fresh DCNv4 outputs zero, so some of its inputs see no gradient at step 1
  start_stats = leaves(stats0)
  assert all(np.abs(v - start_stats[k]).min() > 0 for k, v in leaves(summary['model_state']).items())
  assert all(np.isfinite(h['loss']) for h in summary['train_history'])


@pytest.mark.slow
def test_the_command_line_trains_internimage(tmp_path):
  from deformjax.train.cli import main

  summary = main([f'--config={DIGITS_CONFIG}', '--config.model=internimage', '--config.preset=micro',
                  '--config.steps=1', '--config.batch_size=8', '--config.eval_batch_size=120',
                  '--config.progress=False', '--config.num_devices=1', f'--config.workdir={tmp_path}',
                  f'--summary_json={tmp_path / "summary.json"}'])
  assert summary['config']['model'] == 'internimage' and summary['steps'] == 1
  assert np.isfinite(summary['eval']['baseline']['loss'])
  assert (tmp_path / 'summary.json').exists()
