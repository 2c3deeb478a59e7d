"""The geometry of an op call: the static description its jitted core reads besides the arrays.

Every op reads the same way: its public function checks and normalises the arguments, builds the call's
`Geometry`, answers a call with nothing to sample by `empty_result`, and otherwise hands the arrays and the geometry
to its private core (`_policy.jit_core`). A geometry is a frozen dataclass, so it is hashable: the core takes it as
a static argument and compiles once per geometry. Each op's geometry adds its own static fields to the ones here
(`WindowGeometry`'s for the ops that sample a kernel window).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deformjax.ops import _args


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What every op's core needs besides its arrays, all static.

  Attributes:
    out_shape: the result's shape (its dims may be `jax.export` symbolic dims).
    out_dtype: the result's dtype.
    acc_dtype: the dtype samples are read and summed in (at least float32).
    cdtype: the dtype of the sampling positions (at least float32).
    idx_dtype: the dtype of the flat table rows: int32 while they fit, int64 past 2**31 rows.
    empty: nothing to sample (no output position, or nothing to read): the result is `empty_result`.
  """

  out_shape: tuple[Any, ...]
  out_dtype: np.dtype
  acc_dtype: np.dtype
  cdtype: np.dtype
  idx_dtype: np.dtype
  empty: bool


@dataclasses.dataclass(frozen=True)
class WindowGeometry(Geometry):
  """The geometry of an op that samples a kernel window at every output pixel (`deform_conv2d`, `dcnv3`, `dcnv4`).

  Attributes:
    n, hw: the images and their `(H, W)`.
    out_hw: the output pixels `(Ho, Wo)` of each image.
    strides, pads, dilation: the window's, `pads` as `(top, left)`.
    kernel_hw: the kernel's `(kh, kw)`.
    groups: the channel groups that have their own offsets (`deform_conv2d`'s offset groups).
  """

  n: int
  hw: tuple[int, int]
  out_hw: tuple[int, int]
  strides: tuple[int, int]
  pads: tuple[int, int]
  dilation: tuple[int, int]
  kernel_hw: tuple[int, int]
  groups: int


def window_fields(inputs_shape: tuple[Any, ...], kernel_hw: tuple[int, int], window: _args.ConvWindow, groups: int,
                  fn: str) -> dict[str, Any]:
  """A `WindowGeometry`'s own fields, `empty` and `idx_dtype` among them, for `inputs` `[N, H, W, C]` read through
  `window` in `groups` channel groups: empty when there is no output pixel or the input has no element."""
  n, h, w, c = inputs_shape
  (pt, _), (pl, _) = window.pads
  ho, wo = window.out_hw
  return dict(**extent(n * ho * wo, h * w * c, n * h * w * groups, fn), n=n, hw=(h, w), out_hw=(ho, wo),
              strides=window.strides, pads=(pt, pl), dilation=window.dilation, kernel_hw=kernel_hw, groups=groups)


def extent(outputs: Any, sampled: Any, rows: Any, fn: str) -> dict[str, Any]:
  """A geometry's `empty` and `idx_dtype`, the one rule of every op.

  Args:
    outputs: output positions of the call (pixels, queries, bins).
    sampled: elements of what those positions read (0: nothing to read).
    rows: rows of the flat table the corners index.
    fn: the op, named in the error when the rows need int64 and it is off.

  Returns:
    `{'empty': ..., 'idx_dtype': ...}`, keyword arguments of a `Geometry`. Empty when `outputs` or `sampled` is 0;
    a symbolic size (a `jax.export` symbolic dim) counts as non-empty. An empty call's rows are never indexed, so
    they are not checked against 2**31.
  """
  empty = bool(_args.known_le(outputs, 0) or _args.known_le(sampled, 0))
  return {'empty': empty, 'idx_dtype': np.dtype(np.int32) if empty else _args.index_dtype(rows, fn)}


def empty_result(geom: Geometry, bias: jax.Array | None = None) -> jax.Array:
  """The result of a call with nothing to sample: every sample reads 0, so zeros of the geometry's shape and dtype,
  plus `bias` (`[F]`, added over the last axis in the accumulation dtype) where the op has one."""
  out = jnp.zeros(geom.out_shape, geom.acc_dtype)
  if bias is not None:
    out = out + bias.astype(geom.acc_dtype).reshape((1,) * (len(geom.out_shape) - 1) + (geom.out_shape[-1],))
  return out.astype(geom.out_dtype)


__all__ = ['Geometry', 'WindowGeometry', 'empty_result', 'extent', 'window_fields']
