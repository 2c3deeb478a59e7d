"""DeformConv as a drop-in for nnx.Conv / nn.Conv: signature, padding modes, metadata, RNG stream."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from deformjax import nn as dnn
from deformjax.nn import linen as dlinen
from deformjax.nn._common import split_prediction


def normal(shape, seed=0, dtype=jnp.float32, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)


@pytest.mark.parametrize('strides', [2, (2, 1), None, np.array([2, 2])], ids=str)
def test_strides_positional_and_in_every_form_nnx_conv_accepts(strides):
  layer = dnn.DeformConv(4, 6, (3, 3), strides, rngs=nnx.Rngs(0))
  conv = nnx.Conv(4, 6, (3, 3), strides, rngs=nnx.Rngs(0))
  x = normal((2, 9, 8, 4))
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('padding', ['CIRCULAR', 'REFLECT'])
@pytest.mark.parametrize('geometry', [dict(kernel_size=(3, 3)), dict(kernel_size=(3, 2), kernel_dilation=2),
                                      dict(kernel_size=(2, 3), strides=2)], ids=str)
def test_padding_modes_equal_nnx_conv_at_zero_offsets(padding, geometry):
  layer = dnn.DeformConv(4, 6, padding=padding, precision='highest', rngs=nnx.Rngs(0), **geometry)
  conv = nnx.Conv(4, 6, padding=padding, precision='highest', rngs=nnx.Rngs(0), **geometry)
  x = normal((2, 9, 8, 4))
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(conv(x)), rtol=1e-5, atol=1e-5)
  twin = dlinen.DeformConv(6, padding=padding, precision='highest', **geometry)
  params = twin.init(jax.random.key(0), x)
  ref = nn.Conv(6, padding=padding, precision='highest', **geometry)
  ref_params = {'params': {k: params['params'][k] for k in ('kernel', 'bias')}}
  np.testing.assert_allclose(np.asarray(twin.apply(params, x)), np.asarray(ref.apply(ref_params, x)),
                             rtol=1e-5, atol=1e-5)


def test_circular_padding_lets_offsets_reach_the_wrapped_border():
  """A tap shifted by one pixel past the left edge reads the wrapped right-hand column, not zero."""
  x = normal((1, 5, 5, 1))
  layer = dnn.DeformConv(1, 1, 3, padding='CIRCULAR', use_bias=False, predict_offsets=False, rngs=nnx.Rngs(0))
  layer.kernel[...] = jnp.zeros((3, 3, 1, 1), jnp.float32).at[1, 1].set(1.0)  # centre tap only
  off = jnp.zeros((1, 5, 5, 18), jnp.float32).at[..., 4 * 2 + 1].set(-1.0)  # centre tap, dx = -1
  y = layer(x, off)
  np.testing.assert_allclose(np.asarray(y[0, :, :, 0]), np.asarray(jnp.roll(x[0, :, :, 0], 1, axis=1)), rtol=1e-6)


def test_kernel_mask_preferred_element_type_and_promote_dtype():
  kmask = jnp.asarray(np.random.default_rng(1).integers(0, 2, size=(3, 3, 4, 6)), jnp.float32)
  calls = []

  def promote(args, dtype=None):
    calls.append(dtype)
    return nnx.nn.dtypes.promote_dtype(args, dtype=dtype)

  layer = dnn.DeformConv(4, 6, 3, mask=kmask, promote_dtype=promote, preferred_element_type=jnp.float32,
                         dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  conv = nnx.Conv(4, 6, (3, 3), mask=kmask, promote_dtype=promote, preferred_element_type=jnp.float32,
                  dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = normal((2, 7, 7, 4))
  y = layer(x)
  assert y.dtype == jnp.float32 and calls and calls[-1] == jnp.bfloat16
  with jax.numpy_dtype_promotion('standard'):  # nnx.Conv adds a bf16 bias to its f32 output
    want = conv(x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=3e-2, atol=3e-2)
  with pytest.raises(ValueError, match=r"mask \(the constructor's, nnx.Conv's kernel mask\) must have the kernel's shape "
                     r'.* = \(3, 3, 4, 6\), got \(3, 3, 4, 5\)'):
    dnn.DeformConv(4, 6, 3, mask=jnp.ones((3, 3, 4, 5)), rngs=nnx.Rngs(0))


def test_the_two_masks_cannot_be_confused():
  """The constructor's mask is nnx.Conv's kernel mask, the call's is the DCNv2 modulation: each refuses the other."""
  layer = dnn.DeformConv(4, 6, 3, offset_groups=2, use_bias=False, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 5, 4)), jnp.float32)
  with pytest.raises(ValueError, match=r"mask \(the constructor's, nnx.Conv's kernel mask\).*got \(1, 5, 5, 18\); "
                     r"the DCNv2 modulation .* is the call's mask"):
    dnn.DeformConv(4, 6, 3, mask=jnp.ones((1, 5, 5, 18)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'DeformConv.__call__: mask \(the DCNv2 modulation\) must have shape '
                     r"\[..., Ho, Wo, offset_groups\*kh\*kw=18\], got \(3, 3, 4, 6\); a kernel mask \(3, 3, 4, 6\) "
                     r"belongs to the constructor's mask"):
    layer(x, mask=jnp.ones((3, 3, 4, 6)))
  modulation = jnp.full((1, 5, 5, 18), 0.5, jnp.float32)
  np.testing.assert_allclose(np.asarray(layer(x, mask=modulation)), 0.5 * np.asarray(layer(x)), rtol=1e-5, atol=1e-6)
  # The Linen twin words them alike.
  twin = dlinen.DeformConv(features=6, kernel_size=3, offset_groups=2, mask=jnp.ones((1, 5, 5, 18)))
  with pytest.raises(ValueError, match=r"mask \(the constructor's, nnx.Conv's kernel mask\).*got \(1, 5, 5, 18\)"):
    twin.init(jax.random.key(0), x)
  twin = dlinen.DeformConv(features=6, kernel_size=3, offset_groups=2)
  with pytest.raises(ValueError, match=r'DeformConv.__call__: mask \(the DCNv2 modulation\) .* got \(3, 3, 4, 6\)'):
    twin.init(jax.random.key(0), x, mask=jnp.ones((3, 3, 4, 6)))


@pytest.mark.parametrize('kw,message', [
    (dict(input_dilation=2), 'input_dilation=2 is not supported'),
    (dict(strides=0), 'strides must be positive'),
    (dict(feature_group_count=0), 'feature_group_count must be a positive int'),
    (dict(offset_groups=0), 'offset_groups must be a positive int'),
    (dict(strides=-1), 'strides must be positive'),
    (dict(padding=(1.5, 1)), r'padding must be .* of ints, got \(1.5, 1\)'),
    (dict(padding=((1, 1), ('1', 1))), r'padding must be .* of ints'),
    (dict(padding='FULL'), r"padding must be 'SAME', 'VALID', 'CIRCULAR', 'REFLECT'"),
])
def test_arguments_that_make_no_sense_for_a_deformable_conv_are_named(kw, message):
  with pytest.raises(ValueError, match=message):
    dnn.DeformConv(4, 6, 3, rngs=nnx.Rngs(0), **kw)
  with pytest.raises(ValueError, match=message):
    dlinen.DeformConv(6, 3, **kw).init(jax.random.key(0), jnp.ones((1, 5, 5, 4)))


@pytest.mark.parametrize('kw', [dict(padding='VALID'), dict(padding=0, kernel_dilation=3)], ids=['valid', 'dilated'])
def test_an_input_smaller_than_the_kernel_is_named_before_the_offset_predictor_runs(kw):
  x = jnp.ones((1, 5, 5, 4))
  message = r'DeformConv: padded input H = 5\+0\+0 is smaller than the dilated kernel'
  with pytest.raises(ValueError, match=message):
    dnn.DeformConv(4, 6, 7 if 'kernel_dilation' not in kw else 3, rngs=nnx.Rngs(0), **kw)(x)
  with pytest.raises(ValueError, match=message):
    dlinen.DeformConv(6, 7 if 'kernel_dilation' not in kw else 3, **kw).init(jax.random.key(0), x)


def test_linen_fields_follow_nn_conv_positions():
  x = normal((2, 9, 8, 4))
  twin = dlinen.DeformConv(6, (3, 3), 2, 'VALID')
  conv = nn.Conv(6, (3, 3), 2, 'VALID')
  params = twin.init(jax.random.key(0), x)
  ref = {'params': {k: params['params'][k] for k in ('kernel', 'bias')}}
  np.testing.assert_allclose(np.asarray(twin.apply(params, x)), np.asarray(conv.apply(ref, x)), rtol=1e-5, atol=1e-5)


class ThreeLayers(nnx.Module):
  def __init__(self, middle, rngs):
    self.first = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.middle = middle(8, 8, (3, 3), rngs=rngs)
    self.last = nnx.Conv(8, 4, (3, 3), rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.last(jax.nn.relu(self.middle(jax.nn.relu(self.first(x))))).mean((1, 2)))


def test_swapping_a_conv_leaves_the_rng_stream_of_every_other_layer_unchanged():
  regular = ThreeLayers(nnx.Conv, nnx.Rngs(0))
  deform = ThreeLayers(dnn.DeformConv, nnx.Rngs(0))
  for name in ('first', 'last', 'head'):
    for a, b in zip(jax.tree.leaves(nnx.state(getattr(regular, name), nnx.Param)),
                    jax.tree.leaves(nnx.state(getattr(deform, name), nnx.Param))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(deform.middle.kernel[...]), np.asarray(regular.middle.kernel[...]))
  np.testing.assert_array_equal(np.asarray(deform.middle.bias[...]), np.asarray(regular.middle.bias[...]))
  x = normal((2, 10, 10, 3))
  np.testing.assert_allclose(np.asarray(deform(x)), np.asarray(regular(x)), rtol=1e-5, atol=1e-6)


def test_kernel_and_bias_partitioning_annotations_shard_on_a_two_device_mesh():
  """nnx.with_partitioning annotations on DeformConv's kernel and bias, applied with a sharding constraint over 2 of
  the suite's simulated CPU devices (tests/conftest.py): the state is split as annotated, and the jitted layer
  computes what the unsharded one does. (The `kernel_metadata` spelling of the same:
  test_train.py::test_kernel_and_bias_metadata_shard_a_deform_conv_over_a_2_device_mesh.)"""
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((2,), ('model',), devices=jax.devices()[:2])
  with jax.set_mesh(mesh):
    layer = dnn.DeformConv(4, 6, 3, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                                        (None, None, None, 'model')),
                           bias_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ('model',)),
                           precision='highest', rngs=nnx.Rngs(0))
    state = nnx.state(layer)
    nnx.update(layer, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
    assert layer.kernel[...].sharding.spec == P(None, None, None, 'model')
    assert layer.bias[...].sharding.spec == P('model')
    assert {s.data.shape for s in layer.kernel[...].addressable_shards} == {(3, 3, 4, 3)}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 7, 4)), jnp.float32)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
  plain = dnn.DeformConv(4, 6, 3, bias_init=nnx.initializers.normal(1.0), precision='highest', rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(plain.kernel[...]), np.asarray(layer.kernel[...]))
  np.testing.assert_allclose(np.asarray(y), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)


