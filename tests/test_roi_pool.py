"""roi_align / deform_roi_pool against the float64 loop reference; mmcv's deformable RoI pooling packs
loaded by `convert.from_mmcv_deform_roi_pool` against their forward written out in float64."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from deformjax import convert
from deformjax.nn import DeformRoIPool
from deformjax.nn import linen as dlinen
from deformjax.ops import deform_roi_pool, roi_align
from tests.reference import deform_roi_pool_ref, roi_bilinear_point

N, H, W, C = 2, 12, 10, 3


def features(seed=0, dtype=jnp.float64):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(N, H, W, C)), dtype)


# Inside, touching borders, partly and wholly outside, tiny, and spatially scaled boxes.
ROIS = np.array([
    [0, 1.0, 1.0, 7.0, 9.0],
    [1, 0.0, 0.0, 9.9, 11.9],
    [1, 2.3, 3.7, 4.1, 5.2],
    [0, -3.0, -2.0, 4.0, 3.0],
    [1, 6.0, 8.0, 14.0, 16.0],
    [0, 20.0, 20.0, 30.0, 30.0],
    [1, 5.0, 5.0, 5.2, 5.1],
])


@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('sampling_ratio', [0, 1, 2])
@pytest.mark.parametrize('output_size', [(2, 2), (3, 4)])
def test_roi_align_matches_reference(aligned, sampling_ratio, output_size):
  feats = features()
  got = roi_align(feats, jnp.asarray(ROIS), output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned)
  want = deform_roi_pool_ref(feats, ROIS, output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-12)


@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_deform_roi_pool_matches_reference(sampling_ratio):
  feats = features()
  offsets = np.random.default_rng(1).normal(size=(len(ROIS), 3, 3, 2)) * 2.0
  kw = dict(output_size=(3, 3), sampling_ratio=sampling_ratio, gamma=0.1, spatial_scale=0.5)
  got = deform_roi_pool(feats, jnp.asarray(ROIS), jnp.asarray(offsets), **kw)
  want = deform_roi_pool_ref(feats, ROIS, offsets, **kw)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-12)


def test_aligned_default_is_mmcv_s_and_torchvision_s_is_aligned_false():
  """Both ops default to aligned=True (mmcv's RoIAlign / DeformRoIPool, detectron2); torchvision's default,
  aligned=False, is a different result that must be asked for."""
  feats, rois = features(), jnp.asarray(ROIS)
  for op in (roi_align, deform_roi_pool):
    assert inspect.signature(op).parameters['aligned'].default is True
  default = np.asarray(roi_align(feats, rois, output_size=3))
  np.testing.assert_allclose(default, deform_roi_pool_ref(feats, ROIS, output_size=(3, 3), aligned=True), atol=1e-12)
  unaligned = deform_roi_pool_ref(feats, ROIS, output_size=(3, 3), aligned=False)
  assert np.abs(default - unaligned).max() > 1e-2
  np.testing.assert_array_equal(np.asarray(deform_roi_pool(feats, rois, output_size=3)), default)


def test_zero_offsets_equal_roi_align():
  feats = features()
  rois = jnp.asarray(ROIS)
  zero = jnp.zeros((len(ROIS), 4, 4, 2))
  np.testing.assert_array_equal(
      np.asarray(deform_roi_pool(feats, rois, zero, output_size=4)), np.asarray(roi_align(feats, rois, output_size=4)))


def test_jit_caps_adaptive_grid_but_matches_for_rois_inside():
  feats = features()
  inside = jnp.asarray(ROIS[[0, 1, 2, 6]])
  f = jax.jit(lambda f, r: roi_align(f, r, output_size=3))
  want = deform_roi_pool_ref(feats, np.asarray(inside), output_size=(3, 3))
  np.testing.assert_allclose(np.asarray(f(feats, inside)), want, atol=1e-12)
  # An explicit bound makes any RoI exact under jit.
  g = jax.jit(lambda f, r: roi_align(f, r, output_size=3, max_sampling_grid=8))
  np.testing.assert_allclose(np.asarray(g(feats, jnp.asarray(ROIS))),
                             deform_roi_pool_ref(feats, ROIS, output_size=(3, 3)), atol=1e-12)


def test_empty_rois_and_bad_batch_index_pool_to_zero():
  feats = features()
  rois = jnp.asarray([[0, 8.0, 8.0, 2.0, 2.0], [5, 1.0, 1.0, 6.0, 6.0], [-1, 1.0, 1.0, 6.0, 6.0],
                      [0.5, 1.0, 1.0, 6.0, 6.0], [np.nan, 1.0, 1.0, 6.0, 6.0]])
  out = np.asarray(jax.jit(lambda f, r: roi_align(f, r, output_size=2))(feats, rois))
  np.testing.assert_array_equal(out, 0)


def test_no_rois_and_empty_features():
  assert roi_align(features(), jnp.zeros((0, 5)), output_size=2).shape == (0, 2, 2, C)
  # No feature map to read: every RoI pools to zeros (as torchvision), in the features' dtype.
  out = roi_align(jnp.zeros((0, H, W, C), jnp.float32), jnp.asarray(ROIS, jnp.float32), output_size=2)
  assert out.shape == (len(ROIS), 2, 2, C) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0)
  empty_channels = roi_align(jnp.ones((1, H, W, 0), jnp.float32), jnp.asarray(ROIS, jnp.float32), output_size=2)
  assert empty_channels.shape == (len(ROIS), 2, 2, 0)


def test_gradients_through_features_offsets_and_roi_coordinates():
  feats = features()
  # Boxes and offsets chosen so no sample sits on an integer (bilinear's kinks)
  # and no adaptive grid size is at a jump.
  rois = jnp.asarray([[0, 1.13, 2.27, 6.41, 8.33], [1, 2.71, 0.87, 8.19, 5.93]])
  offsets = jnp.asarray(np.random.default_rng(2).uniform(-0.3, 0.3, size=(2, 2, 2, 2)))

  def f(feats, coords, offsets):
    r = jnp.concatenate([rois[:, :1], coords], axis=1)
    return deform_roi_pool(feats, r, offsets, output_size=2, sampling_ratio=2, gamma=0.1)

  check_grads(jax.jit(f), (feats, rois[:, 1:], offsets), order=2, modes=('fwd', 'rev'), eps=1e-5)


def test_vmap_over_feature_maps():
  feats = jnp.stack([features(0), features(1)])
  rois = jnp.asarray(ROIS[:3])
  got = jax.vmap(lambda f: roi_align(f, rois, output_size=2, sampling_ratio=2))(feats)
  for i in range(2):
    np.testing.assert_allclose(np.asarray(got[i]), np.asarray(roi_align(feats[i], rois, output_size=2, sampling_ratio=2)))


def test_low_precision_features():
  got = roi_align(features(dtype=jnp.bfloat16), jnp.asarray(ROIS, jnp.float32), output_size=2)
  assert got.dtype == jnp.bfloat16
  want = deform_roi_pool_ref(features(), ROIS, output_size=(2, 2))
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float64)), want, atol=5e-2)


@pytest.mark.parametrize('kwargs,message', [
    (dict(rois=np.zeros((3, 4))), r'rois must have shape \[R, 5\]'),
    (dict(offsets=np.zeros((7, 2, 2, 2))), r'offsets must have shape \[R, out_h, out_w, 2\] = \(7, 3, 3, 2\)'),
    (dict(features=np.zeros((H, W, C))), 'features must have rank 4'),
    (dict(output_size=0), 'output_size must be positive'),
    (dict(sampling_ratio=-1), 'sampling_ratio must be a non-negative int'),
])
def test_bad_input(kwargs, message):
  args = dict(features=features(), rois=jnp.asarray(ROIS), offsets=None, output_size=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    deform_roi_pool(**args)


def test_torchvision_roi_align_parity():
  torch = pytest.importorskip('torch', exc_type=ImportError)
  torchvision = pytest.importorskip('torchvision', exc_type=ImportError)
  feats = features()
  for aligned in (True, False):
    want = torchvision.ops.roi_align(torch.tensor(np.asarray(feats).transpose(0, 3, 1, 2)), torch.tensor(ROIS),
                                     output_size=(3, 3), spatial_scale=0.5, sampling_ratio=0, aligned=aligned)
    got = roi_align(feats, jnp.asarray(ROIS), output_size=3, spatial_scale=0.5, aligned=aligned)
    np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-10)
  # A torchvision call that leaves `aligned` unset is ours with aligned=False.
  want = torchvision.ops.roi_align(torch.tensor(np.asarray(feats).transpose(0, 3, 1, 2)), torch.tensor(ROIS),
                                   output_size=(3, 3), spatial_scale=0.5)
  got = roi_align(feats, jnp.asarray(ROIS), output_size=3, spatial_scale=0.5, aligned=False)
  np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-10)


def test_concrete_rois_closed_over_inside_jit():
  """RoIs that are constants of a jitted function still get a traced size: no conversion error."""
  feats = features()
  rois = jnp.asarray(ROIS[[0, 1, 2, 6]])
  got = jax.jit(lambda f: roi_align(f, rois, output_size=3))(feats)
  np.testing.assert_allclose(np.asarray(got), deform_roi_pool_ref(feats, np.asarray(rois), output_size=(3, 3)),
                             atol=1e-12)


# mmcv's DeformRoIPoolPack / ModulatedDeformRoIPoolPack, loaded by convert.from_mmcv_deform_roi_pool. mmcv is not
# installable here, so the oracle is its forward written out from mmcv/ops/deform_roi_pool.py and its CUDA kernel
# (deform_roi_pool_cuda_kernel.cuh), in mmcv's NCHW layout with its (dx, dy) offset planes.

def mmcv_deform_roi_pool(x, rois, offset, *, output_size, spatial_scale, sampling_ratio, gamma):
  """mmcv's `deform_roi_pool` forward kernel, loop for loop: `x [N, C, H, W]`, `offset` None or `[R, 2, oh, ow]`
  (plane 0 shifts x). Its `bilinear_interpolate` (common_cuda_helper.hpp) is torchvision's rule."""
  n, c, h, w = x.shape
  oh, ow = output_size
  out = np.zeros((len(rois), c, oh, ow))
  for r, roi in enumerate(rois):
    image = x[int(roi[0])].transpose(1, 2, 0)
    start_w, start_h = roi[1] * spatial_scale - 0.5, roi[2] * spatial_scale - 0.5
    roi_w, roi_h = roi[3] * spatial_scale - 0.5 - start_w, roi[4] * spatial_scale - 0.5 - start_h
    bin_h, bin_w = roi_h / oh, roi_w / ow
    grid_h = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_h / oh))
    grid_w = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_w / ow))
    count = max(grid_h * grid_w, 1)
    for ph in range(oh):
      for pw in range(ow):
        y0, x0 = start_h, start_w
        if offset is not None:
          x0, y0 = x0 + gamma * roi_w * offset[r, 0, ph, pw], y0 + gamma * roi_h * offset[r, 1, ph, pw]
        for iy in range(grid_h):
          y = y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
          for ix in range(grid_w):
            out[r, :, ph, pw] += roi_bilinear_point(image, y, x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w)
        out[r, :, ph, pw] /= count
  return out


