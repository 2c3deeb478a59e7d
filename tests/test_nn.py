"""NNX DeformConv / DeformRoIPool and their Linen twins."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax import nn as dnn
from deformjax.nn import linen as dlinen
from deformjax.ops import deform_conv2d, deform_roi_pool, roi_align


def normal(shape, seed=0, dtype=jnp.float64, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)


CONV_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=(3, 2), strides=2, padding=1),
    dict(kernel_size=3, kernel_dilation=2, padding='VALID'),
    dict(kernel_size=3, feature_group_count=2, offset_groups=2, modulated=False),
    dict(kernel_size=(1, 3), strides=(1, 2), padding=((0, 1), (1, 1)), use_bias=False),
]


@pytest.mark.parametrize('kw', CONV_CASES, ids=str)
def test_fresh_deform_conv_equals_nnx_conv(kw):
  layer = dnn.DeformConv(4, 6, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kw)
  conv_kw = {k: v for k, v in kw.items() if k not in ('offset_groups', 'modulated')}
  k = conv_kw['kernel_size']
  conv_kw['kernel_size'] = (k, k) if isinstance(k, int) else k  # nnx.Conv reads an int as a 1-D kernel
  conv = nnx.Conv(4, 6, param_dtype=jnp.float64, rngs=nnx.Rngs(1), **conv_kw)
  conv.kernel[...] = layer.kernel[...]
  if layer.bias is not None:
    conv.bias[...] = normal((6,), 3)
    layer.bias[...] = conv.bias[...]
  x = normal((2, 9, 8, 4))
  y, (offsets, mask) = layer(x, return_sampling=True)
  np.testing.assert_allclose(np.asarray(y), np.asarray(conv(x)), atol=1e-10)
  np.testing.assert_array_equal(np.asarray(offsets), 0)
  if layer.modulated:
    np.testing.assert_array_equal(np.asarray(mask), 1)
  else:
    assert mask is None


def randomise_offset_predictor(layer, scale=0.3):
  layer.offset_conv.kernel[...] = normal(layer.offset_conv.kernel.shape, 5, layer.offset_conv.kernel.dtype, scale)
  layer.offset_conv.bias[...] = normal(layer.offset_conv.bias.shape, 6, layer.offset_conv.bias.dtype, scale)


def test_offsets_are_predicted_and_sown():
  layer = dnn.DeformConv(3, 5, 3, sow_offsets=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  randomise_offset_predictor(layer)
  x = normal((2, 8, 8, 3))
  (y, sampling), sown = nnx.capture(lambda m, x: m(x, return_sampling=True), nnx.Intermediate)(layer, x)
  offsets, mask = sampling.offsets, sampling.mask
  assert isinstance(sampling, dnn.Sampling) and set(sampling._fields) == set(sown)  # sown under the fields' names
  assert offsets.shape == (2, 8, 8, 18) and mask.shape == (2, 8, 8, 9)
  assert np.abs(np.asarray(offsets)).max() > 0.1
  assert np.all((np.asarray(mask) > 0) & (np.asarray(mask) < 2))
  np.testing.assert_allclose(np.asarray(y), np.asarray(deform_conv2d(x, offsets, layer.kernel[...], mask,
                                                                      layer.bias[...], padding='SAME')), atol=1e-12)
  np.testing.assert_array_equal(np.asarray(sown['offsets'][0]), np.asarray(offsets))
  np.testing.assert_array_equal(np.asarray(sown['mask'][0]), np.asarray(mask))


def test_external_offsets_and_no_predictor():
  layer = dnn.DeformConv(3, 5, 3, predict_offsets=False, padding=1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  assert layer.offset_conv is None
  x, off, m = normal((2, 8, 8, 3)), normal((2, 8, 8, 18), 1), normal((2, 8, 8, 9), 2)
  np.testing.assert_allclose(np.asarray(layer(x, off, m)),
                             np.asarray(deform_conv2d(x, off, layer.kernel[...], m, layer.bias[...], padding=1)))
  with pytest.raises(ValueError, match='offsets are required'):
    layer(x)


def test_offset_scale_and_max_offset():
  base = dnn.DeformConv(3, 5, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  randomise_offset_predictor(base, scale=3.0)
  x = normal((1, 8, 8, 3))
  raw = base(x, return_sampling=True)[1].offsets
  for kw in (dict(offset_scale=0.5), dict(max_offset=1.5)):
    layer = dnn.DeformConv(3, 5, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kw)
    nnx.update(layer, nnx.state(base, nnx.Param))
    off = layer(x, return_sampling=True)[1].offsets
    if 'offset_scale' in kw:
      np.testing.assert_allclose(np.asarray(off), 0.5 * np.asarray(raw), atol=1e-12)
    else:
      assert np.abs(np.asarray(off)).max() <= 1.5 < np.abs(np.asarray(raw)).max()
      np.testing.assert_allclose(np.asarray(off), 1.5 * np.tanh(np.asarray(raw) / 1.5), atol=1e-12)


def test_gradient_reaches_the_zero_initialised_offset_predictor():
  """At zero init the predictor's bias gradient is the chain rule through the op: the op's offset gradient summed
  over batch and pixels (offset_scale 1) and half its mask gradient (2*sigmoid has slope 1/2 at 0); the kernel's
  is the op's kernel gradient."""
  layer = dnn.DeformConv(3, 4, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  x = normal((2, 8, 8, 3))
  grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(layer)
  op_loss = lambda o, mk, w: jnp.sum(jnp.sin(deform_conv2d(x, o, w, mk, layer.bias[...], padding=1)))
  g_off, g_mask, g_kernel = jax.grad(op_loss, argnums=(0, 1, 2))(
      jnp.zeros((2, 8, 8, 18)), jnp.ones((2, 8, 8, 9)), layer.kernel[...])
  assert float(jnp.abs(g_off).max()) > 1e-3 and float(jnp.abs(g_mask).max()) > 1e-3  # a non-trivial equality
  want_bias = np.concatenate([np.asarray(g_off).sum((0, 1, 2)), 0.5 * np.asarray(g_mask).sum((0, 1, 2))])
  np.testing.assert_allclose(np.asarray(grads.offset_conv.bias[...]), want_bias, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(np.asarray(grads.kernel[...]), np.asarray(g_kernel), rtol=1e-10, atol=1e-12)


def test_nnx_jit_split_merge_and_batch_dims():
  layer = dnn.DeformConv(3, 4, 3, rngs=nnx.Rngs(0))
  randomise_offset_predictor(layer)
  x = normal((2, 3, 8, 8, 3), dtype=jnp.float32)
  eager = layer(x)
  assert eager.shape == (2, 3, 8, 8, 4)
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(layer, x)), np.asarray(eager), rtol=1e-5,
                             atol=1e-5)
  graphdef, state = nnx.split(layer)
  np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, state)(x)), np.asarray(eager), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(layer(x[0, 0])), np.asarray(eager[0, 0]), rtol=1e-5, atol=1e-5)


