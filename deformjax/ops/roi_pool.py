"""RoIAlign and deformable RoI pooling (DCN, Dai et al. 2017), NHWC.

Bins are sampled the way `torchvision.ops.roi_align` samples them (bin grid,
averaging, its clamp-to-border bilinear rule), and deformable pooling shifts
every bin by `gamma * offset * (roi_h, roi_w)` as in the DCN paper (and mmcv's
DeformRoIPool), with the offset order (dy, dx) used throughout deformjax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deformjax.ops import _args
from deformjax.ops.sampling import floor_and_fractions, gather_corners


def roi_align_corners(y: jax.Array, x: jax.Array, height: int, width: int, idx_dtype=np.int32):
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


# Bytes of the four corner samples an eager call may gather with the exact adaptive grid.
ROI_SAMPLES_BUDGET = 256 * 2**20


def _exact_grid(roi_sizes: np.ndarray, bins: int) -> int:
  """torchvision's adaptive grid along one axis, `ceil(size / bins)`, for the largest RoI
  (a non-finite size counts as empty; the count is clipped to 2**31 before any budget applies)."""
  cells = np.ceil(np.where(np.isfinite(roi_sizes), roi_sizes, 0.0) / bins)
  return max(1, int(min(np.max(cells, initial=1.0), 2.0**31)))


def _concrete(x) -> np.ndarray | None:
  """`x` as numpy when its value is known at trace time, else None (inside jit)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def deform_roi_pool(
    features: jax.Array,
    rois: jax.Array,
    offsets: jax.Array | None = None,
    *,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    aligned: bool = True,
    max_sampling_grid: int | tuple[int, int] | None = None,
) -> jax.Array:
  """Deformable RoI pooling (average of bilinear samples per bin), NHWC.

  Bin (ph, pw) of RoI r averages `gh x gw` bilinear samples (torchvision
  roi_align's grid and boundary rule), after shifting the whole bin by
  `(gamma * offsets[r, ph, pw, 0] * roi_h, gamma * offsets[r, ph, pw, 1] * roi_w)`.
  With `offsets=None` (or zero) this is exactly `torchvision.ops.roi_align`.

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
      sizes are at least 1 pixel).
    max_sampling_grid: static bound on the adaptive grid (int or (gh, gw)). By
      default it is `ceil(H / out_h) x ceil(W / out_w)` under jit, which covers
      every RoI inside the feature map (a larger RoI then samples that capped
      grid); outside jit (`rois` concrete) it is exact, as torchvision, while
      the samples fit `ROI_SAMPLES_BUDGET` (256 MiB), and capped as under jit
      beyond it, so no box, however large, asks for more memory.

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
  fn = 'deform_roi_pool'
  features, rois, offsets = (_args.as_array(a, name, fn) for a, name in
                             zip((features, rois, offsets), ('features', 'rois', 'offsets')))
  _args.check_floating(features, 'features', fn)
  _args.check_floating(rois, 'rois', fn)
  _args.check_rank(features, 4, 'features', '[N, H, W, C]', fn)
  if jnp.ndim(rois) != 2 or rois.shape[1] != 5:
    raise ValueError(f'{fn}: rois must have shape [R, 5] (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}')
  oh, ow = _args.positive_pair(output_size, 'output_size', fn)
  if not isinstance(sampling_ratio, (int, np.integer)) or isinstance(sampling_ratio, bool) or sampling_ratio < 0:
    raise ValueError(f'{fn}: sampling_ratio must be a non-negative int (0 = adaptive), got {sampling_ratio!r}')
  if isinstance(spatial_scale, bool) or (isinstance(spatial_scale, (int, float, np.number))
                                         and not (math.isfinite(spatial_scale) and spatial_scale > 0)):
    raise ValueError(f'{fn}: spatial_scale must be a finite number > 0 (feature pixels per input pixel, e.g. '
                     f'1/16), got {spatial_scale!r}')
  if not isinstance(aligned, (bool, np.bool_)):
    raise ValueError(f'{fn}: aligned must be a bool, got {aligned!r}')
  n, h, w, c = features.shape
  r = rois.shape[0]
  if offsets is not None:
    _args.check_floating(offsets, 'offsets', fn)
    _args.check_shape(offsets, (r, oh, ow, 2), 'offsets', '[R, out_h, out_w, 2]', fn)
  if r == 0 or n * h * w * c == 0:
    return jnp.zeros((r, oh, ow, c), features.dtype)

  cdtype = _args.coordinate_dtype(features.dtype, rois.dtype)
  acc_dtype = cdtype
  rois = rois.astype(cdtype)
  shift = 0.5 if aligned else 0.0
  y1 = rois[:, 2] * spatial_scale - shift
  x1 = rois[:, 1] * spatial_scale - shift
  roi_h = rois[:, 4] * spatial_scale - shift - y1
  roi_w = rois[:, 3] * spatial_scale - shift - x1
  if not aligned:
    roi_h = jnp.maximum(roi_h, 1.0)
    roi_w = jnp.maximum(roi_w, 1.0)
  bin_h = roi_h / oh
  bin_w = roi_w / ow

  if sampling_ratio > 0:
    grid_max = (int(sampling_ratio), int(sampling_ratio))
    grid_h = jnp.full((r,), float(sampling_ratio), cdtype)
    grid_w = grid_h
  else:
    # The adaptive grid is data dependent; sample a static grid and mask the rest.
    known_h, known_w = _concrete(roi_h), _concrete(roi_w)
    if max_sampling_grid is not None:
      grid_max = _args.positive_pair(max_sampling_grid, 'max_sampling_grid', fn)
    else:
      # Under jit: a grid that covers every RoI inside the feature map.
      grid_max = (max(1, math.ceil(h / oh)), max(1, math.ceil(w / ow)))
      if known_h is not None and known_w is not None:
        # Outside jit the exact grid (torchvision's), while its samples fit ROI_SAMPLES_BUDGET;
        # a RoI far larger than the map would otherwise ask for any amount of memory.
        exact = (_exact_grid(known_h, oh), _exact_grid(known_w, ow))
        samples_bytes = 4 * r * oh * ow * exact[0] * exact[1] * c * np.dtype(acc_dtype).itemsize
        grid_max = exact if samples_bytes <= ROI_SAMPLES_BUDGET else (min(exact[0], grid_max[0]),
                                                                      min(exact[1], grid_max[1]))
    grid_h = jnp.minimum(jnp.ceil(roi_h / oh), grid_max[0])
    grid_w = jnp.minimum(jnp.ceil(roi_w / ow), grid_max[1])

  gmh, gmw = grid_max
  ph = jnp.arange(oh, dtype=cdtype)
  pw = jnp.arange(ow, dtype=cdtype)
  iy = jnp.arange(gmh, dtype=cdtype)
  ix = jnp.arange(gmw, dtype=cdtype)
  # A grid of g samples sits at (i + 0.5) / g of the bin; clamp g to >= 1 so the
  # positions of empty RoIs stay finite (they are masked out below anyway).
  safe_gh = jnp.maximum(grid_h, 1.0)[:, None, None, None, None]
  safe_gw = jnp.maximum(grid_w, 1.0)[:, None, None, None, None]
  y = (y1[:, None, None, None, None] + ph[None, :, None, None, None] * bin_h[:, None, None, None, None]
       + (iy[None, None, None, :, None] + 0.5) * bin_h[:, None, None, None, None] / safe_gh)
  x = (x1[:, None, None, None, None] + pw[None, None, :, None, None] * bin_w[:, None, None, None, None]
       + (ix[None, None, None, None, :] + 0.5) * bin_w[:, None, None, None, None] / safe_gw)
  if offsets is not None:
    off = offsets.astype(cdtype)
    y = y + (gamma * roi_h[:, None, None] * off[..., 0])[..., None, None]
    x = x + (gamma * roi_w[:, None, None] * off[..., 1])[..., None, None]
  y, x = jnp.broadcast_arrays(y, x)  # [R, oh, ow, gmh, gmw]

  used = ((iy[None, :, None] < grid_h[:, None, None]) & (ix[None, None, :] < grid_w[:, None, None]))
  count = jnp.maximum(grid_h * grid_w, 1.0)
  batch = rois[:, 0]
  idx_dtype = _args.index_dtype(n * h * w, fn)
  batch_ok = (batch >= 0) & (batch <= n - 1) & (jnp.floor(batch) == batch)
  bidx = jnp.where(batch_ok, batch, 0.0).astype(idx_dtype)
  keep = (used & batch_ok[:, None, None] & (grid_h > 0)[:, None, None] & (grid_w > 0)[:, None, None])
  scale = jnp.where(keep, 1.0 / count[:, None, None], 0.0)[:, None, None, :, :]

  idx, wts = roi_align_corners(y, x, h, w, idx_dtype)
  start = (bidx * (h * w))[:, None, None, None, None]
  idx = tuple(i + start for i in idx)
  wts = tuple(wt * scale for wt in wts)
  table = features.reshape(n * h * w, c)
  samples = gather_corners(table, idx, wts, acc_dtype)  # [R, oh, ow, gmh, gmw, C]
  return samples.sum(axis=(3, 4)).astype(features.dtype)


def roi_align(features, rois, *, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True,
              max_sampling_grid=None):
  """`torchvision.ops.roi_align` in NHWC: `deform_roi_pool` without offsets.

  Args and result as `deform_roi_pool`: features `[N, H, W, C]`, rois `[R, 5]`
  -> `[R, out_h, out_w, C]`.
  """
  return deform_roi_pool(features, rois, None, output_size=output_size, spatial_scale=spatial_scale,
                         sampling_ratio=sampling_ratio, aligned=aligned, max_sampling_grid=max_sampling_grid)
