"""Sampling-location tracing, effective dilation and the figures."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformjax.models import ConvClassifier
from deformjax.viz import (
  LayerField,
  draw_offset_fields,
  draw_sampling_locations,
  effective_dilation,
  layer_fields,
  tap_grid,
  trace_sampling_points,
)


def field(offsets=None):
  return LayerField('l', (3, 3), (1, 1), (1, 1), offsets, None)


def test_regular_trace_is_the_stacked_grid():
  pts = trace_sampling_points([field(), field(), field()], (3.0, 3.0))
  assert [len(p) for p in pts] == [9, 81, 729]
  np.testing.assert_array_equal(pts[0], np.asarray((3.0, 3.0)) + tap_grid((3, 3), (1, 1), (1, 1)))
  assert pts[2][:, 0].min() == 0.0 and pts[2][:, 0].max() == 6.0  # 3 layers of 3x3 reach +-3


def test_trace_follows_offsets_read_at_fractional_positions():
  off = np.zeros((1, 7, 7, 18))
  off[..., 0::2] = 0.5  # every tap moves down half a pixel
  pts = trace_sampling_points([field(off), field(off)], (3.0, 3.0))
  np.testing.assert_allclose(pts[0][:, 0].mean(), 3.5)
  np.testing.assert_allclose(pts[1][:, 0].mean(), 4.0)  # the second layer's offsets read bilinearly at y+.5


def test_effective_dilation():
  assert effective_dilation(field()) == 1.0
  grid = tap_grid((3, 3), (1, 1), (1, 1)).reshape(-1).astype(float)
  doubled = np.broadcast_to(grid, (1, 7, 7, 18)).copy()  # offsets equal to the grid double every distance
  assert abs(effective_dilation(field(doubled)) - 2.0) < 1e-12
  where = np.zeros((7, 7), bool)
  where[2, 2] = True
  half = doubled.copy()
  half[0, 2, 2] = -0.5 * grid
  assert abs(effective_dilation(field(half), where=where) - 0.5) < 1e-12


def test_layer_fields_and_figures_from_a_model(tmp_path):
  model = ConvClassifier(1, 10, deformable=2, modulated=True, rngs=nnx.Rngs(0))
  for conv in list(model.convs)[-2:]:
    conv.offset_conv.kernel[...] = 0.05 * jnp.ones_like(conv.offset_conv.kernel[...])
  image = np.random.default_rng(0).uniform(size=(28, 28, 1)).astype(np.float32)
  fields = layer_fields(model, jnp.asarray(image[None]))
  assert [f.offsets is not None for f in fields] == [False, False, False, True, True]
  assert fields[-1].offsets.shape == (1, 7, 7, 18) and fields[-1].mask.shape == (1, 7, 7, 9)
  assert not any(c.sow_offsets for c in list(model.convs)[-2:])  # restored after the capture
  pts = draw_sampling_locations(model, image, tmp_path / 's.png', depth=3)
  assert [len(p) for p in pts['deformed']] == [9, 81, 729]
  assert not np.allclose(pts['deformed'][0], pts['regular'][0])
  draw_offset_fields(fields, tmp_path / 'f.png')
  for name in ('s.png', 'f.png'):
    data = (tmp_path / name).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000
