"""bilinear_sample against the float64 reference, its boundary rule, and properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from deformjax.ops import bilinear_sample
from tests.reference import bilinear_sample_ref


def rand(shape, seed=0, low=None, high=None):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape) if low is None else rng.uniform(low, high, size=shape)


@pytest.mark.parametrize('shape', [(2, 5, 7, 3), (1, 1, 1, 1), (3, 4, 2, 5)])
@pytest.mark.parametrize('jit', [False, True])
def test_matches_reference_float64(shape, jit):
  b, h, w, _ = shape
  img = jnp.asarray(rand(shape))
  # Range reaches well past every border, so outside points and partial corners are covered.
  coords = jnp.asarray(np.stack([rand((b, 40), 1, -2.5, h + 1.5), rand((b, 40), 2, -2.5, w + 1.5)], -1))
  f = jax.jit(bilinear_sample) if jit else bilinear_sample
  got = f(img, coords)
  np.testing.assert_allclose(np.asarray(got), bilinear_sample_ref(np.asarray(img), np.asarray(coords)), atol=1e-12)


def test_float32_and_low_precision():
  img64 = rand((2, 6, 6, 4))
  coords = np.stack([rand((2, 30), 1, -2, 7), rand((2, 30), 2, -2, 7)], -1)
  want = bilinear_sample_ref(img64, coords)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2), (jnp.float16, 3e-3)):
    got = bilinear_sample(jnp.asarray(img64, dtype), jnp.asarray(coords, jnp.float32))
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float64)), want, atol=tol * 4, rtol=tol)


def test_leading_batch_dims_and_vmap():
  img = jnp.asarray(rand((2, 3, 5, 5, 2)))
  coords = jnp.asarray(rand((2, 3, 7, 2), 1, -1, 5))
  got = bilinear_sample(img, coords)
  assert got.shape == (2, 3, 7, 2)
  per_image = jax.vmap(jax.vmap(bilinear_sample))(img[:, :, None], coords[:, :, None])[:, :, 0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(per_image), atol=1e-12)


def test_torchvision_boundary_rule():
  img = jnp.ones((1, 4, 4, 1))
  pts = jnp.asarray([[[-1.0, 1.0], [4.0, 1.0], [1.0, -1.0], [1.0, 4.0], [-0.5, 1.0], [3.5, 3.0], [-0.999, 0.0]]])
  got = np.asarray(bilinear_sample(img, pts))[0, :, 0]
  np.testing.assert_allclose(got, [0, 0, 0, 0, 0.5, 0.5, 0.001], atol=1e-12)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf, 1e30, -1e30, 3e9])
def test_non_finite_and_huge_coords_read_zero_with_zero_grad(bad):
  img = jnp.asarray(rand((1, 4, 4, 2)))
  coords = jnp.asarray([[[bad, 1.0], [1.5, bad], [1.5, 1.5]]])
  out = bilinear_sample(img, coords)
  np.testing.assert_array_equal(np.asarray(out[0, :2]), 0)
  g_img, g_coords = jax.grad(lambda i, c: jnp.sum(bilinear_sample(i, c) ** 2), argnums=(0, 1))(img, coords)
  assert np.all(np.isfinite(np.asarray(g_img)))
  np.testing.assert_array_equal(np.asarray(g_coords[0, :2]), 0)


def test_gradients_order2():
  img = jnp.asarray(rand((2, 5, 5, 3)))
  # Points >= 0.2 px from integers: bilinear has kinks on the integer grid.
  whole = np.random.default_rng(3).integers(-1, 5, size=(2, 6, 2))
  coords = jnp.asarray(whole + rand((2, 6, 2), 4, 0.2, 0.8))
  check_grads(jax.jit(bilinear_sample), (img, coords), order=2, modes=('fwd', 'rev'))


def test_empty_inputs():
  assert bilinear_sample(jnp.zeros((0, 4, 4, 2)), jnp.zeros((0, 5, 2))).shape == (0, 5, 2)
  assert bilinear_sample(jnp.zeros((2, 4, 4, 2)), jnp.zeros((2, 0, 2))).shape == (2, 0, 2)
  np.testing.assert_array_equal(np.asarray(bilinear_sample(jnp.zeros((1, 0, 4, 2)), jnp.ones((1, 3, 2)))), 0)


@pytest.mark.parametrize(
    'images,coords,message',
    [
        ((4, 4), (1, 2), r'images must have shape \[\.\.\., H, W, C\]'),
        ((1, 4, 4, 2), (1, 3, 3), r'coords must have shape \[\.\.\., P, 2\], got \(1, 3, 3\)'),
        ((2, 4, 4, 2), (3, 5, 2), r"coords must have shape \(2, 'P', 2\)"),
    ],
)
def test_bad_shapes(images, coords, message):
  with pytest.raises(ValueError, match=message):
    bilinear_sample(jnp.zeros(images), jnp.zeros(coords))


def test_integer_images_rejected():
  with pytest.raises(TypeError, match='images must be a floating-point array'):
    bilinear_sample(jnp.zeros((1, 4, 4, 1), jnp.int32), jnp.zeros((1, 1, 2)))


images_st = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(images_st, st.lists(st.tuples(st.integers(-3, 8), st.integers(-3, 8)), min_size=1, max_size=12))
def test_integer_coords_equal_indexing(spec, points):
  h, w, c, seed = spec
  img = rand((1, h, w, c), seed)
  coords = jnp.asarray([points], jnp.float64)
  got = np.asarray(bilinear_sample(jnp.asarray(img), coords))[0]
  for (y, x), value in zip(points, got):
    want = img[0, y, x] if 0 <= y < h and 0 <= x < w else np.zeros(c)
    np.testing.assert_array_equal(value, want)


@settings(max_examples=40, deadline=None)
@given(
    images_st,
    st.integers(0, 4),
    st.integers(0, 4),
    st.lists(st.tuples(st.floats(-3, 9), st.floats(-3, 9)), min_size=1, max_size=12),
)
def test_whole_pixel_translation_equals_shifted_image(spec, ty, tx, points):
  """Sampling an image at p equals sampling it, embedded at (ty, tx) in a zero canvas, at p + (ty, tx)."""
  h, w, c, seed = spec
  img = rand((1, h, w, c), seed)
  canvas = np.zeros((1, h + 8, w + 8, c))
  canvas[0, ty:ty + h, tx:tx + w] = img[0]
  coords = np.asarray([points], np.float64)
  got = bilinear_sample(jnp.asarray(canvas), jnp.asarray(coords + np.array([ty, tx], np.float64)))
  want = bilinear_sample(jnp.asarray(img), jnp.asarray(coords))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(images_st, st.floats(-3, 9), st.floats(-3, 9))
def test_sampling_is_linear_in_the_image(spec, y, x):
  h, w, c, seed = spec
  a, b = rand((1, h, w, c), seed), rand((1, h, w, c), seed + 1)
  coords = jnp.asarray([[[y, x]]], jnp.float64)
  lhs = bilinear_sample(jnp.asarray(2.0 * a - b), coords)
  rhs = 2.0 * bilinear_sample(jnp.asarray(a), coords) - bilinear_sample(jnp.asarray(b), coords)
  np.testing.assert_allclose(np.asarray(lhs), np.asarray(rhs), atol=1e-12)
