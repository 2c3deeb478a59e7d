"""Multi-scale deformable attention (Deformable DETR) on the shared sampling core.

The layout is mmcv's and transformers' `multi_scale_deformable_attention`, so
that sampling locations, attention weights and checkpoints carry over: value
`[N, sum(H_l*W_l), M, D]` with the levels concatenated row-major, locations
`[N, Lq, M, L, P, 2]` as (x, y) normalised to [0, 1] with
`grid_sample(align_corners=False)`'s meaning (pixel = loc*size - 0.5), weights
`[N, Lq, M, L, P]`, output `[N, Lq, M*D]` (channel `m*D + d`). A point outside
its level reads 0, and corners outside it contribute 0 (torchvision's rule,
which is `grid_sample`'s `padding_mode='zeros'`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deformjax.ops import _args, _engine, _geometry, _policy

_FN = 'ms_deform_attn'


def level_shapes(spatial_shapes: Sequence[tuple[int, int]] | np.ndarray | jax.Array,
                 fn: str = _FN) -> tuple[tuple[int, int], ...]:
  """`spatial_shapes` (a sequence of (H_l, W_l), or a concrete `[L, 2]` integer array) as a tuple of int pairs.

  >>> level_shapes([(4, 6), (2, 3)])
  ((4, 6), (2, 3))
  """
  if isinstance(spatial_shapes, jax.core.Tracer):
    raise TypeError(f'{fn}: spatial_shapes must be static (a sequence of (H_l, W_l) or a concrete array), '
                    'got a traced array; pass it as a Python sequence outside jit')
  try:
    shapes = np.asarray(spatial_shapes)
  except (TypeError, ValueError):
    shapes = None
  if shapes is None or shapes.ndim != 2 or shapes.shape[1] != 2 or shapes.shape[0] < 1 or (
      shapes.size and not np.issubdtype(shapes.dtype, np.integer)) or (shapes < 1).any():
    raise ValueError(f'{fn}: spatial_shapes must be a non-empty sequence of (H_l, W_l) pairs of positive ints, '
                     f'got {spatial_shapes!r}'[:300])
  return tuple((int(h), int(w)) for h, w in shapes)


def _check_args(value, spatial_shapes, sampling_locations, attention_weights, chunk_size, memory_budget,
                deterministic_gradients) -> tuple[jax.Array, jax.Array, jax.Array, tuple[tuple[int, int], ...]]:
  """Arrays, dtypes, shapes and scalar arguments, each refused by name; returns the arrays and the level shapes."""
  value, sampling_locations, attention_weights = (
      _args.as_array(a, name, _FN) for a, name in zip((value, sampling_locations, attention_weights),
                                                      ('value', 'sampling_locations', 'attention_weights')))
  for a, name in ((value, 'value'), (sampling_locations, 'sampling_locations'),
                  (attention_weights, 'attention_weights')):
    _args.check_floating(a, name, _FN)
  if np.ndim(value) == 3 and np.ndim(sampling_locations) == 6:  # heads not split: transformers' value_proj output
    raise ValueError(f'{_FN}: value must have shape [N, sum(H_l*W_l), M, D], got {tuple(np.shape(value))}: a '
                     f'[N, S, M*D] value becomes it by value.reshape(N, S, {np.shape(sampling_locations)[2]}, -1)')
  _args.check_rank(value, 4, 'value', '[N, sum(H_l*W_l), M, D]', _FN)
  shapes = level_shapes(spatial_shapes, _FN)
  n, s, heads, _ = value.shape
  rows = sum(h * w for h, w in shapes)
  if s != rows:
    raise ValueError(f'{_FN}: value must have shape [N, sum(H_l*W_l), M, D] = [N, {rows}, M, D] for spatial_shapes '
                     f'{shapes}, got {tuple(value.shape)}')
  _args.check_rank(sampling_locations, 6, 'sampling_locations', '[N, Lq, M, L, P, 2]', _FN)
  lq, points = sampling_locations.shape[1], sampling_locations.shape[4]
  _args.check_shape(sampling_locations, (n, lq, heads, len(shapes), points, 2), 'sampling_locations',
                    '[N, Lq, M, L, P, 2]', _FN)
  _args.check_shape(attention_weights, (n, lq, heads, len(shapes), points), 'attention_weights', '[N, Lq, M, L, P]',
                    _FN)
  _args.check_policy(chunk_size, memory_budget, deterministic_gradients, _FN)
  return value, sampling_locations, attention_weights, shapes


@dataclasses.dataclass(frozen=True)
class _LevelsGeometry(_geometry.Geometry):
  """An `ms_deform_attn` call's geometry: the images, queries, heads and points, and the levels' `(H_l, W_l)`, read
  by the corners as per-level arrays broadcasting against points `[count, M, L, P]`."""

  n: int
  lq: int
  heads: int
  points: int
  shapes: tuple[tuple[int, int], ...]

  def _per_level(self, values: np.ndarray) -> np.ndarray:
    """`[L]` values as `[1, 1, L, 1]` in the index dtype: full rank, so they broadcast without rank promotion."""
    return values.astype(self.idx_dtype)[None, None, :, None]

  @property
  def height(self) -> np.ndarray:
    return self._per_level(np.asarray(self.shapes, np.int64)[:, 0])

  @property
  def width(self) -> np.ndarray:
    return self._per_level(np.asarray(self.shapes, np.int64)[:, 1])

  @property
  def start(self) -> np.ndarray:
    """Each level's first row in an image's `sum(H_l*W_l)` rows."""
    sizes = np.asarray(self.shapes, np.int64).prod(axis=1)
    return self._per_level(np.concatenate([[0], np.cumsum(sizes)[:-1]]))

  @property
  def rows_per_image(self) -> int:
    return sum(h * w for h, w in self.shapes)


def _levels_geometry(value: jax.Array, shapes: tuple[tuple[int, int], ...], sampling_locations: jax.Array,
                     attention_weights: jax.Array) -> _LevelsGeometry:
  """The call's `_LevelsGeometry`: the result `[N, Lq, M*D]` in `value.dtype`, summed in at least float32; empty
  when there is no query or nothing to sample; int64 table rows (or the error that asks for them) past 2**31."""
  n, s, heads, d = value.shape
  lq, points = sampling_locations.shape[1], sampling_locations.shape[4]
  cdtype = _args.coordinate_dtype(sampling_locations.dtype, attention_weights.dtype, value.dtype)
  return _LevelsGeometry(out_shape=(n, lq, heads * d), out_dtype=np.dtype(value.dtype),
                 acc_dtype=_args.promote(value.dtype, jnp.float32), cdtype=cdtype,
                 **_geometry.extent(n * lq, points * heads * d, n * s * heads, _FN),
                 n=n, lq=lq, heads=heads, points=points, shapes=shapes)


def _corners(levels: _LevelsGeometry, start, count, locations, weights):
  """Corner rows and weights `[count*M*L*P]` of queries `start..start+count` (over N*Lq)."""
  cdtype, idx_dtype = levels.cdtype, levels.idx_dtype
  q = start + jnp.arange(count, dtype=idx_dtype)
  # Padding queries past the end reuse the last image; their outputs are sliced off.
  img = jnp.minimum(q // levels.lq, levels.n - 1)
  loc = locations.astype(cdtype)
  height, width = levels.height, levels.width
  x = loc[..., 0] * width.astype(cdtype) - 0.5
  y = loc[..., 1] * height.astype(cdtype) - 0.5
  idx, wts = _engine.bilinear_corners(y, x, height, width, idx_dtype)
  base = (img * levels.rows_per_image)[:, None, None, None] + levels.start
  rows = _engine.corner_rows(idx, base, levels.heads, jnp.arange(levels.heads, dtype=idx_dtype)[None, :, None, None])
  return rows, tuple((wt * weights.astype(cdtype)).reshape(-1) for wt in wts)


def _plan(levels: _LevelsGeometry, value: jax.Array, locations: jax.Array, weights: jax.Array, *,
          deterministic_gradients: bool, chunk_size: int | None, memory_budget: int | None) -> jax.Array:
  """The weighted samples of each head summed, in passes over the `N*Lq` queries: `[N, Lq, M*D]` in `value.dtype`."""
  n, s, heads, d = value.shape
  lq, num_levels = levels.lq, len(levels.shapes)
  table = value.reshape(n * s * heads, d).astype(levels.acc_dtype)
  out = _engine.summed_passes(
      functools.partial(_corners, levels), (locations.reshape(n * lq, heads, num_levels, levels.points, 2),
                                            weights.reshape(n * lq, heads, num_levels, levels.points)),
      table, groups=heads, points=num_levels * levels.points, pixels=n * lq, idx_dtype=levels.idx_dtype,
      coord_dtype=levels.cdtype, deterministic_gradients=deterministic_gradients, chunk_size=chunk_size,
      memory_budget=memory_budget)
  return out.reshape(levels.out_shape).astype(levels.out_dtype)


def ms_deform_attn(
    value: jax.Array,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    *,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    deterministic_gradients: bool = False,
) -> jax.Array:
  """Multi-scale deformable attention (Deformable DETR), with mmcv's and transformers' layout.

  `out[n, q, m*D + d] = sum_{l, p} attention_weights[n, q, m, l, p] *
  value_l[n, y, x, m, d]` sampled bilinearly at `x = loc_x * W_l - 0.5`,
  `y = loc_y * H_l - 0.5` for `(loc_x, loc_y) = sampling_locations[n, q, m, l, p]`,
  where `value_l` is level l's `[H_l, W_l]` slice of `value`. Out-of-level
  corners read 0; non-finite or huge locations read 0 with zero gradient.

  Args:
    value: `[N, sum(H_l*W_l), M, D]`: the levels' `H_l x W_l` maps flattened
      row-major and concatenated in order, `M` heads of `D` channels.
    spatial_shapes: the static `(H_l, W_l)` of the `L` levels (a sequence, or a
      concrete `[L, 2]` integer array such as transformers passes).
    sampling_locations: `[N, Lq, M, L, P, 2]`, (x, y) in [0, 1]
      (`align_corners=False`).
    attention_weights: `[N, Lq, M, L, P]`, used as given (the layer applies the
      softmax over `L*P`).
    chunk_size: most queries (over `N*Lq`) per pass, as in `deform_conv2d`.
    memory_budget: most bytes of sampled values per pass, as in `deform_conv2d`.
    deterministic_gradients: bit-identical gradients on GPU/TPU (reverse mode only), as in `deform_conv2d`.

  Returns:
    `[N, Lq, M*D]` in `value.dtype`, accumulated in float32 (float64 for
    float64 values).

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.ops import ms_deform_attn
    >>> shapes = [(4, 4), (2, 2)]
    >>> value = jnp.ones((1, 4 * 4 + 2 * 2, 2, 8))
    >>> loc = jnp.full((1, 5, 2, 2, 3, 2), 0.5)
    >>> out = ms_deform_attn(value, shapes, loc, jnp.full((1, 5, 2, 2, 3), 1 / 6))
    >>> out.shape, round(float(out[0, 0, 0]), 6)
    ((1, 5, 16), 1.0)
  """
  value, sampling_locations, attention_weights, shapes = _check_args(value, spatial_shapes, sampling_locations,
                                                                     attention_weights, chunk_size, memory_budget,
                                                                     deterministic_gradients)
  levels = _levels_geometry(value, shapes, sampling_locations, attention_weights)
  if levels.empty:
    return _geometry.empty_result(levels)
  return _ms_deform_attn(value, sampling_locations, attention_weights, levels=levels, chunk_size=chunk_size,
                         memory_budget=memory_budget, deterministic_gradients=bool(deterministic_gradients))


@_policy.jit_core('levels', 'chunk_size', 'memory_budget', 'deterministic_gradients')
def _ms_deform_attn(value, sampling_locations, attention_weights, *, levels: _LevelsGeometry, chunk_size,
                    memory_budget, deterministic_gradients):
  """`ms_deform_attn` on checked arguments, one compiled program per geometry and settings."""
  return _plan(levels, value, sampling_locations, attention_weights, deterministic_gradients=deterministic_gradients,
               chunk_size=chunk_size, memory_budget=memory_budget)


__all__ = ['level_shapes', 'ms_deform_attn']
