"""Flax NNX DCNv4: OpenGVLab's DCNv4 block over `deformjax.ops.dcnv4`.

A channel-preserving token mixer `[N, H, W, C] -> [N, H, W, C]` like
`deformjax.nn.DCNv3`, with one linear head predicting DCNv4's packed
offsets and (unnormalised) mask. Parameter names mirror the PyTorch module's
(`value_proj`, `offset_mask`, `offset_mask_dw`, ...) so that
`deformjax.convert` maps a checkpoint one tensor to one parameter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from jax.typing import DTypeLike

from deformjax.nn import _common
from deformjax.nn._blocks import dcnv4_block, split_offset_mask
from deformjax.nn.sampling import Sampling
from deformjax.ops import offset_mask_channels

_zeros = initializers.zeros_init()


class DCNv4(nnx.Module):
  """DCNv4's block (OpenGVLab/DCNv4 `DCNv4_op/DCNv4/modules/dcnv4.py::DCNv4`), NHWC `[..., H, W, C]`.

  `x = value_proj(inputs)`; one zero-initialised linear head `offset_mask`
  (of `inputs`, or of a depthwise conv of them when `dw_kernel_size` is set)
  predicts DCNv4's packed `[..., ceil8(groups*K*3)]` (per group K (x, y) offset
  pairs then K mask values, the padding channels unused); `deformjax.ops.dcnv4`
  aggregates `x` with the mask as given (no softmax: DCNv4's point), and
  `output_proj` mixes the channels. With `center_feature_scale`, a
  zero-initialised per-group gate computed from the aggregated values, as the
  reference does, blends `y * (1 - s) + value_proj(inputs) * s`.
  `without_pointwise` drops both projections (the reference's option).

  The reference takes `[N, H*W, C]` plus `shape=(H, W)`; this takes `[..., H, W, C]`
  (reshape a token sequence to the image first). A fresh block computes zero
  (zero mask): the reference's initialisation, which the surrounding residual
  block is built around.

  Initialisation (the reference's): `value_proj` / `output_proj` Xavier-uniform
  kernels and zero biases; `offset_mask` (and the gate) zeros; `offset_mask_dw`
  PyTorch's default conv kernel distribution and a zero bias.

  Args:
    channels: C, in and out.
    kernel_size: the sampling window (square).
    groups: channel groups, each with its own offsets and mask (DCNv4's `group`;
      `DeformConv`'s `offset_groups`).
    padding: of the sampling window; default and only value: the one that keeps H, W.
    kernel_dilation: dilation of the sampling window.
    offset_scale: scales the offsets and the dilation grid, as the reference.
    remove_center: drop the centre tap (odd kernels).
    dw_kernel_size: if set, a depthwise conv before `offset_mask` (`offset_mask_dw`).
    center_feature_scale: the learned gate described above.
    output_bias: `output_proj` has a bias.
    without_pointwise: no `value_proj` / `output_proj`.
    dtype: the computation dtype, as `nnx.Linear`'s.
    param_dtype: the parameters' dtype, as `nnx.Linear`'s.
    precision: of the projections, as `nnx.Linear`'s.
    chunk_size: most output pixels per pass of `dcnv4` (None: the execution policy).
    memory_budget: most bytes of sampled values per pass of `dcnv4`.
    deterministic_gradients: bit-identical gradients run to run on GPU/TPU (reverse mode only).
    rngs: random number generators (keyword-only).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.nn import DCNv4
    >>> layer = DCNv4(32, 3, groups=2, rngs=nnx.Rngs(0))
    >>> layer.offset_mask.out_features  # ceil8(2 * 9 * 3)
    56
    >>> layer(jnp.ones((2, 8, 8, 32), jnp.float32)).shape
    (2, 8, 8, 32)
  """

  def __init__(self, channels: int, kernel_size: int = 3, *, groups: int = 4, padding: int | None = None,
               kernel_dilation: int = 1, offset_scale: float = 1.0, dw_kernel_size: int | None = None,
               center_feature_scale: bool = False, remove_center: bool = False, output_bias: bool = True,
               without_pointwise: bool = False, dtype: DTypeLike | None = None, param_dtype: DTypeLike = jnp.float32,
               precision: jax.lax.PrecisionLike = None, chunk_size: int | None = None,
               memory_budget: int | None = None, deterministic_gradients: bool = False, rngs: nnx.Rngs):
    name = type(self).__name__
    self.padding = _common.check_block_args(name, channels, kernel_size, groups, kernel_dilation, padding,
                                            remove_center, dw_kernel_size)
    self.policy = _common.sampling_policy(chunk_size, memory_budget, deterministic_gradients, name)
    self.channels, self.kernel_size, self.groups = channels, kernel_size, groups
    self.dw_kernel_size = dw_kernel_size
    self.kernel_dilation, self.offset_scale = kernel_dilation, float(offset_scale)
    self.remove_center, self.center_feature_scale = bool(remove_center), bool(center_feature_scale)
    self.without_pointwise = bool(without_pointwise)
    self.dtype = dtype
    kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.value_proj = None if without_pointwise else _common.linear(channels, channels, **kw)
    self.offset_mask_dw = None if dw_kernel_size is None else _common.depthwise_conv(channels, dw_kernel_size, **kw)
    packed = offset_mask_channels(groups, _common.num_taps(kernel_size, remove_center))
    self.offset_mask = _common.linear(channels, packed, kernel_init=_zeros, **kw)
    self.center_feature_scale_proj = (_common.linear(channels, groups, kernel_init=_zeros, **kw)
                                      if center_feature_scale else None)
    self.output_proj = (None if without_pointwise else
                        _common.linear(channels, channels, use_bias=output_bias, **kw))

  def __call__(self, inputs: jax.Array, *, return_sampling: bool = False) -> jax.Array | tuple[jax.Array, Sampling]:
    """`inputs [..., H, W, C]` -> `[..., H, W, C]`; with `return_sampling`, `(y, Sampling(offsets, mask))`: the
    offsets `[..., H, W, groups*K*2]` and mask `[..., H, W, groups*K]` split out of the packed offset_mask used."""
    _common.check_in_features(inputs, self.channels, type(self).__name__, 'channels')
    y, offset_mask = dcnv4_block(
        inputs, self.value_proj, self.offset_mask_dw, self.offset_mask, self.center_feature_scale_proj,
        self.output_proj, kernel_size=self.kernel_size, groups=self.groups, padding=self.padding,
        dilation=self.kernel_dilation, offset_scale=self.offset_scale, remove_center=self.remove_center,
        **self.policy.as_kwargs())
    if not return_sampling:
      return y
    return y, Sampling(*split_offset_mask(offset_mask, self.groups, _common.num_taps(self.kernel_size,
                                                                                     self.remove_center)))


__all__ = ['DCNv4']
