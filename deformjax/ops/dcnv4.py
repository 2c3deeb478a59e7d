"""DCNv4 (OpenGVLab's `DCNv4_op`), NHWC: DCNv3's aggregation (`deformjax.ops.dcnv3`) from one packed array.

DCNv4 keeps DCNv3's sampling positions (x-major taps, (x, y) offsets, the
centred grid scaled by `offset_scale`) and drops its softmax: the mask is used
unnormalised, and offsets and mask arrive packed per group in one
`offset_mask` array padded to a multiple of 8 channels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax

from deformjax.ops import _args, _geometry, _policy
from deformjax.ops import _dcnv3_core as _core

_FN = 'dcnv4'


def offset_mask_channels(groups: int, points: int) -> int:
  """Channels of DCNv4's packed offset_mask: `groups*points*3` rounded up to a multiple of 8.

  >>> offset_mask_channels(4, 9)
  112
  """
  return -(-groups * points * 3 // 8) * 8


def _check_args(inputs, offset_mask, **scalars) -> tuple[jax.Array, jax.Array, _core.Grid]:
  """Arrays, dtypes, shapes and the scalar arguments (`scalars`: `_core.check_args`'), each refused by name."""
  inputs, offset_mask = _args.as_array(inputs, 'inputs', _FN), _args.as_array(offset_mask, 'offset_mask', _FN)
  grid = _core.check_args(_FN, inputs, **scalars)
  _core.check_sampled(_FN, inputs, grid, (offset_mask,), ('offset_mask',), ('[N, Ho, Wo, ceil8(groups*P*3)]',),
                      (offset_mask_channels(grid.groups, grid.points),))
  return inputs, offset_mask, grid


def _split(groups: int, points: int, offset_mask):
  om = offset_mask[:, :groups * points * 3].reshape(-1, groups, points * 3)
  return om[..., :points * 2].reshape(-1, groups, points, 2), om[..., points * 2:]


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
    deterministic_gradients: bool = False,
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
    kernel_size: int or (kh, kw).
    strides: int or (sh, sw).
    padding: int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID'.
    dilation: int or (dh, dw).
    groups: channel groups, each with its own offsets and mask (DCNv4's `group`).
    offset_scale: scales the offsets and the dilation grid around the centre.
    remove_center: drop the centre tap, as in `dcnv3`.
    chunk_size: most output pixels per pass, as in `deform_conv2d`.
    memory_budget: most bytes of sampled values per pass, as in `deform_conv2d`.
    deterministic_gradients: bit-identical gradients on GPU/TPU (reverse mode only), as in `deform_conv2d`.

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
  inputs, offset_mask, grid = _args.checked(functools.partial(
      _check_args, kernel_size=kernel_size, strides=strides, padding=padding, dilation=dilation,
      groups=groups, offset_scale=offset_scale, remove_center=remove_center, chunk_size=chunk_size,
      memory_budget=memory_budget, deterministic_gradients=deterministic_gradients), _core.LAYOUTS, _FN,
      dict(inputs=inputs, offset_mask=offset_mask))
  geom = _core.geometry(_FN, inputs, grid, _args.coordinate_dtype(inputs.dtype, offset_mask.dtype))
  if geom.empty:
    return _geometry.empty_result(geom)
  return _dcnv4(inputs, offset_mask, geom=geom, chunk_size=chunk_size, memory_budget=memory_budget,
                deterministic_gradients=bool(deterministic_gradients))


@_policy.jit_core('geom', 'chunk_size', 'memory_budget', 'deterministic_gradients')
def _dcnv4(inputs, offset_mask, *, geom: _core.Geometry, chunk_size, memory_budget, deterministic_gradients):
  """`dcnv4` on checked arguments, one compiled program per geometry and settings."""
  return _core.plan(geom, inputs, (offset_mask,), _split, deterministic_gradients=deterministic_gradients,
                    chunk_size=chunk_size, memory_budget=memory_budget)


__all__ = ['dcnv4', 'offset_mask_channels']
