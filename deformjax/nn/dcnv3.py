"""Flax NNX DCNv3: InternImage's deformable block over `deformjax.ops.dcnv3`.

A channel-preserving token mixer `[N, H, W, C] -> [N, H, W, C]`: a pointwise
projection of the values, a deformable aggregation over `groups` channel
groups each with its own learned sampling points and softmaxed weights, and a
pointwise output projection. Parameter names mirror the PyTorch module's
(`input_proj`, `dw_conv`, `offset`, `mask`, ...) so that `deformjax.convert`
maps a checkpoint one tensor to one parameter. `deformjax.nn.dcnv4` is its
DCNv4 sibling; what the two share lives in `deformjax.nn._common`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from jax.typing import DTypeLike

from deformjax.nn import _common
from deformjax.nn._blocks import dcnv3_block
from deformjax.nn.sampling import Sampling

_zeros = initializers.zeros_init()


class DCNv3(nnx.Module):
  """InternImage's DCNv3 block (`ops_dcnv3/modules/dcnv3.py::DCNv3`), NHWC `[..., H, W, C] -> [..., H, W, C]`.

  `x = input_proj(inputs)`; the offset branch `h = GELU(LayerNorm(dw_conv(inputs)))`
  (a depthwise conv) feeds two zero-initialised linear heads, `offset(h)`
  (`groups*K*2` (x, y) offsets) and `mask(h)` (`groups*K` logits, softmax over the
  K taps of each group); `deformjax.ops.dcnv3` aggregates `x` at those points,
  and `output_proj` mixes the channels. With `center_feature_scale`, a
  zero-initialised per-group gate `s = sigmoid(center_feature_scale_proj(h))`
  blends `x * (1 - s) + input_proj(inputs) * s` before the output projection.
  `K = kernel_size**2` (less one with `remove_center`).

  A fresh block samples the regular `kernel_size` window with equal weights
  `1/K` (zero offsets, uniform softmax): a depthwise box filter between two
  linear layers.

  Initialisation (the reference's): `input_proj` / `output_proj` Xavier-uniform
  kernels and zero biases; `offset`, `mask` (and the gate) all zeros;
  `dw_conv` PyTorch's default conv kernel distribution (U(+-1/sqrt(fan_in))) and
  a zero bias; LayerNorm ones / zeros, epsilon 1e-6.

  Args:
    channels: C, in and out.
    kernel_size: the sampling window (square).
    groups: channel groups, each with its own offsets and mask (InternImage's
      `group`; `DeformConv`'s `offset_groups`).
    padding: of the sampling window; default and only value that keeps H, W:
      `kernel_dilation * (kernel_size - 1) // 2` (the offsets come per input pixel).
    kernel_dilation: dilation of the sampling window (`dilation`).
    offset_scale: scales the offsets and the dilation grid, as the reference.
    dw_kernel_size: the offset branch's depthwise kernel (default `kernel_size`).
    center_feature_scale: the learned gate described above.
    remove_center: drop the centre tap (odd kernels).
    layer_norm_epsilon: the offset branch's LayerNorm epsilon.
    dtype: the computation dtype, as `nnx.Linear`'s.
    param_dtype: the parameters' dtype, as `nnx.Linear`'s.
    precision: of the projections, as `nnx.Linear`'s.
    chunk_size: most output pixels per pass of `dcnv3` (None: the execution policy).
    memory_budget: most bytes of sampled values per pass of `dcnv3`.
    deterministic_gradients: bit-identical gradients run to run on GPU/TPU (reverse mode only).
    rngs: random number generators (keyword-only).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.nn import DCNv3
    >>> layer = DCNv3(16, 3, groups=4, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 8, 8, 16), jnp.float32)).shape
    (2, 8, 8, 16)
  """

  def __init__(self, channels: int, kernel_size: int = 3, *, groups: int = 4, padding: int | None = None,
               kernel_dilation: int = 1, offset_scale: float = 1.0, dw_kernel_size: int | None = None,
               center_feature_scale: bool = False, remove_center: bool = False, layer_norm_epsilon: float = 1e-6,
               dtype: DTypeLike | None = None, param_dtype: DTypeLike = jnp.float32,
               precision: jax.lax.PrecisionLike = None, chunk_size: int | None = None,
               memory_budget: int | None = None, deterministic_gradients: bool = False, rngs: nnx.Rngs):
    name = type(self).__name__
    self.padding = _common.check_block_args(name, channels, kernel_size, groups, kernel_dilation, padding,
                                            remove_center, dw_kernel_size)
    self.policy = _common.sampling_policy(chunk_size, memory_budget, deterministic_gradients, name)
    self.channels, self.kernel_size, self.groups = channels, kernel_size, groups
    self.dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
    self.kernel_dilation, self.offset_scale = kernel_dilation, float(offset_scale)
    self.remove_center, self.center_feature_scale = bool(remove_center), bool(center_feature_scale)
    self.dtype = dtype
    taps = groups * _common.num_taps(kernel_size, remove_center)
    kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.input_proj = _common.linear(channels, channels, **kw)
    self.dw_conv = _common.depthwise_conv(channels, self.dw_kernel_size, **kw)
    self.norm = nnx.LayerNorm(channels, epsilon=layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.offset = _common.linear(channels, taps * 2, kernel_init=_zeros, **kw)
    self.mask = _common.linear(channels, taps, kernel_init=_zeros, **kw)
    self.center_feature_scale_proj = (_common.linear(channels, groups, kernel_init=_zeros, **kw)
                                      if center_feature_scale else None)
    self.output_proj = _common.linear(channels, channels, **kw)

  def __call__(self, inputs: jax.Array, *, return_sampling: bool = False) -> jax.Array | tuple[jax.Array, Sampling]:
    """`inputs [..., H, W, C]` -> `[..., H, W, C]`; with `return_sampling`, `(y, Sampling(offsets, mask))`:
    the offsets `[..., H, W, groups*K*2]` and the (softmaxed) mask `[..., H, W, groups*K]` used."""
    _common.check_in_features(inputs, self.channels, type(self).__name__, 'channels')
    y, offsets, mask = dcnv3_block(
        inputs, self.input_proj, self.dw_conv, self.norm, self.offset, self.mask, self.center_feature_scale_proj,
        self.output_proj, kernel_size=self.kernel_size, groups=self.groups, padding=self.padding,
        dilation=self.kernel_dilation, offset_scale=self.offset_scale, remove_center=self.remove_center,
        **self.policy.as_kwargs())
    return (y, Sampling(offsets, mask)) if return_sampling else y


__all__ = ['DCNv3']
