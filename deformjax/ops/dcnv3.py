"""DCNv3 and DCNv4 (InternImage / OpenGVLab's DCNv4 operators), NHWC, on the shared sampling core.

Both aggregate, per channel group, `P` bilinear samples of the input weighted by
a mask: no kernel contraction (the projections around the op live in the
modules). They follow the layouts and conventions of the reference CUDA
kernels, which differ from torchvision's DCN (`deform_conv2d`):

- offsets are **(x, y)** pairs, and taps are ordered **x-major**: tap
  `k = i*kh + j` has column `i` (over the kernel width) and row `j`;
- sampling is centred on the kernel window, and the dilation grid around the
  centre is multiplied by `offset_scale` as the offsets are:
  `x = wo*sw - pad_left + cx + (i*dw - cx)*offset_scale + dx*offset_scale`,
  `cx = (dw*(kw-1))//2` (the same in y with `j`, `dh`, `kh`);
- `remove_center` drops the centre tap `(i, j) = (kw//2, kh//2)`, so
  `P = kh*kw - 1` points per group instead of `kh*kw`;
- out-of-image corners read 0 (`grid_sample(padding_mode='zeros')`,
  torchvision's rule), padding is never materialised.

InternImage's pure-PyTorch `dcnv3_core_pytorch` pads W by pad_h and H by pad_w;
the CUDA kernels pad H by pad_h and W by pad_w. These ops follow the CUDA
kernels (the two agree whenever pad_h == pad_w).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deformjax.ops import _args, _policy, sampling
from deformjax.ops.deform_conv import _output_size


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


class _Geometry:
  """Static description of a DCNv3/DCNv4 call: what the corner computation needs besides the arrays."""

  def __init__(self, n, hw, out_hw, strides, pads, dilation, kernel_hw, groups, points, offset_scale, remove_center,
               cdtype, idx_dtype):
    self.n, (self.h, self.w), (self.ho, self.wo) = n, hw, out_hw
    self.strides, self.groups, self.points = strides, groups, points
    self.offset_scale, self.cdtype, self.idx_dtype = offset_scale, cdtype, idx_dtype
    (kh, kw), (dh, dw) = kernel_hw, dilation
    cy, cx = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
    # Window origin (int) and the scaled centring term of the CUDA kernels' p0_.
    self.origin = (cy - pads[0], cx - pads[1])
    self.centre = (cy, cx)
    self.taps = dcnv3_taps(kernel_hw, dilation, remove_center)


def _corners(geom: _Geometry, split, start, count, *arrays):
  """Corner rows and weights `[count*G*P]` of output pixels `start..start+count` (order pixel, group, tap)."""
  off, mask = split(*arrays)  # [count, G, P, 2] as (x, y), [count, G, P]
  cdtype, s = geom.cdtype, geom.offset_scale
  img, oy, ox = sampling.output_pixels(start, count, geom.n, (geom.ho, geom.wo), geom.idx_dtype)
  y, x = (
      ((pos * stride + origin).astype(cdtype) - centre * s)[:, None, None]
      + (jnp.asarray(tap, cdtype)[None, None, :] + d.astype(cdtype)) * s
      for pos, stride, origin, centre, tap, d in zip((oy, ox), geom.strides, geom.origin, geom.centre,
                                                     geom.taps[::-1], (off[..., 1], off[..., 0])))
  return sampling.image_corners(y, x, mask.astype(cdtype), img, (geom.h, geom.w), geom.groups,
                                jnp.arange(geom.groups, dtype=geom.idx_dtype)[None, :, None], geom.idx_dtype)


def _split_dcnv3(groups: int, points: int, offsets, mask):
  return offsets.reshape(-1, groups, points, 2), mask.reshape(-1, groups, points)


def _split_dcnv4(groups: int, points: int, offset_mask):
  om = offset_mask[:, :groups * points * 3].reshape(-1, groups, points * 3)
  return om[..., :points * 2].reshape(-1, groups, points, 2), om[..., points * 2:]


def _aggregate(fn, inputs, arrays, split, mask_dtype, *, kernel_size, strides, padding, dilation, groups, offset_scale,
               remove_center, chunk_size, memory_budget, deterministic, offsets_name, offsets_layout, offsets_channels):
  """The shared body of `dcnv3` and `dcnv4`: validation, geometry, and the sampling plan."""
  _args.check_floating(inputs, 'inputs', fn)
  _args.check_rank(inputs, 4, 'inputs', '[N, H, W, C]', fn)
  kh, kw = _args.positive_pair(kernel_size, 'kernel_size', fn)
  groups = _args.positive_int(groups, 'groups', fn)
  if not isinstance(remove_center, (bool, np.bool_)):
    raise TypeError(f'{fn}: remove_center must be a bool, got {remove_center!r}')
  if remove_center and kh * kw == 1:
    raise ValueError(f'{fn}: remove_center needs more than one tap, got kernel_size {kernel_size!r}')
  if isinstance(offset_scale, bool) or not isinstance(offset_scale, (int, float, np.integer, np.floating)):
    raise TypeError(f'{fn}: offset_scale must be a real number, got {offset_scale!r}')
  sampling.check_policy_args(chunk_size, memory_budget, deterministic, fn)
  n, h, w, c = inputs.shape
  if c % groups:
    raise ValueError(f'{fn}: inputs channels C={c} must be divisible by groups={groups}')
  (ho, wo), ((pt, _), (pl, _)) = _output_size((h, w), (kh, kw), strides, padding, dilation, fn)
  sh, sw = _args.pair(strides, 'strides', fn)
  dh, dw = _args.pair(dilation, 'dilation', fn)
  points = kh * kw - int(remove_center)
  for a, name, layout, channels in zip(arrays, offsets_name, offsets_layout, offsets_channels(groups, points)):
    _args.check_floating(a, name, fn)
    _args.check_shape(a, (n, ho, wo, channels), name, layout, fn)

  acc_dtype = _args.promote(inputs.dtype, jnp.float32)
  cdtype = _args.coordinate_dtype(inputs.dtype, mask_dtype(*arrays))
  pixels = n * ho * wo
  if _policy.known_le(pixels, 0) or _policy.known_le(h * w * c, 0):
    return jnp.zeros((n, ho, wo, c), inputs.dtype)
  cg = c // groups
  idx_dtype = _args.index_dtype(n * h * w * groups, fn)
  geom = _Geometry(n, (h, w), (ho, wo), (sh, sw), (pt, pl), (dh, dw), (kh, kw), groups, points, float(offset_scale),
                   bool(remove_center), cdtype, idx_dtype)
  # Sampled in the accumulation dtype: for bf16/f16 inputs the sum over taps and
  # the backward's scatter-add accumulate in float32.
  table = inputs.reshape(n * h * w * groups, cg).astype(acc_dtype)
  flat = tuple(a.reshape(pixels, a.shape[-1]) for a in arrays)
  sample = functools.partial(sampling.sampled_pass, functools.partial(sampling.sum_points, groups, points), acc_dtype,
                             bool(deterministic), table, None)
  out = sampling.run_passes(
      functools.partial(_corners, geom, functools.partial(split, groups, points)), sample, flat, pixels=pixels,
      bytes_per_pixel=points * c * acc_dtype.itemsize,
      point_bytes=groups * points * (idx_dtype.itemsize + cdtype.itemsize) * 4, idx_dtype=idx_dtype,
      chunk_size=chunk_size, memory_budget=memory_budget)
  return out.reshape(n, ho, wo, c).astype(inputs.dtype)


def dcnv3(
    inputs: jax.Array,
    offsets: jax.Array,
    mask: jax.Array,
    *,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    padding: _args.PaddingLike = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    deterministic: bool = False,
) -> jax.Array:
  """DCNv3's core operator (InternImage `dcnv3_core_pytorch` and its CUDA kernel), NHWC.

  Output pixel (n, ho, wo), channel group g, tap p (x-major taps `k = i*kh + j`
  over the kept taps) samples channels `g*C/G .. (g+1)*C/G` bilinearly at
  `x = wo*sw - pad_left + cx + (i*dw - cx)*offset_scale + dx*offset_scale`,
  `y = ho*sh - pad_top + cy + (j*dh - cy)*offset_scale + dy*offset_scale`
  (`cx = (dw*(kw-1))//2`, `cy = (dh*(kh-1))//2`, `(dx, dy) =
  offsets[n, ho, wo, (g*P + p)*2 + {0, 1}]`), and sums them weighted by
  `mask[n, ho, wo, g*P + p]`. Corners outside the image read 0. With uniform
  mask `1/P` and zero offsets this is a depthwise box filter.

  Where InternImage's pure-PyTorch path and its CUDA kernel disagree (padding
  when pad_h != pad_w: the PyTorch path pads W by pad_h and H by pad_w) this
  follows the CUDA kernel.

  Args:
    inputs: `[N, H, W, C]`.
    offsets: `[N, Ho, Wo, groups*P*2]`, (x, y) pairs in pixels, `P = kh*kw`
      (`kh*kw - 1` with `remove_center`).
    mask: `[N, Ho, Wo, groups*P]`, used as given (DCNv3's softmax over the
      taps belongs to the module).
    kernel_size: int or (kh, kw).
    strides: int or (sh, sw).
    padding: int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID'.
    dilation: int or (dh, dw).
    groups: channel groups (C divisible by it), each with its own offsets.
    offset_scale: scales the offsets and the dilation grid around the centre.
    remove_center: drop the centre tap `(i, j) = (kw//2, kh//2)` (the CUDA
      kernels' rule; InternImage allows it for odd square kernels only).
    chunk_size, memory_budget: the execution policy, as in `deform_conv2d`
      (a pass holds `pixels * P * C` float32 sampled values).
    deterministic: bit-identical gradients on GPU/TPU (sorted segment sum
      instead of scatter-add atomics; reverse mode only), as in `deform_conv2d`.

  Returns:
    `[N, Ho, Wo, C]` in `inputs.dtype`, accumulated in float32 (float64 for
    float64 inputs).

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.ops import dcnv3
    >>> x = jnp.ones((2, 8, 8, 16))
    >>> y = dcnv3(x, jnp.zeros((2, 8, 8, 4 * 9 * 2)), jnp.full((2, 8, 8, 4 * 9), 1 / 9), kernel_size=3, padding=1,
    ...           groups=4)
    >>> y.shape, float(y[0, 4, 4, 0])
    ((2, 8, 8, 16), 1.0)
  """
  fn = 'dcnv3'
  inputs, offsets, mask = (_args.as_array(a, name, fn) for a, name in zip((inputs, offsets, mask),
                                                                          ('inputs', 'offsets', 'mask')))
  return _aggregate(
      fn, inputs, (offsets, mask), _split_dcnv3, lambda o, m: _args.promote(o.dtype, m.dtype),
      kernel_size=kernel_size, strides=strides, padding=padding, dilation=dilation, groups=groups,
      offset_scale=offset_scale, remove_center=remove_center, chunk_size=chunk_size, memory_budget=memory_budget,
      deterministic=deterministic, offsets_name=('offsets', 'mask'),
      offsets_layout=('[N, Ho, Wo, groups*P*2]', '[N, Ho, Wo, groups*P]'),
      offsets_channels=lambda g, p: (g * p * 2, g * p))


def offset_mask_channels(groups: int, points: int) -> int:
  """Channels of DCNv4's packed offset_mask: `groups*points*3` rounded up to a multiple of 8.

  >>> offset_mask_channels(4, 9)
  112
  """
  return -(-groups * points * 3 // 8) * 8


def dcnv4(
    inputs: jax.Array,
    offset_mask: jax.Array,
    *,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    padding: _args.PaddingLike = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    deterministic: bool = False,
) -> jax.Array:
  """DCNv4's operator (OpenGVLab `DCNv4_op`), NHWC: `dcnv3`'s aggregation from a packed offset_mask.

  `offset_mask[n, ho, wo, g*P*3 : (g+1)*P*3]` holds group g's `P*2` offsets
  ((x, y) pairs, x-major taps as in `dcnv3`) followed by its `P` mask values,
  applied unnormalised (DCNv4 drops DCNv3's softmax). The channels past
  `groups*P*3` pad the array to a multiple of 8 (the reference's Linear layer
  output) and are ignored. Sampling positions are those of `dcnv3`.

  Args:
    inputs: `[N, H, W, C]`.
    offset_mask: `[N, Ho, Wo, offset_mask_channels(groups, P)]`,
      `P = kh*kw` (`kh*kw - 1` with `remove_center`).
    kernel_size, strides, padding, dilation, groups, offset_scale,
      remove_center, chunk_size, memory_budget, deterministic: as in `dcnv3`.

  Returns:
    `[N, Ho, Wo, C]` in `inputs.dtype`, accumulated in float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.ops import dcnv4
    >>> x = jnp.ones((1, 7, 7, 32))
    >>> om = jnp.zeros((1, 7, 7, 112)).at[..., 18:27].set(1.0)  # group 0: unit mask
    >>> y = dcnv4(x, om, kernel_size=3, padding=1, groups=4)
    >>> y.shape, float(y[0, 3, 3, 0]), float(y[0, 3, 3, 8])
    ((1, 7, 7, 32), 9.0, 0.0)
  """
  fn = 'dcnv4'
  inputs, offset_mask = _args.as_array(inputs, 'inputs', fn), _args.as_array(offset_mask, 'offset_mask', fn)
  return _aggregate(
      fn, inputs, (offset_mask,), _split_dcnv4, lambda om: om.dtype,
      kernel_size=kernel_size, strides=strides, padding=padding, dilation=dilation, groups=groups,
      offset_scale=offset_scale, remove_center=remove_center, chunk_size=chunk_size, memory_budget=memory_budget,
      deterministic=deterministic, offsets_name=('offset_mask',),
      offsets_layout=('[N, Ho, Wo, ceil8(groups*P*3)]',),
      offsets_channels=lambda g, p: (offset_mask_channels(g, p),))


__all__ = ['dcnv3', 'dcnv3_taps', 'dcnv4', 'offset_mask_channels']
