"""The sampling engine every op runs on: bilinear corners, gathered sums, their gradients, and the passes.

An op describes its sample points as flat table rows and bilinear weights (`corners`), and what it makes of the
gathered values (`contract`: a kernel contraction, or `sum_points`); `run_passes` runs that over the output pixels
in passes chosen per backend (`_policy`). `bilinear_corners` is the one boundary rule (torchvision's), so every op
agrees on it to the last bit.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike

from deformjax.ops import _args, _policy

_Arrays = tuple[jax.Array, ...]
# (rows, weights): the flat corner rows and bilinear weights of sample points, one array per corner.
_Corners = tuple[_Arrays, _Arrays]

# Bytes of precomputed corner rows + weights made at once by `run_passes`: past
# it the corners are made per block of chunks inside an outer loop.
INDEX_BLOCK_BYTES = 64 * 1024 * 1024


def floor_and_fractions(y: jax.Array, x: jax.Array, idx_dtype: DTypeLike) -> tuple[jax.Array, ...]:
  """Integer top-left corner (y0, x0) and the bilinear fractions (ly, lx, 1-ly, 1-lx) of points
  already brought into a safe range."""
  y0 = jnp.floor(y)
  x0 = jnp.floor(x)
  ly = y - y0
  lx = x - x0
  return y0.astype(idx_dtype), x0.astype(idx_dtype), ly, lx, 1.0 - ly, 1.0 - lx


def bilinear_corners(y: jax.Array, x: jax.Array, height: int | np.ndarray, width: int | np.ndarray,
                     idx_dtype: DTypeLike = np.int32) -> _Corners:
  """Flat corner indices and bilinear weights for points (y, x) in an H x W image.

  Args:
    y, x: float arrays of the same shape `S`, pixel units (row, column).
    height, width: image size: ints, or integer arrays broadcasting against
      `S` (one size per level of a pyramid sampled at once).
    idx_dtype: dtype of the returned indices.

  Returns:
    `(indices, weights)`: two 4-tuples of arrays of shape `S`, one per corner
    (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1). A corner outside the image
    has weight 0 and index 0, so gathering with these indices is always in
    bounds and an out-of-image point (y <= -1, y >= H, x <= -1 or x >= W) reads
    exactly 0, as in torchvision. Non-finite points read 0 with zero gradient.
    The corners stay separate arrays (not stacked on a new axis) so that XLA
    fuses each into its gather rather than materialising a stacked index buffer.
  """
  finite = jnp.isfinite(y) & jnp.isfinite(x)
  # The sizes and the largest in-range coordinates: traced (symbolic sizes), numpy (per-level sizes) or Python.
  h: int | np.ndarray | jax.Array
  w: int | np.ndarray | jax.Array
  y_max: float | np.ndarray | jax.Array
  x_max: float | np.ndarray | jax.Array
  if _args.is_symbolic(height, width):
    # Sizes exported as symbolic dimensions: turned into traced scalars.
    h, w = jnp.asarray(height, idx_dtype), jnp.asarray(width, idx_dtype)
    y_max, x_max = (h + 1).astype(y.dtype), (w + 1).astype(y.dtype)
  elif np.ndim(height) or np.ndim(width):
    # Per-point sizes broadcasting against y, x (the levels of a feature pyramid).
    h, w = np.asarray(height, idx_dtype), np.asarray(width, idx_dtype)
    y_max, x_max = np.asarray(h + 1, y.dtype), np.asarray(w + 1, y.dtype)
  else:
    h, w = height, width
    y_max, x_max = height + 1.0, width + 1.0
  # Points at or beyond -1 / H read zero anyway; clipping to just past that keeps
  # floor() and the integer cast in range for 1e30 and inf, without changing any value.
  y = jnp.clip(jnp.where(finite, y, -2.0), -2.0, y_max)
  x = jnp.clip(jnp.where(finite, x, -2.0), -2.0, x_max)
  y0i, x0i, ly, lx, hy, hx = floor_and_fractions(y, x, idx_dtype)
  indices, weights = [], []
  for dy, dx, wt in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
    yy = y0i + dy
    xx = x0i + dx
    valid = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    indices.append(jnp.where(valid, yy * w + xx, 0))
    weights.append(jnp.where(valid, wt, jnp.zeros_like(wt)))
  return tuple(indices), tuple(weights)


def _gather_sum(table: jax.Array, indices, weights) -> jax.Array:
  """sum_c weights[c] * table[indices[c]] as `[M, F]`, indices/weights flat `[M]`."""
  terms = [table.at[idx].get(mode='promise_in_bounds') * w[:, None].astype(table.dtype)
           for idx, w in zip(indices, weights)]
  return functools.reduce(operator.add, terms)


def sorted_segment_sum(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """`jax.ops.segment_sum` with a result that does not depend on execution order.

  Rows of `values` `[M, F]` are summed into `[num_segments, F]` by
  `segment_ids` `[M]` (any order; ids outside `[0, num_segments)` are dropped).
  A stable sort groups equal ids, a segmented inclusive `lax.associative_scan`
  sums each group in a fixed tree order, and the last row of each group is
  written with a scatter whose targets are unique. No atomics: the result is
  bit-identical run to run on GPU, unlike XLA's scatter-add there.
  """
  m, f = values.shape
  if m == 0:
    return jnp.zeros((num_segments, f), values.dtype)
  order = lax.iota(segment_ids.dtype, m)
  keys, order = lax.sort((segment_ids, order), num_keys=1, is_stable=True)
  sorted_values = values.at[order].get(mode='promise_in_bounds')
  boundary = keys[1:] != keys[:-1]
  true = jnp.ones((1,), bool)
  starts = jnp.concatenate([true, boundary])
  ends = jnp.concatenate([boundary, true])

  def combine(a, b):
    (start_a, sum_a), (start_b, sum_b) = a, b
    return start_a | start_b, jnp.where(start_b[:, None], sum_b, sum_a + sum_b)

  _, sums = lax.associative_scan(combine, (starts, sorted_values))
  targets = jnp.where(ends, keys, num_segments)  # one writer per segment; the rest dropped
  return jnp.zeros((num_segments, f), values.dtype).at[targets].set(sums, mode='drop')


def sample_and_contract(contract: Callable[..., jax.Array], table: jax.Array, indices: _Arrays, weights: _Arrays,
                        kernel: jax.Array | None, *, compute_dtype: DTypeLike,
                        deterministic_gradients: bool = False) -> jax.Array:
  """`contract(sum_c weights[c] * table[indices[c]], kernel)`: one gather-then-contract pass.

  `table` `[rows, F]` (the accumulation dtype), `indices` / `weights` 4-tuples of
  flat `[M]` arrays, `contract(cols [M, F] in compute_dtype, kernel)`.

  By default JAX differentiates the ops, so every transform works (jvp too) and
  the table's gradient is XLA's scatter-add, which uses atomics on GPU. With
  `deterministic_gradients` the gradient is an explicit VJP (`jax.custom_vjp`: reverse mode
  only) whose table gradient is `sorted_segment_sum`, bit-identical run to run;
  it re-gathers the columns once for the kernel gradient and again, through
  indices XLA cannot merge with those, for the weight gradients.
  """
  if not deterministic_gradients:
    return contract(_gather_sum(table, indices, weights).astype(compute_dtype), kernel)
  return _sorted_pass(contract, np.dtype(compute_dtype), table, indices, weights, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sorted_pass(contract, compute_dtype, table, indices, weights, kernel):
  return contract(_gather_sum(table, indices, weights).astype(compute_dtype), kernel)


def _sorted_pass_fwd(contract, compute_dtype, table, indices, weights, kernel):
  return _sorted_pass(contract, compute_dtype, table, indices, weights, kernel), (table, indices, weights, kernel)


def _sorted_pass_bwd(contract, compute_dtype, res, g):
  table, indices, weights, kernel = res
  cols = _gather_sum(table, indices, weights).astype(compute_dtype)
  _, contract_vjp = jax.vjp(contract, cols, kernel)
  d_cols, d_kernel = contract_vjp(g)
  d_cols = d_cols.astype(table.dtype)
  # Indices XLA cannot identify with the ones above: a gather shared by the columns
  # and the weight gradients is materialised (four columns buffers); separate
  # gathers fuse into their reductions.
  fresh = lax.optimization_barrier(indices)
  d_weights = tuple(
      jnp.sum(table.at[i].get(mode='promise_in_bounds') * d_cols, axis=-1).astype(w.dtype)
      for i, w in zip(fresh, weights)
  )
  d_table = None
  for i, w in zip(indices, weights):  # corner by corner, in a fixed order
    part = sorted_segment_sum(w[:, None].astype(d_cols.dtype) * d_cols, i, table.shape[0])
    d_table = part if d_table is None else d_table + part
  return d_table, (None,) * len(indices), d_weights, d_kernel


_sorted_pass.defvjp(_sorted_pass_fwd, _sorted_pass_bwd)


def gather_corners(table: jax.Array, indices: _Arrays, weights: _Arrays, acc_dtype: DTypeLike) -> jax.Array:
  """sum_c weights[c] * table[indices[c]] -> `S + (table.shape[1],)`.

  `table` is `[rows, F]`; `indices` and `weights` are 4-tuples of arrays of
  shape `S`. Four row gathers with flat indices, summed elementwise: XLA fuses
  them into one loop writing only the `[prod(S), F]` result, never the 4x
  larger corner buffer, and the flat index keeps every gather's output in
  row-major layout (a singleton axis between S and F made XLA insert a
  transposing copy per corner: 3x slower on CPU).

  The table is read in `acc_dtype`, so under autodiff the scatter-add of the
  table's gradient accumulates in it too (float32 for bf16/f16 tables: exact
  to f32, and 3x faster on CPU than a bf16 scatter). Callers inside a loop
  should pass a table already in `acc_dtype`, so the cast is not repeated.
  """
  shape = indices[0].shape
  table = table.astype(acc_dtype)
  out = _gather_sum(table, tuple(i.reshape(-1) for i in indices), tuple(w.reshape(-1) for w in weights))
  return out.reshape(shape + (table.shape[1],))


def corner_rows(indices: _Arrays, base: jax.Array | int, groups: int = 1, group: jax.Array | int = 0) -> _Arrays:
  """Table rows of corner indices: `(base + index) * groups + group`, each flattened.

  `indices` are the in-image corner indices of `bilinear_corners` (shape `S`);
  `base` (the first row of the image or level, per point) and `group` broadcast
  against `S`. The table is `[images*pixels*groups, F]`: one row per pixel and
  channel group, as an NHWC array reshaped without a copy.
  """
  return tuple(((base + i) * groups + group).reshape(-1) for i in indices)


def output_pixels(start: jax.Array | int, count: int, n: int, out_hw: tuple[int, int],
                  idx_dtype: DTypeLike) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(image, row, column), each `[count]`, of the flat output pixels `start .. start+count` over `N*Ho*Wo`.

  Pixels past the end (the zero padding of the last chunk) reuse the last
  image, so their corner rows stay in bounds; their outputs are sliced off.
  """
  ho, wo = out_hw
  p = start + jnp.arange(count, dtype=idx_dtype)
  rem = p % (ho * wo)
  return jnp.minimum(p // (ho * wo), n - 1), rem // wo, rem % wo


def image_corners(y: jax.Array, x: jax.Array, weight: jax.Array | None, image: jax.Array, hw: tuple[int, int],
                  groups: int, group: jax.Array | int, idx_dtype: DTypeLike) -> _Corners:
  """Flat corner rows and weights of points (y, x) `[count, ...]` in images `image` `[count]`.

  The table is an `[N, H, W, C]` array seen as `[N*H*W*groups, C // groups]`;
  `group` (broadcasting against y) is each point's channel group, `weight`
  (same shape as y, or None) multiplies the bilinear weights (a mask).
  """
  h, w = hw
  idx, wts = bilinear_corners(y, x, h, w, idx_dtype)
  base = (image * (h * w)).reshape((-1,) + (1,) * (y.ndim - 1))
  if weight is not None:
    wts = tuple(wt * weight for wt in wts)
  return corner_rows(idx, base, groups, group), tuple(wt.reshape(-1) for wt in wts)


def sum_points(groups: int, points: int, cols: jax.Array, kernel: None = None) -> jax.Array:
  """The family's reduction: `[count*groups*points, F]` samples summed over the points of each group,
  -> `[count, groups*F]` (channel `g*F + f`). `kernel` is unused (the ops have no weights)."""
  del kernel
  f = cols.shape[-1]
  return cols.reshape(-1, groups, points, f).sum(axis=2).reshape(-1, groups * f)


def sampled_pass(contract: Callable[..., jax.Array], compute_dtype: DTypeLike, deterministic_gradients: bool,
                 table: jax.Array, kernel: jax.Array | None, corner_arrays: _Corners) -> jax.Array:
  """One pass of a sampling op: `contract(sum_c w[c] * table[rows[c]], kernel)` for `corner_arrays = (rows, w)`.

  With `deterministic_gradients`, lowerings for GPU/TPU take the sorted-segment-sum
  gradient (`sample_and_contract`); XLA:CPU's scatter is sequential, hence
  deterministic already, and keeps the plain one.
  """
  rows, weights = corner_arrays
  args = (table, rows, weights, kernel)
  plain = functools.partial(sample_and_contract, contract, compute_dtype=compute_dtype)
  if not deterministic_gradients:
    return plain(*args)
  return _policy.by_platform(plain, functools.partial(plain, deterministic_gradients=True), *args)


def _one_pass(corners, sample, pixels, arrays):
  # Corners at top level, computed once and kept for the backward pass; the
  # sampled values are rematerialised there instead of stored.
  return jax.checkpoint(sample)(corners(0, pixels, *arrays))


def _chunk_layout(pixels, cap: int, point_bytes: int):
  """(chunk, per_block, num_blocks): balanced chunks of at most `cap` pixels, grouped in blocks whose
  corner arrays fit `INDEX_BLOCK_BYTES`."""
  num_chunks = -(-pixels // cap)
  if _args.is_symbolic(pixels):
    # Over a symbolic count the corners of all chunks are made at once (one
    # block): the block count cannot be balanced.
    return cap, num_chunks, 1
  chunk = -(-pixels // num_chunks)  # balanced: the last chunk is not mostly padding
  per_block = max(1, min(num_chunks, INDEX_BLOCK_BYTES // max(1, chunk * point_bytes)))
  num_blocks = -(-num_chunks // per_block)
  return chunk, -(-num_chunks // num_blocks), num_blocks


def _chunked(corners, sample, pixels, cap: int, point_bytes: int, idx_dtype, arrays):
  chunk, per_block, num_blocks = _chunk_layout(pixels, cap, point_bytes)
  block = per_block * chunk
  padded = num_blocks * block
  pad_and_block = lambda a: jnp.pad(a, ((0, padded - pixels),) + ((0, 0),) * (a.ndim - 1)).reshape(
      (num_blocks, block) + a.shape[1:])
  blocks = jax.tree.map(pad_and_block, arrays)
  per_chunk = lambda corner_arrays: jax.tree.map(lambda a: a.reshape(per_block, -1), corner_arrays)
  # prevent_cse=False is safe inside lax.map (scan already keeps the
  # rematerialised body from being merged with the forward one).
  remat_chunk = jax.checkpoint(sample, prevent_cse=False)
  if num_blocks == 1:
    # All corners at top level: computed once and kept for the backward pass,
    # and 1.25x faster forward than inside an outer loop (measured, N=8 64x64x64).
    out = lax.map(remat_chunk, per_chunk(corners(0, block, *jax.tree.map(lambda a: a[0], blocks))))
  else:
    block_body = lambda xs: lax.map(remat_chunk, per_chunk(corners(xs[0] * block, block, *xs[1])))
    out = lax.map(jax.checkpoint(block_body, prevent_cse=False), (jnp.arange(num_blocks, dtype=idx_dtype), blocks))
  return out.reshape(padded, out.shape[-1])[:pixels]


def _passes(corners, sample, pixels, point_bytes: int, idx_dtype, cap: int, arrays):
  fits = _args.known_le(pixels, cap)
  if fits is None:
    # Symbolic batch: decided by the real shapes once the export is called
    # (shape refinement makes the predicate a constant that XLA folds).
    fits_at_run = jnp.asarray(pixels, np.int64 if idx_dtype == np.int64 else np.int32) <= cap
    return lax.cond(fits_at_run, functools.partial(_one_pass, corners, sample, pixels),
                    functools.partial(_chunked, corners, sample, pixels, cap, point_bytes, idx_dtype), arrays)
  if fits:
    return _one_pass(corners, sample, pixels, arrays)
  return _chunked(corners, sample, pixels, cap, point_bytes, idx_dtype, arrays)


def run_passes(
    corners: Callable[..., _Corners], sample: Callable[[_Corners], jax.Array], arrays: Any, *, pixels: int,
    bytes_per_pixel: int, point_bytes: int, idx_dtype: DTypeLike, chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> jax.Array:
  """The per-backend plan every sampling op runs on: `sample(corners(0, pixels, *arrays))`, in passes.

  Args:
    corners: `corners(start, count, *arrays_block) -> (rows, weights)`: the
      flat corner rows and weights (4-tuples, `count * points_per_pixel` each)
      of output pixels `start .. start+count`; past the last pixel the arrays
      are zero-padded, and `corners` must keep the rows in bounds there.
    sample: `sample((rows, weights)) -> [count, F]`, the sampled and reduced
      output of those pixels (typically a partial of `sampled_pass`).
    arrays: pytree of per-pixel arrays (leading axis `pixels`; None allowed).
    pixels: number of output pixels (may be a symbolic batch dimension).
    bytes_per_pixel: sampled-value bytes one pixel needs (the pass size unit).
    point_bytes: bytes of corner rows + weights per pixel (index blocking).
    idx_dtype: dtype of the rows.
    chunk_size, memory_budget: the ops' policy keywords (`_policy.pixels_per_pass`).

  Returns:
    `[pixels, F]`. On CPU cache-sized chunks walked by `lax.map`; on GPU/TPU
    one pass while it fits the memory budget, equal blocks beyond it; chosen
    at lowering time (`_policy.by_platform`) when the two plans differ.
  """
  caps = {where: _policy.pixels_per_pass(bytes_per_pixel, chunk_size, memory_budget, where)
          for where in ('cpu', 'accelerator')}
  plan = functools.partial(_passes, corners, sample, pixels, point_bytes, idx_dtype)
  same_structure = caps['cpu'] == caps['accelerator'] or (
      _args.known_le(pixels, caps['cpu']) and _args.known_le(pixels, caps['accelerator']))
  if same_structure:
    return plan(caps['cpu'], arrays)
  return _policy.by_platform(functools.partial(plan, caps['cpu']), functools.partial(plan, caps['accelerator']), arrays)


def corner_bytes(points: int, idx_dtype: DTypeLike, coord_dtype: DTypeLike) -> int:
  """Bytes of the corner rows and weights of `points` sample points (four corners each): `run_passes`'s
  `point_bytes` for a pixel with that many points."""
  return points * (np.dtype(idx_dtype).itemsize + np.dtype(coord_dtype).itemsize) * 4


def summed_passes(
    corners: Callable[..., _Corners], arrays: Any, table: jax.Array, *, groups: int, points: int, pixels: int,
    idx_dtype: DTypeLike, coord_dtype: DTypeLike, deterministic_gradients: bool, chunk_size: int | None,
    memory_budget: int | None,
) -> jax.Array:
  """The plan of the ops without a kernel: `run_passes` with the samples of each group's `points` summed.

  `table` `[rows, F]` is read in its own dtype (the accumulation dtype);
  `corners(start, count, *arrays)` gives the `count * groups * points`
  corner rows and weights of `count` pixels, ordered (pixel, group, point).
  Returns `[pixels, groups*F]`, channel `g*F + f`.
  """
  sample = functools.partial(sampled_pass, functools.partial(sum_points, groups, points), table.dtype,
                             bool(deterministic_gradients), table, None)
  return run_passes(
      corners, sample, arrays, pixels=pixels, bytes_per_pixel=groups * points * table.shape[1] * table.dtype.itemsize,
      point_bytes=corner_bytes(groups * points, idx_dtype, coord_dtype), idx_dtype=idx_dtype, chunk_size=chunk_size,
      memory_budget=memory_budget)


__all__ = ['INDEX_BLOCK_BYTES', 'bilinear_corners', 'corner_bytes', 'corner_rows', 'floor_and_fractions',
           'gather_corners', 'image_corners', 'output_pixels', 'run_passes', 'sample_and_contract', 'sampled_pass',
           'sorted_segment_sum', 'sum_points', 'summed_passes']
