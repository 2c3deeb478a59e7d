"""ms_deform_attn against the float64 loop reference, a weighted gather at pixel centres, and its layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformjax.ops import ms_deform_attn
from tests.reference import ms_deform_attn_ref

SHAPES = [
    ((4, 5), (2, 3)),
    ((6, 6),),
    ((5, 3), (3, 2), (1, 1)),
]


def make_inputs(shapes, n=2, lq=7, heads=2, d=3, points=3, dtype=jnp.float64, seed=0, spread=0.2):
  rng = np.random.default_rng(seed)
  rows = sum(h * w for h, w in shapes)
  value = rng.normal(size=(n, rows, heads, d))
  # Locations a little outside [0, 1] too: those corners read 0.
  loc = rng.uniform(-spread, 1 + spread, size=(n, lq, heads, len(shapes), points, 2))
  attn = rng.uniform(-0.5, 1.5, size=(n, lq, heads, len(shapes), points))
  return tuple(jnp.asarray(a, dtype) for a in (value, loc, attn))


@pytest.mark.parametrize('shapes', SHAPES, ids=str)
@pytest.mark.parametrize('dims', [dict(), dict(heads=1, d=1, points=1), dict(n=1, lq=1, heads=3, points=4)], ids=str)
def test_matches_float64_reference(shapes, dims):
  value, loc, attn = make_inputs(shapes, **dims)
  got = jax.jit(lambda *a: ms_deform_attn(a[0], shapes, *a[1:]))(value, loc, attn)
  assert got.dtype == jnp.float64 and got.shape == (value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
  np.testing.assert_allclose(np.asarray(got), ms_deform_attn_ref(value, shapes, loc, attn), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('shapes', SHAPES[:1], ids=str)
def test_float32_matches_reference(shapes):
  value, loc, attn = make_inputs(shapes, dtype=jnp.float32)
  got = ms_deform_attn(value, shapes, loc, attn)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ms_deform_attn_ref(value, shapes, loc, attn), rtol=1e-5, atol=1e-5)


def test_pixel_centres_are_a_weighted_gather():
  """loc = (x + 0.5) / W_l, (y + 0.5) / H_l reads value_l[y, x] exactly: align_corners=False."""
  shapes = ((4, 5), (2, 3))
  value, _, attn = make_inputs(shapes, n=1, lq=4, heads=2, points=2)
  rng = np.random.default_rng(3)
  pix = [np.stack([rng.integers(0, w, size=(1, 4, 2, 2)), rng.integers(0, h, size=(1, 4, 2, 2))], -1)
         for h, w in shapes]
  loc = np.stack([(p + 0.5) / np.array([w, h]) for p, (h, w) in zip(pix, shapes)], axis=3)
  got = ms_deform_attn(value, shapes, jnp.asarray(loc), attn)
  starts = [0, 20]
  want = np.zeros((1, 4, 2, 3))
  for q in range(4):
    for m in range(2):
      for lvl, (_, w) in enumerate(shapes):
        for p in range(2):
          x, y = pix[lvl][0, q, m, p]
          want[0, q, m] += float(attn[0, q, m, lvl, p]) * np.asarray(value[0, starts[lvl] + y * w + x, m])
  np.testing.assert_allclose(np.asarray(got), want.reshape(1, 4, 6), rtol=1e-12, atol=1e-12)


def test_levels_are_concatenated_row_major_and_heads_interleave_in_the_output():
  """Level 1's pixel (y, x) is row H0*W0 + y*W1 + x; head m fills output channels m*D .. (m+1)*D."""
  shapes = ((2, 2), (2, 3))
  value = jnp.zeros((1, 10, 2, 1)).at[0, 4 + 1 * 3 + 2, 1, 0].set(5.0)
  loc = jnp.full((1, 1, 2, 2, 1, 2), 0.5).at[0, 0, :, 1, 0].set(jnp.array([(2 + 0.5) / 3, (1 + 0.5) / 2]))
  out = ms_deform_attn(value, shapes, loc, jnp.ones((1, 1, 2, 2, 1)))
  np.testing.assert_array_equal(np.asarray(out), [[[0.0, 5.0]]])


def test_points_outside_a_level_read_zero():
  shapes = ((3, 3),)
  value = jnp.ones((1, 9, 1, 1))
  # Pixel -1 and pixel 3 (just outside), and the border halfway out.
  loc = jnp.broadcast_to(jnp.array([-0.5 / 3, 3.5 / 3, 0.0]).reshape(1, 3, 1, 1, 1, 1), (1, 3, 1, 1, 1, 2))
  out = ms_deform_attn(value, shapes, loc, jnp.ones((1, 3, 1, 1, 1)))
  np.testing.assert_allclose(np.asarray(out)[0, :, 0], [0.0, 0.0, 0.25])


def test_spatial_shapes_as_an_array():
  shapes = ((4, 5), (2, 3))
  value, loc, attn = make_inputs(shapes)
  a = ms_deform_attn(value, shapes, loc, attn)
  b = ms_deform_attn(value, np.asarray(shapes), loc, attn)
  c = ms_deform_attn(value, jnp.asarray(shapes), loc, attn)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
