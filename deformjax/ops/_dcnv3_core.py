"""DCNv3's core, which DCNv4 runs too: the tap grid, the sampling positions and the summed-samples plan.

`dcnv3` and `dcnv4` differ only in how the offsets and mask arrive (two arrays,
or one packed array) and in how they are validated; each passes a `split` that
turns its per-pixel arrays into `(offsets [count, G, P, 2], mask [count, G, P])`.
The conventions (x-major taps, (x, y) offsets, centred and scaled grid) are
stated in `deformjax.ops.dcnv3`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deformjax.ops import _args, _engine, _geometry

# `split(groups, points, *arrays)`: an op's per-pixel arrays `[count, ...]` -> (offsets [count, G, P, 2] as (x, y),
# mask [count, G, P]).
Split = Callable[..., tuple[jax.Array, jax.Array]]
# The per-pixel arrays a PyTorch user might pass channels-first (the references themselves are NHWC).
LAYOUTS = MappingProxyType({'inputs': 'NCHW', 'offsets': 'NCHW', 'mask': 'NCHW', 'offset_mask': 'NCHW'})


def dcnv3_taps(kernel_hw: tuple[int, int], dilation_hw: tuple[int, int] = (1, 1),
               remove_center: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """DCNv3's tap grid: `(tx, ty)`, two int arrays `[P]` of `i*dw`, `j*dh` for taps `k = i*kh + j` (x-major).

  `remove_center` drops `(i, j) = (kw//2, kh//2)`.

  >>> dcnv3_taps((1, 3), (1, 2))
  (array([0, 2, 4]), array([0, 0, 0]))
  """
  kh, kw = kernel_hw
  i, j = np.meshgrid(np.arange(kw), np.arange(kh), indexing='ij')  # [kw, kh]: x-major
  keep = np.ones(i.shape, bool)
  if remove_center:
    keep[kw // 2, kh // 2] = False
  return i[keep] * dilation_hw[1], j[keep] * dilation_hw[0]


class Grid(NamedTuple):
  """The validated scalar arguments of a `dcnv3` / `dcnv4` call: `points` sample points per group and pixel."""
  kernel_hw: tuple[int, int]
  groups: int
  points: int
  window: _args.ConvWindow
  offset_scale: float
  remove_center: bool


def check_args(fn: str, inputs: jax.Array, *, kernel_size: int | Sequence[int], strides: int | Sequence[int],
               padding: _args.PaddingLike, dilation: int | Sequence[int], groups: int, offset_scale: float,
               remove_center: bool, chunk_size: int | None, memory_budget: int | None,
               deterministic_gradients: bool) -> Grid:
  """`inputs` and the scalar arguments both ops share, each refused by name in `fn`'s errors."""
  _args.check_floating(inputs, 'inputs', fn)
  _args.check_rank(inputs, 4, 'inputs', '[N, H, W, C]', fn)
  kh, kw = _args.positive_pair(kernel_size, 'kernel_size', fn)
  groups = _args.positive_int(groups, 'groups', fn)
  _args.check_bool(remove_center, 'remove_center', fn)
  if remove_center and kh * kw == 1:
    raise ValueError(f'{fn}: remove_center needs more than one tap, got kernel_size {kernel_size!r}')
  if not _args.is_real(offset_scale):
    raise TypeError(f'{fn}: offset_scale must be a real number, got {offset_scale!r}')
  _args.check_policy(chunk_size, memory_budget, deterministic_gradients, fn)
  _, h, w, c = inputs.shape
  if c % groups:
    raise ValueError(f'{fn}: inputs channels C={c} must be divisible by groups={groups}')
  window = _args.conv_window((h, w), (kh, kw), strides, padding, dilation, fn)
  points = dcnv3_taps((kh, kw), remove_center=bool(remove_center))[0].size
  return Grid((kh, kw), groups, points, window, float(offset_scale), bool(remove_center))


def check_sampled(fn: str, inputs: jax.Array, grid: Grid, arrays: Sequence[jax.Array], names: Sequence[str],
                  layouts: Sequence[str], channels: Sequence[int]) -> None:
  """The per-pixel arrays (offsets, mask, or both packed): floating, `[N, Ho, Wo, channels]` each."""
  n, (ho, wo) = inputs.shape[0], grid.window.out_hw
  for a, name, layout, ch in zip(arrays, names, layouts, channels):
    _args.check_floating(a, name, fn)
    _args.check_shape(a, (n, ho, wo, ch), name, layout, fn)