def mmcv_pack(x, rois, state, *, output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1):
  """`(Modulated)DeformRoIPoolPack.forward` in float64, NCHW: the heads read the pooled RoI flattened as
  (C, oh, ow); offsets are viewed `[R, 2, oh, ow]`, the mask `sigmoid(...)` `[R, 1, oh, ow]`."""
  linear = lambda v, key: v @ state[f'{key}.weight'].T + state[f'{key}.bias']
  relu = lambda v: np.maximum(v, 0.0)
  kw = dict(output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=gamma)
  r, (oh, ow) = len(rois), output_size
  flat = mmcv_deform_roi_pool(x, rois, None, **kw).reshape(r, -1)
  offset = linear(relu(linear(relu(linear(flat, 'offset_fc.0')), 'offset_fc.2')), 'offset_fc.4')
  out = mmcv_deform_roi_pool(x, rois, offset.reshape(r, 2, oh, ow), **kw)
  if 'mask_fc.0.weight' in state:
    mask = 1.0 / (1.0 + np.exp(-linear(relu(linear(flat, 'mask_fc.0')), 'mask_fc.2')))
    out = out * mask.reshape(r, 1, oh, ow)
  return out


def mmcv_pack_state(c, output_size, fc, *, modulated, seed=0, scale=0.3, zero_heads=False):
  """A pack's `state_dict()` as numpy: `nn.Linear` weights `[out, in]` under mmcv's `nn.Sequential` indices."""
  rng = np.random.default_rng(seed)
  bins = output_size[0] * output_size[1]
  shapes = {'offset_fc.0': (fc, c * bins), 'offset_fc.2': (fc, fc), 'offset_fc.4': (2 * bins, fc)}
  if modulated:
    shapes.update({'mask_fc.0': (fc, c * bins), 'mask_fc.2': (bins, fc)})
  state = {}
  for key, shape in shapes.items():
    zero = zero_heads and key in ('offset_fc.4', 'mask_fc.2')  # mmcv's init zeroes the last layer of each head
    state[f'{key}.weight'] = np.zeros(shape) if zero else rng.normal(size=shape) * scale
    state[f'{key}.bias'] = np.zeros(shape[0]) if zero else rng.normal(size=shape[0]) * scale
  return state


