"""The classifiers' `conv=` switch over the deformable family, and its trainer plumbing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deformjax.models import CONVS, CifarNet, ConvClassifier, Residual, build_model, resolve_conv
from deformjax.nn import DCNv3, DCNv4, DeformConv


@pytest.mark.parametrize('conv, kind', [('dcnv1', DeformConv), ('dcnv2', DeformConv), ('dcnv3', DCNv3),
                                        ('dcnv4', DCNv4)])
def test_conv_picks_the_family_member_of_the_last_convs(conv, kind):
  model = ConvClassifier(1, 10, deformable=2, conv=conv, rngs=nnx.Rngs(0))
  layers = [c.block if isinstance(c, Residual) else c for c in model.convs]
  assert [isinstance(c, kind) for c in layers] == [False, False, False, True, True]
  if conv in ('dcnv1', 'dcnv2'):
    assert all(c.modulated == (conv == 'dcnv2') for c in layers[3:])
  assert model(jnp.zeros((2, 28, 28, 1), jnp.float32)).shape == (2, 10)


def test_todays_arguments_keep_their_meaning():
  assert resolve_conv(None, False) == 'dcnv1' and resolve_conv(None, True) == 'dcnv2'
  model = ConvClassifier(1, 10, deformable=1, modulated=True, rngs=nnx.Rngs(0))
  assert isinstance(model.convs[-1], DeformConv) and model.convs[-1].modulated


def test_conv_errors_name_the_choice():
  with pytest.raises(ValueError, match="conv must be one of 'dcnv1', 'dcnv2', 'dcnv3', 'dcnv4'"):
    resolve_conv('dcnv5', False)
  with pytest.raises(ValueError, match="modulated=True asks for DCNv2 but conv='dcnv3'"):
    resolve_conv('dcnv3', True)
  with pytest.raises(ValueError, match=r"conv='dcnv3' blocks keep the width .* 1->32 conv"):
    ConvClassifier(1, 10, deformable='all', conv='dcnv3', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="conv='dcnv4' blocks keep the width"):
    CifarNet(conv='dcnv4', deformable=1, rngs=nnx.Rngs(0))


def digits_batch(n=64):
  from deformjax.data.sources import digits_source

  source = digits_source('train')
  items = [source[i] for i in range(n)]
  images = np.stack([np.asarray(it['image'], np.float32) for it in items])
  labels = np.asarray([int(it['label']) for it in items], np.int32)
  if images.ndim == 3:
    images = images[..., None]
  return jnp.asarray(images), jnp.asarray(labels)


# dcnv2 is dcnv1 with a mask and dcnv3 is dcnv4's core with another offset layout: both train in the slow tier, as
# does dcnv1, which the fast tier trains in the 5-conv classifier's default config (test_train's small runs).
@pytest.mark.parametrize('conv', [c if c == 'dcnv4' else pytest.param(c, marks=pytest.mark.slow) for c in CONVS])
def test_each_variant_trains_under_jit(conv):
  """Twelve Adam steps on one batch of digits lower the loss of every variant below the untrained model's."""
  images, labels = digits_batch(32)
  model = ConvClassifier(1, 10, width=16, deformable=2, conv=conv, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(images), labels).mean()

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    with jax.numpy_dtype_promotion('standard'):  # optax's Adam mixes Python floats with its int32 count
      opt.update(m, grads)
    return loss

  first = float(step(model, optimizer))
  for _ in range(11):
    step(model, optimizer)
  after = float(nnx.jit(loss_fn)(model))
  assert np.isfinite(after) and after < first - 0.05, (conv, first, after)  # measured: 0.07-0.19 lower


def test_the_trainer_builds_the_configured_conv():
  from deformjax.data.sources import get_spec
  from deformjax.train.config import ConfigError, base_config, validate
  from deformjax.train.loop import model_factory

  cfg = base_config()
  cfg.conv = 'dcnv4'
  validate(cfg, 1)
  model = model_factory(cfg, get_spec('digits'))(0)
  assert isinstance(model.convs[-1], Residual) and isinstance(model.convs[-1].block, DCNv4)
  cfg.conv = 'dcnv9'
  with pytest.raises(ConfigError, match="config.conv must be one of"):
    validate(cfg, 1)


def test_family_blocks_in_a_classifier_start_as_identity_residuals():
  """A fresh DCNv4 adds zero: the classifier computes what its regular convs around the blocks compute."""
  model = ConvClassifier(1, 10, deformable=2, conv='dcnv4', rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 7, 7, 32)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(model.convs[3](x)), np.asarray(x))
  assert build_model('conv5', in_features=1, num_classes=10, image_size=28, deformable=2, modulated=False,
                     conv='dcnv3', rngs=nnx.Rngs(0)).convs[4].block.groups == 4



@pytest.mark.slow
def test_family_study_writes_table_json_and_plot(tmp_path):
  """experiments.family end to end on its runlocal config (6 steps, 2 seeds, 2 conditions, 4 variants)."""
  import json

  from experiments import family

  result = family.main(['--config', f'{family.DEFAULT_CONFIG}:runlocal', '--out', str(tmp_path)])
  saved = json.loads((tmp_path / 'family_digits_runlocal.json').read_text())
  variants = ('regular', 'dcnv1', 'dcnv4', 'internimage')
  assert {r['variant'] for r in saved['runs']} == set(variants)
  assert len(saved['runs']) == 4 * 2 * 2 and saved['parameters'] == result['parameters']
  assert all(0.0 <= r['accuracy'] <= 1.0 and r['seconds_per_step'] > 0 for r in saved['runs'])
  md = (tmp_path / 'family_digits_runlocal.md').read_text()
  for variant in variants:
    assert f'| {variant} |' in md
  assert (tmp_path / 'family_digits_runlocal.png').read_bytes()[:4] == b'\x89PNG'
