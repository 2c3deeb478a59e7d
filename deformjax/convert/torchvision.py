"""torchvision's `DeformConv2d` into a `DeformConv`: the weights move, the offsets and mask stay the caller's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from deformjax.convert import _state
from deformjax.nn.deform_conv import DeformConv


def from_torchvision(weight: np.ndarray, bias: np.ndarray | None = None, *,
                     strides: int | Sequence[int] | None = None, padding: int | Sequence[int] = 0,
                     kernel_dilation: int | Sequence[int] | None = None, feature_group_count: int | None = None,
                     offset_groups: int | None = None, param_dtype: DTypeLike = np.float32,
                     stride: int | Sequence[int] | None = None, dilation: int | Sequence[int] | None = None,
                     groups: int | None = None, **module_kwargs: Any) -> DeformConv:
  """A `DeformConv` holding a torchvision `DeformConv2d`'s weights, called with the offsets (and mask) as torchvision is.

  Each geometry argument takes `DeformConv`'s name or torchvision's (`stride`, `dilation`, `groups`), not both.

  Args:
    weight: `DeformConv2d.weight` as numpy, OIHW `[C_out, C_in // groups, kh, kw]`.
    bias: `DeformConv2d.bias` `[C_out]`, or None.
    strides: the stride, an int or a pair (torchvision: `stride`; default 1).
    padding: the zero padding, an int or a pair (torchvision's `padding`).
    kernel_dilation: the tap spacing, an int or a pair (torchvision: `dilation`; default 1).
    feature_group_count: the channel groups (torchvision: `groups`; default 1).
    offset_groups: the offset groups the offsets carry; None reads them off the offsets at each call, as
      torchvision does (`offsets.shape[-1] // (2*kh*kw)`).
    param_dtype: the parameters' dtype.
    stride: torchvision's name for `strides`.
    dilation: torchvision's name for `kernel_dilation`.
    groups: torchvision's name for `feature_group_count`.
    **module_kwargs: `DeformConv` options a checkpoint does not hold (`dtype`, `precision`, `chunk_size`, ...).

  Returns:
    `DeformConv(..., predict_offsets=False)`, called as `layer(x, offsets, mask)` with NHWC arrays (torchvision's
    NCHW ones transposed by `(0, 2, 3, 1)`); `mask` is used as given, as in torchvision.

  Raises:
    TypeError: a state dict passed as `weight`, or an argument given under both its names.
    ValueError: a weight that is not 4-d, or that is HWIO where OIHW is expected.

  Example:
    >>> import numpy as np
    >>> from deformjax.convert import from_torchvision
    >>> weight = np.random.default_rng(0).normal(size=(16, 8, 3, 3))  # DeformConv2d(8, 16, 3).weight.numpy()
    >>> layer = from_torchvision(weight, np.zeros(16), strides=2, padding=1)
    >>> layer(np.ones((1, 6, 6, 8), np.float32), np.zeros((1, 3, 3, 18), np.float32)).shape
    (1, 3, 3, 16)
  """
  fn = 'from_torchvision'
  strides = _state.one_of(strides, stride, ('strides', 'stride'), 1, fn)
  kernel_dilation = _state.one_of(kernel_dilation, dilation, ('kernel_dilation', 'dilation'), 1, fn)
  groups = _state.one_of(feature_group_count, groups, ('feature_group_count', 'groups'), 1, fn)
  weight = _state.oihw(weight, 'weight', fn, "pass weight=state['weight'], bias=state.get('bias')", bias)
  cout, cin_g, kh, kw = weight.shape
  if bias is not None and np.shape(bias) != (cout,):
    raise ValueError(f'{fn}: bias must have shape ({cout},) (C_out of weight {weight.shape}), got {np.shape(bias)}')
  # Built abstract: every parameter is set below, so initialising them would be wasted work.
  layer = nnx.eval_shape(lambda: DeformConv(
      cin_g * groups, cout, (kh, kw), strides, padding=padding, kernel_dilation=kernel_dilation,
      feature_group_count=groups, offset_groups=offset_groups, use_bias=bias is not None, predict_offsets=False,
      param_dtype=param_dtype, rngs=nnx.Rngs(0), **module_kwargs))
  _state.assign(layer.kernel, np.transpose(weight, (2, 3, 1, 0)).astype(param_dtype))
  if bias is not None:
    assert layer.bias is not None  # built with use_bias
    _state.assign(layer.bias, np.asarray(bias, param_dtype))
  _state.check_concrete(layer, fn)
  return layer


__all__ = ['from_torchvision']