def linen_params_of(pool):
  """The NNX layer's parameters as its Linen twin's tree."""
  dense = lambda l: dict(kernel=l.kernel[...], bias=l.bias[...])
  params = {f'offset_hidden_{i}': dense(l) for i, l in enumerate(pool.offset_hidden)}
  params['offset_out'] = dense(pool.offset_out)
  if pool.modulated:
    params.update(mask_hidden=dense(pool.mask_hidden), mask_out=dense(pool.mask_out))
  return params


PACK_ROIS = np.array([[0, 2.0, 3.0, 15.0, 20.0], [1, 0.0, 0.0, 19.0, 23.0], [1, 5.5, 4.25, 9.0, 12.5],
                      [0, -4.0, -2.0, 8.0, 6.0]])


@pytest.mark.parametrize('modulated', [False, True], ids=['DeformRoIPoolPack', 'ModulatedDeformRoIPoolPack'])
def test_from_mmcv_deform_roi_pool_reproduces_the_packs(modulated):
  """Every weight random (offsets and mask act), a non-square output and the adaptive grid: NNX and Linen layers
  equal mmcv's forward in float64."""
  size, kw = (2, 3), dict(spatial_scale=0.5, sampling_ratio=0, gamma=0.2)
  state = mmcv_pack_state(C, size, 5, modulated=modulated)
  pool = convert.from_mmcv_deform_roi_pool({f'roi.{k}': v for k, v in state.items()}, output_size=size, prefix='roi.',
                                           param_dtype=np.float64, **kw)
  assert (pool.modulated, pool.modulation, pool.aligned, pool.in_features) == (modulated, 'sigmoid', True, C)
  feats = features(3)
  want = mmcv_pack(np.asarray(feats).transpose(0, 3, 1, 2), PACK_ROIS, state, output_size=size, **kw)
  # Under jit the adaptive grid is capped at ceil(H / out_h) x ceil(W / out_w), which covers these RoIs.
  got, (offsets, _) = nnx.jit(lambda m, f, r: m(f, r, return_sampling=True))(pool, feats, jnp.asarray(PACK_ROIS))
  assert float(jnp.abs(offsets).max()) > 0.1  # the offsets shift the bins
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-10, atol=1e-10)
  twin = dlinen.DeformRoIPool(size, hidden_features=(5, 5), modulated=modulated, modulation='sigmoid',
                              param_dtype=jnp.float64, **kw)
  got = jax.jit(twin.apply)({'params': linen_params_of(pool)}, feats, jnp.asarray(PACK_ROIS))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-10, atol=1e-10)


