"""RoIAlign and deformable RoI pooling (DCN, Dai et al. 2017), NHWC.

Bins are sampled the way `torchvision.ops.roi_align` samples them (bin grid,
averaging, its clamp-to-border bilinear rule), and deformable pooling shifts
every bin by `gamma * offset * (roi_h, roi_w)` as in the DCN paper (and mmcv's
DeformRoIPool), with the offset order (dy, dx) used throughout deformjax.

Both default to `aligned=True` (the half-pixel-correct boxes of mmcv's RoIAlign
and DeformRoIPool, and detectron2's ROIAlign). `torchvision.ops.roi_align`
defaults to `aligned=False`: pass `aligned=False` to reproduce a torchvision call
that leaves it unset.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from deformjax.ops import _args, _engine, _geometry, _policy
from deformjax.ops._engine import floor_and_fractions

_FN = 'deform_roi_pool'
# jax arrays under the op, numpy arrays where the boxes are concrete (`_concrete_grid`).
_ArrayT = TypeVar('_ArrayT', jax.Array, np.ndarray)


def _roi_align_corners(y: jax.Array, x: jax.Array, height: int, width: int, idx_dtype: DTypeLike = np.int32
                       ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """torchvision roi_align's bilinear rule, as 4 (index, weight) corner arrays.

  Unlike deform_conv2d's rule, points in [-1, 0] and [H-1, H] are clamped onto
  the border pixel (not faded to zero); only y < -1, y > H, x < -1 or x > W read
  0. Non-finite points read 0 with zero gradient.
  """
  inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width) & jnp.isfinite(y) & jnp.isfinite(x)
  y = jnp.clip(jnp.where(inside, y, 0.0), 0.0, height - 1.0)
  x = jnp.clip(jnp.where(inside, x, 0.0), 0.0, width - 1.0)
  y0i, x0i, ly, lx, hy, hx = floor_and_fractions(y, x, idx_dtype)
  y1i = jnp.minimum(y0i + 1, height - 1)
  x1i = jnp.minimum(x0i + 1, width - 1)
  zero = jnp.zeros_like(y)
  indices, weights = [], []
  for yy, xx, wt in ((y0i, x0i, hy * hx), (y0i, x1i, hy * lx), (y1i, x0i, ly * hx), (y1i, x1i, ly * lx)):
    indices.append(yy * width + xx)
    weights.append(jnp.where(inside, wt, zero))
  return tuple(indices), tuple(weights)


def _exact_grid(roi_sizes: np.ndarray, bins: int) -> int:
  """torchvision's adaptive grid along one axis, `ceil(size / bins)`, for the largest RoI
  (a non-finite size counts as empty; the count is clipped to 2**31 before any budget applies)."""
  cells = np.ceil(np.where(np.isfinite(roi_sizes), roi_sizes, 0.0) / bins)
  return max(1, int(min(np.max(cells, initial=1.0), 2.0**31)))


def _concrete(x: jax.Array) -> np.ndarray | None:
  """`x` as numpy when its value is known at trace time, else None (inside jit)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_args(fn: str, features: jax.Array, rois: jax.Array, offsets: jax.Array | None,
                output_size: int | Sequence[int], spatial_scale: float, sampling_ratio: int, aligned: bool,
                max_sampling_grid: int | tuple[int, int] | None
                ) -> tuple[jax.Array, jax.Array, jax.Array | None, tuple[int, int]]:
  """Arrays, dtypes, shapes and scalar arguments, each refused by name in `fn`'s errors; returns the arrays and
  (out_h, out_w)."""
  features, rois, offsets = (_args.as_array(a, name, fn) for a, name in
                             zip((features, rois, offsets), ('features', 'rois', 'offsets')))
  _args.check_floating(features, 'features', fn)
  _args.check_floating(rois, 'rois', fn)
  _args.check_rank(features, 4, 'features', '[N, H, W, C]', fn)
  if jnp.ndim(rois) != 2 or rois.shape[1] != 5:
    raise ValueError(f'{fn}: rois must have shape [R, 5] (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}')
  oh, ow = _args.positive_pair(output_size, 'output_size', fn)
  if not _args.is_int(sampling_ratio) or sampling_ratio < 0:
    raise ValueError(f'{fn}: sampling_ratio must be a non-negative int (0 = adaptive), got {sampling_ratio!r}')
  # A number is range-checked; a bool (Python's or NumPy's, which is no np.number) is a slip, not a scale of 1.
  if isinstance(spatial_scale, (bool, np.bool_)) or (_args.is_real(spatial_scale)
                                                     and not (math.isfinite(spatial_scale) and spatial_scale > 0)):
    raise ValueError(f'{fn}: spatial_scale must be a finite number > 0 (feature pixels per input pixel, e.g. '
                     f'1/16), got {spatial_scale!r}')
  _args.check_bool(aligned, 'aligned', fn)
  if max_sampling_grid is not None:
    _args.positive_pair(max_sampling_grid, 'max_sampling_grid', fn)
  if offsets is not None:
    _args.check_floating(offsets, 'offsets', fn)
    if _args.static_shape(offsets) == (rois.shape[0], 2, oh, ow) != (rois.shape[0], oh, ow, 2):
      raise ValueError(f"{fn}: offsets (shape {_args.static_shape(offsets)}) look like mmcv's [R, 2, out_h, out_w] "
                       "with (dx, dy): deformjax's are [R, out_h, out_w, 2] with (dy, dx): pass "
                       'offsets.transpose(0, 2, 3, 1)[..., ::-1]')
    _args.check_shape(offsets, (rois.shape[0], oh, ow, 2), 'offsets', '[R, out_h, out_w, 2]', fn)
  return features, rois, offsets, (oh, ow)