@dataclasses.dataclass(frozen=True)
class Geometry(_geometry.WindowGeometry):
  """A `dcnv3` / `dcnv4` call's geometry: the window's (`groups`: DCNv3's channel groups), each group's `points`
  sample points (the window's x-major taps, less the centre with `remove_center`) and `offset_scale`."""

  points: int
  offset_scale: float
  remove_center: bool

  @property
  def centre(self) -> tuple[int, int]:
    """The window's centre from its top-left tap, `((dh*(kh-1))//2, (dw*(kw-1))//2)`: the CUDA kernels' centring."""
    (kh, kw), (dh, dw) = self.kernel_hw, self.dilation
    return (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2

  @property
  def origin(self) -> tuple[int, int]:
    """The window's centre at output pixel (0, 0), in input pixels: `centre - (pad_top, pad_left)`."""
    return self.centre[0] - self.pads[0], self.centre[1] - self.pads[1]

  @property
  def taps(self) -> tuple[np.ndarray, np.ndarray]:
    """`dcnv3_taps` of the window: `(tx, ty)`, `[P]` each."""
    return dcnv3_taps(self.kernel_hw, self.dilation, self.remove_center)


def geometry(fn: str, inputs: jax.Array, grid: Grid, cdtype: np.dtype) -> Geometry:
  """The call's `Geometry` from its checked `inputs` and `grid`: the result `[N, Ho, Wo, C]` in `inputs.dtype`,
  summed in at least float32, positions in `cdtype`; int64 table rows (or the error that asks for them) past 2**31."""
  n, _, _, c = inputs.shape
  return Geometry(
      out_shape=(n, *grid.window.out_hw, c), out_dtype=np.dtype(inputs.dtype),
      acc_dtype=_args.promote(inputs.dtype, jnp.float32), cdtype=cdtype,
      **_geometry.window_fields(inputs.shape, grid.kernel_hw, grid.window, grid.groups, fn),
      points=grid.points, offset_scale=grid.offset_scale, remove_center=grid.remove_center)


def _corners(geom: Geometry, split: Split, start, count, *arrays):
  """Corner rows and weights `[count*G*P]` of output pixels `start..start+count` (order pixel, group, tap)."""
  off, mask = split(geom.groups, geom.points, *arrays)  # [count, G, P, 2] as (x, y), [count, G, P]
  cdtype, s = geom.cdtype, geom.offset_scale
  img, oy, ox = _engine.output_pixels(start, count, geom.n, geom.out_hw, geom.idx_dtype)
  y, x = (
      ((pos * stride + origin).astype(cdtype) - centre * s)[:, None, None]
      + (jnp.asarray(tap, cdtype)[None, None, :] + d.astype(cdtype)) * s
      for pos, stride, origin, centre, tap, d in zip((oy, ox), geom.strides, geom.origin, geom.centre,
                                                     geom.taps[::-1], (off[..., 1], off[..., 0])))
  return _engine.image_corners(y, x, mask.astype(cdtype), img, geom.hw, geom.groups,
                               jnp.arange(geom.groups, dtype=geom.idx_dtype)[None, :, None], geom.idx_dtype)


def plan(geom: Geometry, inputs: jax.Array, arrays: Sequence[jax.Array], split: Split, *, deterministic_gradients: bool,
         chunk_size: int | None, memory_budget: int | None) -> jax.Array:
  """Each group's `P` samples, weighted by the mask and summed, in passes: `[N, Ho, Wo, C]` in `inputs.dtype`."""
  n, h, w, c = inputs.shape
  # Sampled in the accumulation dtype: for bf16/f16 inputs the sum over taps and
  # the backward's scatter-add accumulate in float32.
  table = inputs.reshape(n * h * w * geom.groups, c // geom.groups).astype(geom.acc_dtype)
  pixels = n * geom.out_hw[0] * geom.out_hw[1]
  flat = tuple(a.reshape(pixels, a.shape[-1]) for a in arrays)
  out = _engine.summed_passes(
      functools.partial(_corners, geom, split), flat, table, groups=geom.groups, points=geom.points, pixels=pixels,
      idx_dtype=geom.idx_dtype, coord_dtype=geom.cdtype, deterministic_gradients=deterministic_gradients,
      chunk_size=chunk_size, memory_budget=memory_budget)
  return out.reshape(geom.out_shape).astype(geom.out_dtype)


__all__ = ['LAYOUTS', 'Geometry', 'Grid', 'Split', 'check_args', 'check_sampled', 'dcnv3_taps', 'geometry', 'plan']