# mmcv's own test data (tests/test_ops/test_deform_roi_pool.py): inputs NCHW, RoIs, and a fresh DeformRoIPoolPack's
# output and input gradient (of sum(output)) at output_size 2, sampling_ratio 2.
MMCV_CASES = [
    ([[[[1., 2.], [3., 4.]]]], [[0., 0., 0., 1., 1.]], [[[[1, 1.25], [1.5, 1.75]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2.], [3., 4.]], [[4., 3.], [2., 1.]]]], [[0., 0., 0., 1., 1.]],
     [[[[1., 1.25], [1.5, 1.75]], [[4, 3.75], [3.5, 3.25]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]], [[0., 0., 0., 3., 3.]],
     [[[[1.9375, 4.75], [7.5625, 10.375]]]],
     [[[[0.47265625, 0.4296875, 0.4296875, 0.04296875], [0.4296875, 0.390625, 0.390625, 0.0390625],
        [0.4296875, 0.390625, 0.390625, 0.0390625], [0.04296875, 0.0390625, 0.0390625, 0.00390625]]]]),
]


@pytest.mark.parametrize('case,modulated', [(0, False), (1, False), (2, False), (2, True)])
def test_fresh_packs_give_mmcv_s_own_test_values(case, modulated):
  """A freshly initialised pack (last layer of each head zero, as mmcv's `__init__` leaves it) gives mmcv's recorded
  output and input gradient; the modulated pack half of each (its mask is sigmoid(0) = 1/2)."""
  x, rois, out, grad = (np.asarray(a, np.float64) for a in MMCV_CASES[case])
  feats, rois = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(rois)
  state = mmcv_pack_state(x.shape[1], (2, 2), 4, modulated=modulated, zero_heads=True)
  pool = convert.from_mmcv_deform_roi_pool(state, output_size=2, sampling_ratio=2, param_dtype=np.float64)

  @nnx.jit
  def forward_and_grad(pool, feats):
    out, vjp = jax.vjp(lambda f: pool(f, rois), feats)
    return out, vjp(jnp.ones_like(out))[0]

  got, g = forward_and_grad(pool, feats)
  factor = 0.5 if modulated else 1.0
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), factor * out, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(g).transpose(0, 3, 1, 2), factor * grad, rtol=1e-12)