def _boxes(rois: _ArrayT, spatial_scale: float, aligned: bool,
           xp: Any = jnp) -> tuple[_ArrayT, _ArrayT, _ArrayT, _ArrayT]:
  """`(y1, x1, roi_h, roi_w)` in feature pixels, torchvision's arithmetic: `aligned` shifts the
  box by -0.5 pixel, otherwise sizes are at least 1 pixel. `xp=np` for concrete boxes."""
  shift = 0.5 if aligned else 0.0
  y1 = rois[:, 2] * spatial_scale - shift
  x1 = rois[:, 1] * spatial_scale - shift
  roi_h = rois[:, 4] * spatial_scale - shift - y1
  roi_w = rois[:, 3] * spatial_scale - shift - x1
  if not aligned:
    roi_h = xp.maximum(roi_h, roi_h.dtype.type(1))
    roi_w = xp.maximum(roi_w, roi_w.dtype.type(1))
  return y1, x1, roi_h, roi_w


def _sampling_grid(roi_h: jax.Array, roi_w: jax.Array, output_hw: tuple[int, int], feature_hw: tuple[int, int],
                   sampling_ratio: int, max_sampling_grid: int | tuple[int, int] | None, bytes_per_grid_cell: int,
                   ) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
  """Samples per bin: `(grid_h [R], grid_w [R], (static max gh, static max gw))`.

  A fixed `sampling_ratio` is its own bound. The adaptive grid
  (`ceil(roi / bins)`) is data dependent, so a static bound is sampled and the
  cells beyond each RoI's grid are masked: `max_sampling_grid` if given; else
  the grid of the largest RoI when the boxes are concrete and its samples
  (`bytes_per_grid_cell` each) fit `_policy.ROI_EXACT_GRID_BYTES`; else (under
  jit, or over that bound) a grid that covers every RoI inside the feature map.
  """
  oh, ow = output_hw
  if sampling_ratio > 0:
    grid = jnp.full(roi_h.shape, float(sampling_ratio), roi_h.dtype)
    return grid, grid, (int(sampling_ratio), int(sampling_ratio))
  if max_sampling_grid is not None:
    grid_max = _args.pair(max_sampling_grid, 'max_sampling_grid', _FN)  # checked by _check_args
  else:
    grid_max = _grid_bound(_concrete(roi_h), _concrete(roi_w), output_hw, feature_hw, bytes_per_grid_cell)
  grid_h = jnp.minimum(jnp.ceil(roi_h / oh), grid_max[0])
  grid_w = jnp.minimum(jnp.ceil(roi_w / ow), grid_max[1])
  return grid_h, grid_w, grid_max