def test_bf16_compute_with_float32_params():
  layer = dnn.DeformConv(8, 8, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  ref = dnn.DeformConv(8, 8, 3, rngs=nnx.Rngs(0))
  randomise_offset_predictor(layer, 0.05)
  nnx.update(ref, nnx.state(layer, nnx.Param))
  x = normal((2, 8, 8, 8), dtype=jnp.float32)
  y = layer(x)
  assert y.dtype == jnp.bfloat16 and layer.kernel[...].dtype == jnp.float32
  want = ref(x)
  assert float(jnp.abs(y.astype(jnp.float32) - want).max() / jnp.abs(want).max()) < 3e-2
  grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32)))(layer)
  assert grads.kernel[...].dtype == jnp.float32


def test_wrong_in_features_is_a_clear_error():
  layer = dnn.DeformConv(3, 4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'inputs must have shape \[\.\.\., H, W, in_features=3\], got \(1, 8, 8, 5\)'):
    layer(jnp.ones((1, 8, 8, 5)))
  with pytest.raises(ValueError, match='divisible by feature_group_count=2'):
    dnn.DeformConv(3, 4, 3, feature_group_count=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('bad, message', [
    (dict(feature_group_count=3), 'in_features=4 and out_features=6 must be divisible by feature_group_count=3'),
    (dict(offset_groups=3), 'in_features=4 must be divisible by offset_groups=3'),
    (dict(max_offset=0.0), 'max_offset must be positive or None, got 0.0'),
    (dict(max_offset=float('nan')), 'max_offset must be positive or None, got nan'),
    (dict(max_offset='2'), "max_offset must be positive or None, got '2'"),
], ids=str)
def test_module_and_linen_twin_refuse_the_same_arguments_alike(bad, message):
  """One check serves both: the NNX module when built, the twin at init (where it learns the input width)."""
  with pytest.raises(ValueError, match=f'^DeformConv: {re.escape(message)}'):
    dnn.DeformConv(4, 6, 3, rngs=nnx.Rngs(0), **bad)
  with pytest.raises(ValueError, match=f'^DeformConv: {re.escape(message)}'):
    dlinen.DeformConv(features=6, kernel_size=3, **bad).init(jax.random.key(0), jnp.ones((1, 8, 8, 4)))


@pytest.mark.parametrize('kw', CONV_CASES, ids=str)
def test_linen_twin_matches_nnx(kw):
  layer = dnn.DeformConv(4, 6, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kw)
  randomise_offset_predictor(layer)
  twin = dlinen.DeformConv(features=6, param_dtype=jnp.float64, **kw)
  x = normal((2, 9, 8, 4))
  params = twin.init(jax.random.key(0), x)['params']
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, {k: v for k, v in dict(kernel=layer.kernel[...], bias=layer.bias[...] if layer.bias is not None else None,
                                          offset_conv=dict(kernel=layer.offset_conv.kernel[...],
                                                           bias=layer.offset_conv.bias[...])).items() if v is not None})
  params = dict(kernel=layer.kernel[...], offset_conv=dict(kernel=layer.offset_conv.kernel[...],
                                                           bias=layer.offset_conv.bias[...]))
  if layer.bias is not None:
    params['bias'] = layer.bias[...]
  got = jax.jit(lambda p, x: twin.apply({'params': p}, x))(params, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(layer(x)), atol=1e-12)
  _, state = twin.apply({'params': params}, x, mutable=['intermediates'])
  assert state == {}  # nothing sown unless asked