def test_from_mmcv_deform_roi_pool_names_bad_entries():
  state = mmcv_pack_state(4, (3, 3), 6, modulated=True)
  fn = 'from_mmcv_deform_roi_pool'
  whole = {f'roi_layers.0.{k}': v for k, v in state.items()} | {'bbox_head.fc.weight': np.zeros(3)}
  pool = convert.from_mmcv_deform_roi_pool(whole, output_size=3, prefix='roi_layers.0.')  # the rest ignored
  assert pool.in_features == 4 and pool.offset_out.kernel.shape == (6, 18) and pool.mask_out.kernel.shape == (6, 9)
  assert pool.offset_hidden[0].kernel.dtype == jnp.float32
  with pytest.raises(ValueError, match=rf"{fn}: state has no 'offset_fc.0.weight'"):
    convert.from_mmcv_deform_roi_pool({}, output_size=3)
  with pytest.raises(ValueError, match=rf"{fn}: state has no 'mask_fc.2.bias'"):
    convert.from_mmcv_deform_roi_pool({k: v for k, v in state.items() if k != 'mask_fc.2.bias'}, output_size=3)
  with pytest.raises(ValueError, match=rf"{fn}: state entries the layer has no parameter for: \['offset_fc.6.weight'\]"):
    convert.from_mmcv_deform_roi_pool(state | {'offset_fc.6.weight': np.zeros((2, 2))}, output_size=3)
  with pytest.raises(ValueError, match=rf"{fn}: 'offset_fc.4.weight' must have shape \(8, 6\), got \(18, 6\)"):
    convert.from_mmcv_deform_roi_pool(state, output_size=(2, 2))  # 36 inputs: 9 channels of 2x2 bins, wrong heads
  with pytest.raises(ValueError, match=rf"{fn}: 'offset_fc.0.weight' reads 36 features, which is not output_size "
                                       r'5x5 = 25 bins'):
    convert.from_mmcv_deform_roi_pool(state, output_size=5)
  with pytest.raises(ValueError, match=rf"{fn}: 'mask_fc.0.weight' must have shape \(6, 36\), got \(6, 35\)"):
    convert.from_mmcv_deform_roi_pool(state | {'mask_fc.0.weight': np.zeros((6, 35))}, output_size=3)


def test_modulation_choice_and_flags_are_checked():
  """`modulation='sigmoid'` (mmcv's) makes a fresh modulated layer half of RoIAlign; the default 2*sigmoid is
  RoIAlign. Unknown choices and non-bool flags are refused when the layer is built."""
  feats, rois = features(), jnp.asarray(ROIS[:3])
  run = nnx.jit(lambda m, f, r: m(f, r, return_sampling=True))
  outs = {}
  for modulation, fresh_mask in (('2sigmoid', 1.0), ('sigmoid', 0.5)):
    pool = DeformRoIPool(C, 2, hidden_features=(4,), modulated=True, modulation=modulation, param_dtype=jnp.float64,
                         rngs=nnx.Rngs(0))
    outs[modulation], (_, mask) = run(pool, feats, rois)
    np.testing.assert_array_equal(np.asarray(mask), fresh_mask)
  # The same parameters (same seed): only the mask differs. (The 2*sigmoid layer is RoIAlign: tests/test_nn.py.)
  np.testing.assert_allclose(np.asarray(outs['sigmoid']), 0.5 * np.asarray(outs['2sigmoid']), rtol=1e-15)
  assert inspect.signature(DeformRoIPool.__init__).parameters['modulation'].default == '2sigmoid'
  with pytest.raises(ValueError, match=r"DeformRoIPool: modulation must be one of \('2sigmoid', 'sigmoid'\), got "
                                       "'tanh'"):
    DeformRoIPool(C, 2, modulated=True, modulation='tanh', rngs=nnx.Rngs(0))
  for flag in ('aligned', 'modulated'):
    with pytest.raises(TypeError, match=f'DeformRoIPool: {flag} must be a bool, got 1'):
      DeformRoIPool(C, 2, **{flag: 1}, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=f"DeformRoIPool: {flag} must be a bool, got 'yes'"):
      dlinen.DeformRoIPool(2, hidden_features=(4,), **{flag: 'yes'}).init(jax.random.key(0), feats, rois)
  with pytest.raises(ValueError, match='DeformRoIPool: modulation must be one of'):
    dlinen.DeformRoIPool(2, hidden_features=(4,), modulated=True, modulation=None).init(jax.random.key(0), feats, rois)
