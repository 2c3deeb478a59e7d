"""roi_align / deform_roi_pool against the float64 loop reference."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from deformjax.ops import deform_roi_pool, roi_align
from tests.reference import deform_roi_pool_ref

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