def test_linen_sow_and_external_offsets():
  twin = dlinen.DeformConv(features=3, kernel_size=3, sow_offsets=True)
  x = normal((1, 6, 6, 2), dtype=jnp.float32)
  variables = twin.init(jax.random.key(0), x)
  y, state = twin.apply(variables, x, mutable=['intermediates'])
  assert state['intermediates']['offsets'][0].shape == (1, 6, 6, 18)
  off = normal((1, 6, 6, 18), 1, jnp.float32)
  np.testing.assert_allclose(np.asarray(twin.apply(variables, x, off)),
                             np.asarray(deform_conv2d(x, off, variables['params']['kernel'], None,
                                                      variables['params']['bias'], padding='SAME')), rtol=1e-5,
                             atol=1e-5)


FEATS_SHAPE = (2, 16, 12, 4)
ROIS = jnp.asarray([[0, 1.0, 2.0, 9.0, 13.0], [1, 3.5, 0.5, 11.0, 7.0], [1, 0.0, 0.0, 12.0, 16.0]])


@pytest.mark.parametrize('modulated', [False, True])
def test_fresh_deform_roi_pool_equals_roi_align(modulated):
  pool = dnn.DeformRoIPool(4, 3, hidden_features=(16, 16), modulated=modulated, param_dtype=jnp.float64,
                           rngs=nnx.Rngs(0))
  feats = normal(FEATS_SHAPE)
  out, (offsets, mask) = pool(feats, ROIS, return_sampling=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(roi_align(feats, ROIS, output_size=3)), atol=1e-12)
  np.testing.assert_array_equal(np.asarray(offsets), 0)
  assert (mask is None) != modulated
  # The zero-initialised offset head learns: its bias gradient is the op's offset gradient at zero offsets (the
  # fresh mask is 1 everywhere, so it passes the cotangent through unchanged).
  grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(feats, ROIS))))(pool)
  g_off = jax.grad(lambda o: jnp.sum(jnp.sin(deform_roi_pool(feats, ROIS, o, output_size=3, gamma=0.1))))(
      jnp.zeros((3, 3, 3, 2)))
  assert float(jnp.abs(g_off).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(grads.offset_out.bias[...]), np.asarray(g_off).sum(0).reshape(-1),
                             rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('modulated', [False, True])
def test_deform_roi_pool_linen_twin_matches(modulated):
  pool = dnn.DeformRoIPool(4, (3, 2), hidden_features=(16, 8), modulated=modulated, gamma=0.2,
                           param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  pool.offset_out.kernel[...] = normal(pool.offset_out.kernel.shape, 3, scale=0.5)
  if modulated:
    pool.mask_out.kernel[...] = normal(pool.mask_out.kernel.shape, 4, scale=0.5)
  feats = normal(FEATS_SHAPE)
  twin = dlinen.DeformRoIPool((3, 2), hidden_features=(16, 8), modulated=modulated, gamma=0.2,
                              param_dtype=jnp.float64)
  params = twin.init(jax.random.key(0), feats, ROIS)['params']
  dense = lambda l: dict(kernel=l.kernel[...], bias=l.bias[...])
  mine = {f'offset_hidden_{i}': dense(l) for i, l in enumerate(pool.offset_hidden)}
  mine['offset_out'] = dense(pool.offset_out)
  if modulated:
    mine.update(mask_hidden=dense(pool.mask_hidden), mask_out=dense(pool.mask_out))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, mine)
  got = twin.apply({'params': mine}, feats, ROIS)
  want = pool(feats, ROIS)
  assert float(jnp.abs(want - roi_align(feats, ROIS, output_size=(3, 2))).max()) > 1e-3  # offsets do act
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12)