def _grid_bound(roi_h: np.ndarray | None, roi_w: np.ndarray | None, output_hw: tuple[int, int],
                feature_hw: tuple[int, int], bytes_per_grid_cell: int) -> tuple[int, int]:
  """The adaptive grid's static bound: exact (torchvision's) for concrete RoI sizes while its samples fit
  `_policy.ROI_EXACT_GRID_BYTES`, else (unknown sizes, or over that bound) a grid that covers every RoI inside
  the feature map; a RoI far larger than the map would otherwise ask for any amount of memory."""
  (oh, ow), (h, w) = output_hw, feature_hw
  cover = (max(1, math.ceil(h / oh)), max(1, math.ceil(w / ow)))
  if roi_h is None or roi_w is None:
    return cover
  exact = (_exact_grid(roi_h, oh), _exact_grid(roi_w, ow))
  if exact[0] * exact[1] * bytes_per_grid_cell <= _policy.ROI_EXACT_GRID_BYTES:
    return exact
  return min(exact[0], cover[0]), min(exact[1], cover[1])


def _sample_points(y1: jax.Array, x1: jax.Array, roi_h: jax.Array, roi_w: jax.Array, grid_h: jax.Array,
                   grid_w: jax.Array, grid_max: tuple[int, int], output_hw: tuple[int, int],
                   offsets: jax.Array | None, gamma: float) -> tuple[jax.Array, jax.Array]:
  """Sampling points `(y, x)`, each `[R, out_h, out_w, gh_max, gw_max]`: a grid of g samples at
  `(i + 0.5) / g` of each bin, the whole bin shifted by `gamma * offset * roi size`."""
  dtype = roi_h.dtype
  ph, pw = (jnp.arange(n, dtype=dtype) for n in output_hw)
  iy, ix = (jnp.arange(n, dtype=dtype) for n in grid_max)
  per_roi = lambda v: v[:, None, None, None, None]
  bin_h, bin_w = per_roi(roi_h / output_hw[0]), per_roi(roi_w / output_hw[1])
  # Clamping g to >= 1 keeps the points of empty RoIs finite (their weights are zero anyway).
  safe_gh, safe_gw = per_roi(jnp.maximum(grid_h, 1.0)), per_roi(jnp.maximum(grid_w, 1.0))
  y = per_roi(y1) + ph[None, :, None, None, None] * bin_h + (iy[None, None, None, :, None] + 0.5) * bin_h / safe_gh
  x = per_roi(x1) + pw[None, None, :, None, None] * bin_w + (ix[None, None, None, None, :] + 0.5) * bin_w / safe_gw
  if offsets is not None:
    off = offsets.astype(dtype)
    y = y + (gamma * roi_h[:, None, None] * off[..., 0])[..., None, None]
    x = x + (gamma * roi_w[:, None, None] * off[..., 1])[..., None, None]
  y_full, x_full = jnp.broadcast_arrays(y, x)
  return y_full, x_full


def _sample_scale(batch: jax.Array, grid_h: jax.Array, grid_w: jax.Array, grid_max: tuple[int, int],
                  num_images: int) -> tuple[jax.Array, jax.Array]:
  """`(batch index [R] usable as an index, weight [R, 1, 1, gh_max, gw_max])`: `1 / (gh * gw)` for the
  cells of each RoI's grid, 0 for the padding cells, for empty RoIs and for a batch index that is
  not an integer in [0, N) (those RoIs pool to zeros)."""
  iy, ix = (jnp.arange(n, dtype=grid_h.dtype) for n in grid_max)
  used = (iy[None, :, None] < grid_h[:, None, None]) & (ix[None, None, :] < grid_w[:, None, None])
  batch_ok = (batch >= 0) & (batch <= num_images - 1) & (jnp.floor(batch) == batch)
  keep = used & (batch_ok & (grid_h > 0) & (grid_w > 0))[:, None, None]
  count = jnp.maximum(grid_h * grid_w, 1.0)
  scale = jnp.where(keep, 1.0 / count[:, None, None], 0.0)[:, None, None, :, :]
  return jnp.where(batch_ok, batch, 0.0), scale


