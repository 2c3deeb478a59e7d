"""DCNv3 (InternImage's operator), NHWC, on the shared sampling core; `deformjax.ops.dcnv4` runs the same core.

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

from deformjax.ops import _args, _geometry, _policy
from deformjax.ops import _dcnv3_core as _core
from deformjax.ops._dcnv3_core import dcnv3_taps

_FN = 'dcnv3'


def _check_args(inputs, offsets, mask, **scalars) -> tuple[jax.Array, jax.Array, jax.Array, _core.Grid]:
  """Arrays, dtypes, shapes and the scalar arguments (`scalars`: `_core.check_args`'), each refused by name."""
  inputs, offsets, mask = (_args.as_array(a, name, _FN) for a, name in zip((inputs, offsets, mask),
                                                                           ('inputs', 'offsets', 'mask')))
  grid = _core.check_args(_FN, inputs, **scalars)
  g, p = grid.groups, grid.points
  _core.check_sampled(_FN, inputs, grid, (offsets, mask), ('offsets', 'mask'),
                      ('[N, Ho, Wo, groups*P*2]', '[N, Ho, Wo, groups*P]'), (g * p * 2, g * p))
  return inputs, offsets, mask, grid


def _split(groups: int, points: int, offsets, mask):
  return offsets.reshape(-1, groups, points, 2), mask.reshape(-1, groups, points)


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
    deterministic_gradients: bool = False,
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
    groups: channel groups (C divisible by it), each with its own offsets:
      what `deform_conv2d` calls `offset_groups` (DCNv3 has no kernel, so no
      weight groups; InternImage calls it `group`).
    offset_scale: scales the offsets and the dilation grid around the centre.
    remove_center: drop the centre tap `(i, j) = (kw//2, kh//2)` (the CUDA
      kernels' rule; InternImage allows it for odd square kernels only).
    chunk_size: most output pixels per pass, as in `deform_conv2d`.
    memory_budget: most bytes of sampled values per pass, as in `deform_conv2d`.
    deterministic_gradients: bit-identical gradients on GPU/TPU (reverse mode only), as in `deform_conv2d`.

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
  inputs, offsets, mask, grid = _args.checked(functools.partial(
      _check_args, kernel_size=kernel_size, strides=strides, padding=padding, dilation=dilation,
      groups=groups, offset_scale=offset_scale, remove_center=remove_center, chunk_size=chunk_size,
      memory_budget=memory_budget, deterministic_gradients=deterministic_gradients), _core.LAYOUTS, _FN,
      dict(inputs=inputs, offsets=offsets, mask=mask))
  geom = _core.geometry(_FN, inputs, grid, _args.coordinate_dtype(inputs.dtype, offsets.dtype, mask.dtype))
  if geom.empty:
    return _geometry.empty_result(geom)
  return _dcnv3(inputs, offsets, mask, geom=geom, chunk_size=chunk_size, memory_budget=memory_budget,
                deterministic_gradients=bool(deterministic_gradients))


@_policy.jit_core('geom', 'chunk_size', 'memory_budget', 'deterministic_gradients')
def _dcnv3(inputs, offsets, mask, *, geom: _core.Geometry, chunk_size, memory_budget, deterministic_gradients):
  """`dcnv3` on checked arguments, one compiled program per geometry and settings."""
  return _core.plan(geom, inputs, (offsets, mask), _split, deterministic_gradients=deterministic_gradients,
                    chunk_size=chunk_size, memory_budget=memory_budget)


__all__ = ['dcnv3', 'dcnv3_taps']