def test_offset_groups_are_inferred_from_the_offsets_passed_in():
  """torchvision's DeformConv2d reads the offset groups off the offsets; so does a DeformConv without a predictor."""
  layer = dnn.DeformConv(4, 6, 3, predict_offsets=False, offset_groups=None, param_dtype=jnp.float64,
                         rngs=nnx.Rngs(0))
  x, off = normal((1, 5, 5, 4)), normal((1, 5, 5, 2 * 9 * 2))
  want = deform_conv2d(x, off, layer.kernel[...], None, layer.bias[...], padding='SAME', offset_groups=2)
  np.testing.assert_allclose(np.asarray(layer(x, off)), np.asarray(want), atol=1e-12)
  with pytest.raises(ValueError, match=r'offset_groups=None .* needs predict_offsets=False'):
    dnn.DeformConv(4, 6, 3, offset_groups=None, rngs=nnx.Rngs(0))


def test_deform_conv_takes_a_numpy_integer_padding_as_an_int():
  x = np.ones((1, 6, 6, 4), np.float32)
  by_numpy = dnn.DeformConv(4, 4, 3, padding=np.int64(1), rngs=nnx.Rngs(0))
  by_int = dnn.DeformConv(4, 4, 3, padding=1, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(by_numpy(x), by_int(x))


def test_an_input_smaller_than_the_kernel_is_named_once_by_the_layer_or_its_op():
  """The layer names it where its offset predictor would run first; given the offsets, the op checks the window."""
  x, off = jnp.ones((1, 5, 5, 4), jnp.float32), jnp.zeros((1, 1, 1, 98), jnp.float32)
  message = r'padded input H = 5\+0\+0 is smaller than the dilated kernel \(7\)'
  with pytest.raises(ValueError, match='^DeformConv: ' + message):
    dnn.DeformConv(4, 6, 7, padding='VALID', rngs=nnx.Rngs(0))(x)
  layer = dnn.DeformConv(4, 6, 7, padding='VALID', predict_offsets=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='^deform_conv2d: ' + message):
    layer(x, off)
  with pytest.raises(ValueError, match='^deform_conv2d: ' + message):
    dlinen.DeformConv(6, 7, padding='VALID', predict_offsets=False).init(jax.random.key(0), x, off)