def _bin_corners(feature_hw: tuple[int, int], idx_dtype: np.dtype, start: jax.Array | int, count: int,
                 y: jax.Array, x: jax.Array, scale: jax.Array, first_row: jax.Array
                 ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """Corner rows and weights (flat `[count * G]`) of bins `start .. start+count` for `_engine.run_passes`.

  `y, x, scale` are `[count, G]` (the bin's G grid points and their `1 / (gh*gw)`
  weights), `first_row [count]` the table row of the bin's image. Padding bins
  past the end are all zeros: rows in bounds, weights 0.
  """
  del start, count
  idx, wts = _roi_align_corners(y, x, *feature_hw, idx_dtype)
  return (tuple((i + first_row[:, None]).reshape(-1) for i in idx),
          tuple((wt * scale).reshape(-1) for wt in wts))


def deform_roi_pool(
    features: jax.Array,
    rois: jax.Array,
    offsets: jax.Array | None = None,
    *,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    aligned: bool = True,
    max_sampling_grid: int | tuple[int, int] | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    deterministic_gradients: bool = False,
) -> jax.Array:
  """Deformable RoI pooling (average of bilinear samples per bin), NHWC.

  Bin (ph, pw) of RoI r averages `gh x gw` bilinear samples (torchvision
  roi_align's grid and boundary rule), after shifting the whole bin by
  `(gamma * offsets[r, ph, pw, 0] * roi_h, gamma * offsets[r, ph, pw, 1] * roi_w)`.
  With `offsets=None` (or zero) this is exactly
  `torchvision.ops.roi_align(..., aligned=aligned)`; the default
  `aligned=True` is mmcv's DeformRoIPool (torchvision's own default is False).

  Args:
    features: `[N, H, W, C]`.
    rois: `[R, 5]` rows `(batch_index, x1, y1, x2, y2)` in input-image pixels
      (scaled by `spatial_scale` into feature pixels), torchvision's format.
    offsets: optional `[R, out_h, out_w, 2]` normalised (dy, dx) per bin. (mmcv's
      DeformRoIPool takes `[R, 2, out_h, out_w]` with (dx, dy): transpose to
      `(0, 2, 3, 1)` and swap the last axis.)
    output_size: int or (out_h, out_w).
    spatial_scale: feature pixels per input pixel (e.g. 1/16).
    sampling_ratio: samples per bin along each axis; 0 means adaptive,
      `ceil(roi_h / out_h)` x `ceil(roi_w / out_w)` per RoI, as torchvision.
    gamma: offset magnitude scale (0.1 in the DCN paper).
    aligned: torchvision's `aligned` (shift boxes by -0.5 pixel; if False, RoI
      sizes are at least 1 pixel). Default True, as mmcv.
    max_sampling_grid: static bound on the adaptive grid (int or (gh, gw)).
      None: exact (torchvision's) outside jit, `ceil(H / out_h) x ceil(W / out_w)`
      (every RoI inside the map) under jit.
    chunk_size: most bins (over `R*out_h*out_w`) per pass, as in `deform_conv2d`.
    memory_budget: most bytes of sampled values per pass, as in `deform_conv2d`.
    deterministic_gradients: bit-identical gradients on GPU/TPU (reverse mode only), as in `deform_conv2d`.

  Returns:
    `[R, out_h, out_w, C]` in `features.dtype`. An empty RoI (non-positive
    adaptive grid, e.g. x2 < x1 with aligned=True) pools to 0, as in
    torchvision. An RoI whose batch index is not an integer in [0, N) pools to 0
    (a checkable, jit-safe result rather than an error).

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.ops import deform_roi_pool
    >>> feats = jnp.ones((2, 16, 16, 8))
    >>> rois = jnp.array([[0, 0.0, 0.0, 8.0, 8.0], [1, 2.0, 4.0, 15.0, 12.0]])
    >>> deform_roi_pool(feats, rois, output_size=7).shape
    (2, 7, 7, 8)
  """
  return _roi_pool(_FN, features, rois, offsets, output_size=output_size, spatial_scale=spatial_scale,
                   sampling_ratio=sampling_ratio, gamma=gamma, aligned=aligned, max_sampling_grid=max_sampling_grid,
                   chunk_size=chunk_size, memory_budget=memory_budget, deterministic_gradients=deterministic_gradients)


def _roi_pool(fn: str, features, rois, offsets, *, output_size, spatial_scale, sampling_ratio, gamma, aligned,
              max_sampling_grid, chunk_size, memory_budget, deterministic_gradients) -> jax.Array:
  """`deform_roi_pool` and `roi_align`, their errors named `fn`: checks, the call's geometry, then the pooling
  (compiled once per geometry)."""
  checked = _check_args(fn, features, rois, offsets, output_size, spatial_scale, sampling_ratio, aligned,
                        max_sampling_grid)
  _args.check_policy(chunk_size, memory_budget, deterministic_gradients, fn)
  geom = _roi_geometry(fn, checked, float(spatial_scale), int(sampling_ratio), float(gamma), bool(aligned),
                       max_sampling_grid)
  if geom.empty:  # no RoI, or nothing to pool
    return _geometry.empty_result(geom)
  return _pool(*checked[:3], geom=geom, chunk_size=chunk_size, memory_budget=memory_budget,
               deterministic_gradients=bool(deterministic_gradients))


@dataclasses.dataclass(frozen=True)
class _RoiGeometry(_geometry.Geometry):
  """A `deform_roi_pool` / `roi_align` call's geometry: the feature map, the bins and how each is sampled. `grid` is
  the adaptive grid's static bound (`_sampling_grid`), None where it covers the feature map."""

  n: int
  hw: tuple[int, int]
  out_hw: tuple[int, int]
  spatial_scale: float
  sampling_ratio: int
  gamma: float
  aligned: bool
  grid: tuple[int, int] | None


def _roi_geometry(fn: str, checked, spatial_scale: float, sampling_ratio: int, gamma: float, aligned: bool,
                  max_sampling_grid: int | tuple[int, int] | None) -> _RoiGeometry:
  """The call's `_RoiGeometry`: `[R, out_h, out_w, C]` in `features.dtype`, sampled and summed in the coordinate
  dtype; empty when there is no RoI or no feature; the adaptive grid's bound from the boxes where they are concrete
  (outside jit), so that the pooling compiles once per shapes and bound."""
  features, rois, _, (oh, ow) = checked
  n, h, w, c = features.shape
  cdtype = _args.coordinate_dtype(features.dtype, rois.dtype)
  extent = _geometry.extent(rois.shape[0], n * h * w * c, n * h * w, fn)
  grid = None if max_sampling_grid is None else _args.pair(max_sampling_grid, 'max_sampling_grid', fn)
  if sampling_ratio == 0 and grid is None and not extent['empty']:
    grid = _concrete_grid(features, rois, (oh, ow), spatial_scale, aligned, cdtype)
  return _RoiGeometry(out_shape=(rois.shape[0], oh, ow, c), out_dtype=np.dtype(features.dtype), acc_dtype=cdtype,
                      cdtype=cdtype, **extent, n=n, hw=(h, w), out_hw=(oh, ow), spatial_scale=spatial_scale,
                      sampling_ratio=sampling_ratio, gamma=gamma, aligned=aligned, grid=grid)


def _concrete_grid(features: jax.Array, rois: jax.Array, output_hw: tuple[int, int], spatial_scale: float,
                   aligned: bool, cdtype: np.dtype) -> tuple[int, int] | None:
  """The adaptive grid's static bound where the boxes are concrete (outside jit), else None: `_sampling_grid`'s
  choice, made before the pooling is traced."""
  (oh, ow), (_, h, w, c) = output_hw, features.shape
  known = _concrete(rois)
  if known is None:
    return None
  _, _, roi_h, roi_w = _boxes(known.astype(cdtype), spatial_scale, aligned, xp=np)
  return _grid_bound(roi_h, roi_w, (oh, ow), (h, w), 4 * known.shape[0] * oh * ow * c * np.dtype(cdtype).itemsize)


@_policy.jit_core('geom', 'chunk_size', 'memory_budget', 'deterministic_gradients')
def _pool(features: jax.Array, rois: jax.Array, offsets: jax.Array | None, *, geom: _RoiGeometry,
          chunk_size: int | None, memory_budget: int | None, deterministic_gradients: bool) -> jax.Array:
  """`deform_roi_pool` on checked arguments: `[R, out_h, out_w, C]`."""
  (oh, ow), (n, h, w, c), r = geom.out_hw, features.shape, rois.shape[0]
  cdtype, idx_dtype = geom.cdtype, geom.idx_dtype
  rois = rois.astype(cdtype)
  y1, x1, roi_h, roi_w = _boxes(rois, geom.spatial_scale, geom.aligned)
  grid_h, grid_w, grid_max = _sampling_grid(roi_h, roi_w, (oh, ow), (h, w), geom.sampling_ratio, geom.grid,
                                            bytes_per_grid_cell=4 * r * oh * ow * c * np.dtype(cdtype).itemsize)
  y, x = _sample_points(y1, x1, roi_h, roi_w, grid_h, grid_w, grid_max, (oh, ow), offsets, geom.gamma)
  batch, scale = _sample_scale(rois[:, 0], grid_h, grid_w, grid_max, n)

  # Every bin is an output "pixel" of the shared plan, its gh_max x gw_max grid its sample points.
  points = grid_max[0] * grid_max[1]
  bins = r * oh * ow
  first_row = jnp.broadcast_to((batch.astype(idx_dtype) * (h * w))[:, None, None], (r, oh, ow))
  per_bin = (y.reshape(bins, points), x.reshape(bins, points),
             jnp.broadcast_to(scale, y.shape).reshape(bins, points), first_row.reshape(bins))
  # Read in the coordinate dtype, so the features' gradient accumulates in it (float32 for bf16 features).
  table = features.reshape(n * h * w, c).astype(geom.acc_dtype)
  sample = functools.partial(_engine.sampled_pass, functools.partial(_engine.sum_points, 1, points), cdtype,
                             bool(deterministic_gradients), table, None)
  itemsize = np.dtype(cdtype).itemsize
  out = _engine.run_passes(
      functools.partial(_bin_corners, (h, w), idx_dtype), sample, per_bin, pixels=bins,
      bytes_per_pixel=points * c * itemsize, point_bytes=points * (np.dtype(idx_dtype).itemsize + itemsize) * 4,
      idx_dtype=idx_dtype, chunk_size=chunk_size, memory_budget=memory_budget)
  return out.reshape(geom.out_shape).astype(geom.out_dtype)


def roi_align(
    features: jax.Array,
    rois: jax.Array,
    *,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    aligned: bool = True,
    max_sampling_grid: int | tuple[int, int] | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    deterministic_gradients: bool = False,
) -> jax.Array:
  """`torchvision.ops.roi_align(..., aligned=aligned)` in NHWC: `deform_roi_pool` without offsets.

  The default `aligned=True` is mmcv's RoIAlign and detectron2's ROIAlign
  (half-pixel-correct boxes); `torchvision.ops.roi_align` defaults to
  `aligned=False`, so pass `aligned=False` to reproduce a torchvision call that
  leaves it unset. Both settings equal torchvision's to float64 rounding.

  Args:
    features: `[N, H, W, C]`.
    rois: `[R, 5]` rows `(batch_index, x1, y1, x2, y2)` in input-image pixels.
    output_size: int or (out_h, out_w).
    spatial_scale: feature pixels per input pixel (e.g. 1/16).
    sampling_ratio: samples per bin along each axis; 0: adaptive, as torchvision.
    aligned: torchvision's `aligned`; default True, as mmcv.
    max_sampling_grid: static bound on the adaptive grid, as in `deform_roi_pool`.
    chunk_size: most bins (over `R*out_h*out_w`) per pass, as in `deform_conv2d`.
    memory_budget: most bytes of sampled values per pass, as in `deform_conv2d`.
    deterministic_gradients: bit-identical gradients on GPU/TPU (reverse mode only), as in `deform_conv2d`.

  Returns:
    `[R, out_h, out_w, C]` in `features.dtype`.

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.ops import roi_align
    >>> feats = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> box = jnp.array([[0, 0.0, 0.0, 4.0, 4.0]])
    >>> roi_align(feats, box, output_size=1, sampling_ratio=1).ravel().tolist()  # samples (1.5, 1.5)
    [7.5]
    >>> roi_align(feats, box, output_size=1, sampling_ratio=1, aligned=False).ravel().tolist()  # (2, 2), torchvision's
    [10.0]
  """
  return _roi_pool('roi_align', features, rois, None, output_size=output_size, spatial_scale=spatial_scale,
                   sampling_ratio=sampling_ratio, gamma=0.0, aligned=aligned, max_sampling_grid=max_sampling_grid,
                   chunk_size=chunk_size, memory_budget=memory_budget, deterministic_gradients=deterministic_gradients)


__all__ = ['deform_roi_pool', 'roi_align']
