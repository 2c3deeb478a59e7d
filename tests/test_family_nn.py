"""DCNv3, DCNv4 and MSDeformAttn modules: what a fresh layer computes, the Linen twins, shapes, errors.

The converters' parity with the PyTorch modules is in test_family_convert.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformjax.nn import DCNv3, DCNv4, MSDeformAttn, linen
from deformjax.nn._blocks import directional_bias_init, group_softmax, sampling_locations
from deformjax.ops import offset_mask_channels


def randomise(model: nnx.Module, seed: int = 0, scale: float = 0.3) -> nnx.Module:
  """Every parameter random (the offset heads start at zero, which would leave the sampler untested)."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      scale * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]))
  return model


def run(layer: nnx.Module, *arrays, **static):
  """`layer(*arrays, **static)` under `nnx.jit` (one compile instead of many eager dispatches; `static`:
  spatial_shapes, return flags, padding masks, closed over)."""
  return nnx.jit(lambda m, *xs: m(*xs, **static))(layer, *arrays)


def pure_params(model: nnx.Module) -> dict:
  return {'params': nnx.to_pure_dict(nnx.state(model, nnx.Param))}


# flax's LayerNorm computes its statistics in promote_types(dtype, float32), which strict promotion refuses for
# float64: the float64 DCNv3 tests run under standard promotion.
float64_layer_norm = pytest.mark.usefixtures('standard_promotion')


@pytest.fixture
def standard_promotion():
  with jax.numpy_dtype_promotion('standard'):
    yield


def normal(seed, shape, dtype=jnp.float64):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def depthwise_box(x, k, dilation=1):
  """The regular computation a fresh DCNv3 samples: each channel's mean over the dilated k x k window, zero padded."""
  c = x.shape[-1]
  kernel = jnp.full((k, k, 1, c), 1.0 / (k * k), x.dtype)
  pad = dilation * (k - 1) // 2
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad), (pad, pad)], rhs_dilation=(dilation, dilation),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c,
                                      precision='highest')


@float64_layer_norm
@pytest.mark.parametrize('k, dilation', [(3, 1), (5, 1), (3, 2)])
def test_fresh_dcnv3_is_a_box_filter_between_its_projections(k, dilation):
  layer = DCNv3(8, k, groups=2, kernel_dilation=dilation, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  x = normal(1, (2, 7, 6, 8))
  y, (offsets, mask) = run(layer, x, return_sampling=True)
  assert offsets.shape == (2, 7, 6, 2 * k * k * 2) and not np.any(np.asarray(offsets))
  np.testing.assert_allclose(mask, 1.0 / (k * k), rtol=1e-12)
  expected = layer.output_proj(depthwise_box(layer.input_proj(x), k, dilation))
  np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)