# --- converting trained convs and PyTorch checkpoints ------------------------------------------

from deformjax import convert  # noqa: E402
from tests.reference import deform_conv2d_ref  # noqa: E402


def test_from_conv_computes_what_the_trained_conv_computes():
  conv = nnx.Conv(4, 6, (3, 3), strides=2, padding='CIRCULAR', kernel_dilation=1, precision='highest',
                  rngs=nnx.Rngs(3))
  conv.bias[...] = normal((6,), 4)
  layer = convert.from_conv(conv, modulated=True, offset_groups=2)
  x = normal((2, 9, 9, 4))
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(conv(x)), rtol=1e-5, atol=1e-5)
  assert layer.offset_groups == 2 and float(jnp.abs(layer.offset_conv.kernel[...]).max()) == 0
  with pytest.raises(TypeError, match='must be an nnx.Conv'):
    convert.from_conv(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


class LinenNet(nn.Module):
  deformable: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu((dlinen.DeformConv(8, (3, 3)) if self.deformable else nn.Conv(8, (3, 3)))(x))
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(2)(x.mean((1, 2)))


def test_linen_params_turn_a_pretrained_tree_into_a_deformable_one():
  x = normal((2, 10, 10, 3))
  pretrained = LinenNet().init(jax.random.key(0), x)['params']
  fresh = LinenNet(deformable=True).init(jax.random.key(1), x)['params']
  # Auto-naming: the swapped Conv_1 became DeformConv_0, and the old Conv_2 is now Conv_1.
  params = convert.linen_params(fresh, pretrained, rename={'DeformConv_0': 'Conv_1', 'Conv_1': 'Conv_2'})
  np.testing.assert_allclose(np.asarray(LinenNet(True).apply({'params': params}, x)),
                             np.asarray(LinenNet().apply({'params': pretrained}, x)), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="'DeformConv_0/kernel' .* is not in the pretrained parameters"):
    convert.linen_params(fresh, pretrained)


def mmcv_reference(x, state, *, stride, padding, dilation, groups, deform_groups):
  """float64, from mmcv's formula: conv_offset -> (o1, o2, mask) chunks, offset = cat(o1, o2), mask = sigmoid."""
  from jax import lax

  w, off_w = state['weight'], state['conv_offset.weight']
  pred = np.asarray(lax.conv_general_dilated(
      jnp.asarray(x), jnp.asarray(off_w.transpose(2, 3, 1, 0)), (stride, stride), ((padding, padding),) * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest',
  )) + state['conv_offset.bias']
  taps = deform_groups * w.shape[2] * w.shape[3]
  o1, o2 = pred[..., :taps], pred[..., taps:2 * taps]
  offset = np.concatenate([o1, o2], axis=-1)
  mask = 1 / (1 + np.exp(-pred[..., 2 * taps:])) if pred.shape[-1] == 3 * taps else None
  return deform_conv2d_ref(np.asarray(x), offset, w.transpose(2, 3, 1, 0), mask, state.get('bias'),
                           stride=(stride, stride), pads=((padding, padding),) * 2, dilation=(dilation, dilation),
                           groups=groups, offset_groups=deform_groups)


@pytest.mark.parametrize('modulated', [True, False], ids=['DCNv2', 'DCNv1'])
@pytest.mark.parametrize('geometry', [dict(stride=1, padding=1, dilation=1, groups=1, deform_groups=1),
                                      dict(stride=2, padding=2, dilation=2, groups=2, deform_groups=2)], ids=str)
def test_from_mmcv_reproduces_mmcv(modulated, geometry):
  rng = np.random.default_rng(0)
  cin, cout, k, dg = 4, 6, 3, geometry['deform_groups']
  state = {'weight': rng.normal(size=(cout, cin // geometry['groups'], k, k)) * 0.3, 'bias': rng.normal(size=cout),
           'conv_offset.weight': rng.normal(size=((3 if modulated else 2) * dg * k * k, cin, k, k)) * 0.2,
           'conv_offset.bias': rng.normal(size=(3 if modulated else 2) * dg * k * k) * 0.5}
  layer = convert.from_mmcv({f'layer.{k}': v for k, v in state.items()}, prefix='layer.', param_dtype=np.float64,
                            **geometry)
  assert layer.modulated == modulated
  x = rng.normal(size=(2, 9, 8, cin))
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), mmcv_reference(x, state, **geometry),
                             rtol=1e-10, atol=1e-10)
  with pytest.raises(ValueError, match='must be 18 \\(DCNv1\\) or 27 \\(DCNv2\\)'):
    convert.from_mmcv({**state, 'conv_offset.weight': state['conv_offset.weight'][:5]}, padding=1)


def test_from_torchvision_matches_the_reference_and_torchvision_where_present():
  rng = np.random.default_rng(1)
  weight, bias = rng.normal(size=(6, 2, 3, 3)) * 0.3, rng.normal(size=6)
  x = rng.normal(size=(2, 4, 9, 7))  # NCHW, as torchvision takes it
  offset = rng.uniform(-2, 2, size=(2, 2 * 2 * 9, 5, 4))
  mask = rng.uniform(size=(2, 2 * 9, 5, 4))
  layer = convert.from_torchvision(weight, bias, stride=2, padding=1, groups=2, offset_groups=2,
                                   param_dtype=np.float64)
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  got = np.asarray(layer(nhwc(x), nhwc(offset), nhwc(mask)))
  want = deform_conv2d_ref(x.transpose(0, 2, 3, 1), offset.transpose(0, 2, 3, 1), weight.transpose(2, 3, 1, 0),
                           mask.transpose(0, 2, 3, 1), bias, stride=(2, 2), pads=((1, 1), (1, 1)), dilation=(1, 1),
                           groups=2, offset_groups=2)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
  try:
    import torch
    import torchvision
  except ImportError:
    return  # the GPU image has both; the reference above is the oracle elsewhere
  t = lambda a: torch.tensor(a, dtype=torch.float64)
  tv = torchvision.ops.deform_conv2d(t(x), t(offset), t(weight), t(bias), stride=2, padding=1, mask=t(mask))
  np.testing.assert_allclose(got, tv.numpy().transpose(0, 2, 3, 1), rtol=1e-10, atol=1e-10)


# mmcv's own test data (tests/test_ops/test_deform_conv.py and test_modulated_deform_conv.py), NCHW / OIHW.
_MMCV_DCN_INPUT = [[[[1., 2., 3.], [0., 1., 2.], [3., 5., 2.]]]]
_MMCV_DCN_STATE = {
    'weight': [[[[0.4, 0.2], [0.1, 0.9]]]],
    'conv_offset.weight': [[[[0.1, 0.4], [0.6, 0.1]]], [[[0.3, 0.2], [0.1, 0.3]]], [[[0.5, 0.5], [0.2, 0.8]]],
                           [[[0.8, 0.3], [0.9, 0.1]]], [[[0.3, 0.1], [0.2, 0.5]]], [[[0.3, 0.7], [0.5, 0.3]]],
                           [[[0.6, 0.2], [0.5, 0.3]]], [[[0.4, 0.1], [0.8, 0.4]]]],
    'conv_offset.bias': [0.7, 0.1, 0.8, 0.5, 0.6, 0.5, 0.4, 0.7]}
_MMCV_DCN_EXPECTED = {  # the output and the gradients of its sum
    'out': [[[[1.650, 0.], [0.000, 0.]]]],
    'input': [[[[-0.666, 0.204, 0.000], [0.030, -0.416, 0.012], [0.000, 0.252, 0.129]]]],
    'conv_offset.weight': [[[[1.44, 2.88], [0.00, 1.44]]], [[[-0.72, -1.44], [0.00, -0.72]]],
                           [[[0.00, 0.00], [0.00, 0.00]]], [[[0.00, 0.00], [0.00, 0.00]]],
                           [[[-0.10, -0.20], [0.00, -0.10]]], [[[-0.08, -0.16], [0.00, -0.08]]],
                           [[[-0.54, -1.08], [0.00, -0.54]]], [[[-0.54, -1.08], [0.00, -0.54]]]],
    'conv_offset.bias': [1.44, -0.72, 0., 0., -0.10, -0.08, -0.54, -0.54],
    'weight': [[[[3.62, 0.], [0.40, 0.18]]]]}
_MMCV_MDCN_INPUT = [[[[1., 2., 3.], [1., 2., 3.], [1., 2., 3.]]]]
_MMCV_MDCN_EXPECTED = {  # a fresh ModulatedDeformConv2dPack(1, 1, 2, padding=1, bias=False), weight filled with 1
    'out': [[[[0.5, 1.5, 2.5, 1.5], [1.0, 3.0, 5.0, 3.0], [1.0, 3.0, 5.0, 3.0], [0.5, 1.5, 2.5, 1.5]]]],
    'input': [[[[2., 2., 2.], [2., 2., 2.], [2., 2., 2.]]]],
    'weight': [[[[9., 9.], [9., 9.]]]],
    'conv_offset.weight': [[[[-7.0, -4.0], [0.0, 0.0]]], [[[-9.0, 7.5], [-6.0, 5.0]]], [[[-4.0, -7.0], [0.0, 0.0]]],
                           [[[-7.5, -9.0], [-5.0, -6.0]]], [[[-7.0, -4.0], [-7.0, -4.0]]],
                           [[[-6.0, 5.0], [-9.0, 7.5]]], [[[-4.0, -7.0], [-4.0, -7.0]]],
                           [[[-5.0, -6.0], [-7.5, -9.0]]], [[[10.5, 6.0], [7.0, 4.0]]], [[[6.0, 10.5], [4.0, 7.0]]],
                           [[[7.0, 4.0], [10.5, 6.0]]], [[[4.0, 7.0], [6.0, 10.5]]]],
    'conv_offset.bias': [-3.0, -1.5, -3.0, -1.5, -3.0, -1.5, -3.0, -1.5, 4.5, 4.5, 4.5, 4.5]}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _mmcv_border_rule(pred: jax.Array, kernel_hw: tuple[int, int], padding: int) -> jax.Array:
  """The identity on the offset predictor's output `[N, Ho, Wo, 3*K]`, whose gradient follows mmcv's rule: zero
  for the offsets of sampling points on y = -1 or x = -1 (at zero offsets, the taps on the padded border), kept
  for the mask logits. Stride and dilation 1."""
  return pred


def _border_rule_fwd(pred, kernel_hw, padding):
  return pred, None


def _border_rule_bwd(kernel_hw, padding, _, g):
  (kh, kw), (n, ho, wo, _) = kernel_hw, g.shape
  y = jnp.arange(ho)[:, None, None, None] - padding + jnp.arange(kh)[None, None, :, None]
  x = jnp.arange(wo)[None, :, None, None] - padding + jnp.arange(kw)[None, None, None, :]
  keep = ((y > -1) & (x > -1)).reshape(ho, wo, kh * kw, 1)
  offsets = jnp.where(keep, g[..., :2 * kh * kw].reshape(n, ho, wo, kh * kw, 2), 0)
  return (jnp.concatenate([offsets.reshape(n, ho, wo, -1), g[..., 2 * kh * kw:]], -1),)


_mmcv_border_rule.defvjp(_border_rule_fwd, _border_rule_bwd)


def _mmcv_sum_and_grads(layer: dnn.DeformConv, x_nchw, border_padding: int | None = None) -> dict[str, np.ndarray]:
  """The output and the gradients of its sum as mmcv's tests read them (NCHW, OIHW, mmcv's unhalved weight);
  with `border_padding`, the predictor's gradient follows mmcv's border rule (`_mmcv_border_rule`)."""
  x = jnp.asarray(np.asarray(x_nchw, np.float64).transpose(0, 2, 3, 1))
  graphdef, state = nnx.split(layer)
  taps = layer.offset_groups * layer.kernel_size[0] * layer.kernel_size[1]

  def total(state, x):
    model = nnx.merge(graphdef, state)
    pred = model.offset_conv(x)  # the layer's own prediction, split as the layer splits it
    if border_padding is not None:
      pred = _mmcv_border_rule(pred, model.kernel_size, border_padding)
    offsets, mask = split_prediction(pred, 2 * taps, model.modulated, model.offset_scale, model.max_offset)
    y = model(x, offsets, mask)
    return y.sum(), y

  (_, y), (g_state, g_x) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(state, x)
  g = nnx.to_pure_dict(g_state)
  oihw = lambda a: np.asarray(a).transpose(3, 2, 0, 1)
  # from_mmcv halves a DCNv2 kernel (our mask is 2*sigmoid): mmcv's weight gradient is half the kernel's
  weight_grad = oihw(g['kernel']) / (2 if layer.modulated else 1)
  return {'out': np.asarray(y).transpose(0, 3, 1, 2), 'input': np.asarray(g_x).transpose(0, 3, 1, 2),
          'weight': weight_grad, 'conv_offset.weight': oihw(g['offset_conv']['kernel']),
          'conv_offset.bias': np.asarray(g['offset_conv']['bias'])}


def test_from_mmcv_gives_mmcv_s_own_test_values():
  """mmcv's DeformConv2dPack test (its weights and input) and a fresh ModulatedDeformConv2dPack's: the output and
  every gradient mmcv checks, at its threshold. The DCNv2 predictor's gradient matches once mmcv's border rule is
  applied to it (docs/ops.md: mmcv zeroes the offset gradient of sampling points on y = -1 or x = -1)."""
  state = {k: np.asarray(v, np.float64) for k, v in _MMCV_DCN_STATE.items()}
  dcn = convert.from_mmcv(state, param_dtype=np.float64)
  assert not dcn.modulated
  got = _mmcv_sum_and_grads(dcn, _MMCV_DCN_INPUT)
  for name, want in _MMCV_DCN_EXPECTED.items():
    np.testing.assert_allclose(got[name], np.asarray(want), rtol=1e-3, atol=1e-8, err_msg=name)

  k = 2
  mdcn_state = {'weight': np.ones((1, 1, k, k)), 'conv_offset.weight': np.zeros((3 * k * k, 1, k, k)),
                'conv_offset.bias': np.zeros(3 * k * k)}
  mdcn = convert.from_mmcv(mdcn_state, padding=1, param_dtype=np.float64)
  assert mdcn.modulated
  plain, mmcv_rule = _mmcv_sum_and_grads(mdcn, _MMCV_MDCN_INPUT), _mmcv_sum_and_grads(mdcn, _MMCV_MDCN_INPUT, 1)
  for name, want in _MMCV_MDCN_EXPECTED.items():
    np.testing.assert_allclose(mmcv_rule[name], np.asarray(want), rtol=1e-2, atol=1e-8, err_msg=name)
  for name in ('out', 'input', 'weight'):  # the rule touches only the predictor's gradient
    np.testing.assert_array_equal(plain[name], mmcv_rule[name])
  assert not np.allclose(plain['conv_offset.bias'], _MMCV_MDCN_EXPECTED['conv_offset.bias'])