@float64_layer_norm
def test_dcnv3_mask_is_a_softmax_over_each_groups_taps():
  layer = randomise(DCNv3(8, 3, groups=4, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
  mask = run(layer, normal(2, (1, 5, 5, 8)), return_sampling=True)[1].mask
  sums = np.asarray(mask).reshape(1, 5, 5, 4, 9).sum(-1)
  np.testing.assert_allclose(sums, 1.0, rtol=1e-12)
  logits = jnp.arange(6.0).reshape(1, 6)
  np.testing.assert_allclose(group_softmax(logits, 2)[0, :3], jax.nn.softmax(jnp.arange(3.0)), rtol=1e-12)


@float64_layer_norm
def test_fresh_dcnv3_gate_blends_half_and_half():
  """center_feature_scale starts at sigmoid(0) = 1/2: half the box filter, half the projected input."""
  layer = DCNv3(8, 3, groups=2, center_feature_scale=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  x = normal(3, (1, 6, 6, 8))
  v = layer.input_proj(x)
  np.testing.assert_allclose(run(layer, x), layer.output_proj(0.5 * depthwise_box(v, 3) + 0.5 * v), rtol=1e-10,
                             atol=1e-12)


def test_fresh_dcnv4_computes_zero_and_its_packed_head_is_padded_to_eight():
  layer = DCNv4(16, 3, groups=2, dw_kernel_size=3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  assert layer.offset_mask.out_features == offset_mask_channels(2, 9) == 56
  assert DCNv4(16, 3, groups=2, remove_center=True, rngs=nnx.Rngs(0)).offset_mask.out_features == offset_mask_channels(2, 8) == 48
  y, (offsets, mask) = run(layer, normal(4, (2, 5, 5, 16)), return_sampling=True)
  assert offsets.shape == (2, 5, 5, 2 * 9 * 2) and mask.shape == (2, 5, 5, 2 * 9)  # split out of 56 packed channels
  assert not np.any(np.asarray(y))


def test_dcnv4_with_unit_mask_and_zero_offsets_is_a_sum_over_the_window():
  """DCNv4 does not normalise its mask: a mask of ones sums the window (k*k times DCNv3's box filter)."""
  layer = DCNv4(8, 3, groups=2, without_pointwise=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  bias = np.zeros(layer.offset_mask.out_features)
  for g in range(2):
    bias[g * 27 + 18:g * 27 + 27] = 1.0  # per group: 18 offsets, then 9 mask values
  layer.offset_mask.bias[...] = jnp.asarray(bias)
  x = normal(5, (1, 6, 7, 8))
  np.testing.assert_allclose(run(layer, x), 9.0 * depthwise_box(x, 3), rtol=1e-10, atol=1e-12)


def test_fresh_msdeformattn_samples_the_directional_star_with_uniform_weights():
  m, lv, p = 4, 2, 3
  layer = MSDeformAttn(16, m, lv, p, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  shapes = [(6, 8), (3, 4)]
  ref = jnp.full((1, 2, lv, 2), 0.5, jnp.float64)
  query, inputs = normal(6, (1, 2, 16)), normal(7, (1, 48 + 12, 16))
  _, (locations, weights) = run(layer, query, ref, inputs, spatial_shapes=shapes, return_sampling=True)
  np.testing.assert_allclose(weights, 1.0 / (lv * p), rtol=1e-12)
  # head 1 looks along +y: point j at (j + 1) pixels of each level
  for level, (h, _) in enumerate(shapes):
    for j in range(p):
      np.testing.assert_allclose(locations[0, 0, 1, level, j], [0.5, 0.5 + (j + 1) / h], rtol=1e-12, atol=1e-15)
  bias = np.asarray(directional_bias_init(m, lv, p)(None, (m * lv * p * 2,))).reshape(m, lv, p, 2)
  np.testing.assert_allclose(bias[0, :, 0], [[1.0, 0.0]] * lv, atol=1e-15)  # head 0 looks along +x
  assert np.abs(bias).max() == p


def test_msdeformattn_at_pixel_centres_is_a_weighted_gather():
  """Reference points at pixel centres and zero offsets: every sample reads one value pixel exactly."""
  layer = MSDeformAttn(8, 2, 1, 1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  layer.sampling_offsets.bias[...] = jnp.zeros(4, jnp.float64)
  h, w = 4, 5
  inputs = normal(8, (1, h * w, 8))
  pixels = [(1, 2), (3, 0), (0, 4)]  # (row, col)
  ref = jnp.asarray([[[[(c + 0.5) / w, (r + 0.5) / h]] for r, c in pixels]], jnp.float64)
  out = run(layer, normal(9, (1, 3, 8)), ref, inputs, spatial_shapes=[(h, w)])
  value = layer.value_proj(inputs)
  expected = layer.output_proj(jnp.stack([value[0, r * w + c] for r, c in pixels])[None])
  np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_msdeformattn_padding_mask_zeroes_the_padded_values():
  layer = randomise(MSDeformAttn(8, 2, 2, 2, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
  shapes, total = [(4, 4), (2, 2)], 20
  query, ref, inputs = normal(10, (2, 3, 8)), jax.random.uniform(jax.random.key(11), (2, 3, 2, 2)), normal(12,
                                                                                                           (2, 20, 8))
  pad = np.zeros((2, total), bool)
  pad[:, 16:] = True  # the whole coarse level is padding
  changed = inputs.at[:, 16:].set(100.0)
  np.testing.assert_allclose(run(layer, query, ref, inputs, spatial_shapes=shapes, padding_mask=jnp.asarray(pad)),
                             run(layer, query, ref, changed, spatial_shapes=shapes, padding_mask=jnp.asarray(pad)),
                             rtol=1e-12)


def test_sampling_locations_for_boxes_scale_offsets_by_half_the_box_over_points():
  ref = jnp.asarray([[[[0.5, 0.5, 0.2, 0.4]]]])
  offsets = jnp.ones((1, 1, 1, 1, 2, 2))
  loc = sampling_locations(ref, offsets, [(10, 10)])
  np.testing.assert_allclose(loc[0, 0, 0, 0, 0], [0.5 + 0.2 / 2 / 2, 0.5 + 0.4 / 2 / 2], rtol=1e-12)


# Each entry builds one (NNX layer, Linen twin, inputs) case: a test builds only the case it runs.
LAYER_CASES = [
    lambda: (DCNv3(8, 3, groups=2, center_feature_scale=True, rngs=nnx.Rngs(0)),
             linen.DCNv3(3, groups=2, center_feature_scale=True), lambda: (normal(1, (2, 5, 6, 8), jnp.float32),)),
    lambda: (DCNv3(8, 5, groups=4, remove_center=True, dw_kernel_size=3, rngs=nnx.Rngs(0)),
             linen.DCNv3(5, groups=4, remove_center=True, dw_kernel_size=3),
             lambda: (normal(2, (1, 6, 6, 8), jnp.float32),)),
    lambda: (DCNv4(16, 3, groups=2, dw_kernel_size=3, center_feature_scale=True, output_bias=False, rngs=nnx.Rngs(0)),
             linen.DCNv4(3, groups=2, dw_kernel_size=3, center_feature_scale=True, output_bias=False),
             lambda: (normal(3, (2, 5, 5, 16), jnp.float32),)),
    lambda: (DCNv4(16, 3, groups=4, without_pointwise=True, rngs=nnx.Rngs(0)),
             linen.DCNv4(3, groups=4, without_pointwise=True), lambda: (normal(4, (1, 4, 6, 16), jnp.float32),)),
    lambda: (MSDeformAttn(16, 4, 2, 3, rngs=nnx.Rngs(0)), linen.MSDeformAttn(16, 4, 2, 3),
             lambda: (normal(5, (2, 7, 16), jnp.float32), jax.random.uniform(jax.random.key(6), (2, 7, 2, 2)),
                      normal(7, (2, 30 + 6, 16), jnp.float32), [(5, 6), (2, 3)])),
]


@pytest.mark.parametrize('index', range(len(LAYER_CASES)))
def test_linen_twins_have_the_same_parameters_and_numbers(index):
  nnx_layer, linen_layer, args = LAYER_CASES[index]()
  args = args()
  arrays, static = args[:3], args[3:]
  fresh = jax.jit(lambda k, *xs: linen_layer.init(k, *xs, *static))(jax.random.key(0), *arrays)
  ours = pure_params(nnx_layer)
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, ours)
  # zero-initialised heads and biases are zero in both; the directional bias is identical
  for path, leaf in jax.tree_util.tree_flatten_with_path(ours)[0]:
    twin = fresh
    for key in path:
      twin = twin[key.key]
    if not np.any(np.asarray(leaf)) or 'sampling_offsets' in str(path):
      np.testing.assert_array_equal(twin, leaf)
  randomise(nnx_layer, seed=index)
  twin = jax.jit(lambda p, *xs: linen_layer.apply(p, *xs, *static))(pure_params(nnx_layer), *arrays)
  np.testing.assert_allclose(twin, nnx.jit(lambda m, *xs: m(*xs, *static))(nnx_layer, *arrays), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize('index', range(len(LAYER_CASES)))
def test_layers_run_under_jit_and_their_zero_heads_get_gradients(index):
  layer, _, args = LAYER_CASES[index]()
  args = args()
  if isinstance(layer, DCNv4):
    layer.offset_mask.bias[...] = jnp.ones_like(layer.offset_mask.bias[...])  # a live mask, so offsets matter

  arrays, static = args[:3], args[3:]  # MSDeformAttn's spatial_shapes stay Python ints

  @nnx.jit
  def loss_and_grad(model, *xs):
    return nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(*xs, *static))))(model)

  loss, grads = loss_and_grad(layer, *arrays)
  assert np.isfinite(loss)
  head = {DCNv3: 'offset', DCNv4: 'offset_mask', MSDeformAttn: 'sampling_offsets'}[type(layer)]
  kernel_grad = np.asarray(getattr(grads, head).kernel[...])
  assert np.all(np.isfinite(kernel_grad)) and np.any(kernel_grad)


def test_leading_batch_dims_unbatched_inputs_and_bfloat16():
  layer = randomise(DCNv3(8, 3, groups=2, rngs=nnx.Rngs(0)))
  x = normal(1, (2, 3, 5, 5, 8), jnp.float32)
  np.testing.assert_allclose(run(layer, x)[1, 2], run(layer, x[1, 2][None])[0], rtol=1e-5, atol=1e-6)
  assert run(layer, x[0, 0]).shape == (5, 5, 8)
  lowp = DCNv4(16, 3, groups=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert run(lowp, normal(2, (1, 4, 4, 16), jnp.float32)).dtype == jnp.bfloat16
  attn = MSDeformAttn(16, 4, 1, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  out = run(attn, normal(3, (1, 2, 16), jnp.float32), jnp.full((1, 2, 1, 2), 0.5), normal(4, (1, 9, 16), jnp.float32),
            spatial_shapes=[(3, 3)])
  assert out.dtype == jnp.bfloat16 and out.shape == (1, 2, 16)


def test_errors_name_the_argument_and_the_expected_shape():
  with pytest.raises(ValueError, match='DCNv3: channels=10 must be divisible by groups=4'):
    DCNv3(10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'DCNv4: padding=0 must keep the spatial size'):
    DCNv4(16, 3, padding=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='DCNv3: remove_center needs an odd kernel_size'):
    DCNv3(8, 2, groups=2, remove_center=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'DCNv3: inputs must have shape \[..., H, W, channels=8\], got \(1, 4, 4, 6\)'):
    DCNv3(8, groups=2, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 4, 6)))
  layer = MSDeformAttn(16, 4, 2, 2, rngs=nnx.Rngs(0))
  q, ref, inputs = jnp.ones((1, 3, 16)), jnp.full((1, 3, 2, 2), 0.5), jnp.ones((1, 20, 16))
  with pytest.raises(ValueError, match='MSDeformAttn: spatial_shapes must have num_levels=2'):
    layer(q, ref, inputs, [(4, 5)])
  with pytest.raises(ValueError, match=r'inputs must have shape \[N=1, sum\(H_l\*W_l\)=21, d_model=16\]'):
    layer(q, ref, inputs, [(4, 4), (1, 5)])
  with pytest.raises(ValueError, match=r'reference_points must have shape \[N=1, Lq=3, num_levels=2, 2 or 4\]'):
    layer(q, jnp.ones((1, 3, 2, 3)), inputs, [(4, 4), (2, 2)])
  with pytest.raises(TypeError, match='spatial_shapes must be static'):  # a concrete array is fine, a traced one not
    nnx.jit(lambda m, shapes: m(q, ref, inputs, shapes))(layer, jnp.asarray([[4, 4], [2, 2]]))
  with pytest.raises(ValueError, match='d_model=10 must be divisible by num_heads=4'):
    MSDeformAttn(10, 4, rngs=nnx.Rngs(0))
