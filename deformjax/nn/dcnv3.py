"""Flax NNX DCNv3 and DCNv4: InternImage's and DCNv4's deformable blocks over `deformjax.ops.dcnv3` / `dcnv4`.

Both are channel-preserving token mixers `[N, H, W, C] -> [N, H, W, C]`: a
pointwise projection of the values, a deformable aggregation over `groups`
channel groups each with its own learned sampling points and weights, and a
pointwise output projection. Parameter names mirror the PyTorch modules'
(`input_proj`, `dw_conv`, `offset`, `mask`, ... for DCNv3; `value_proj`,
`offset_mask`, ... for DCNv4) so that `deformjax.nn.convert` maps a checkpoint
one tensor to one parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from deformjax.nn import _common
from deformjax.ops import _args, offset_mask_channels

# PyTorch's default Conv2d kernel initialisation (kaiming_uniform(a=sqrt(5))): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_conv_kernel_init = initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
_xavier_uniform = initializers.xavier_uniform()
_zeros = initializers.zeros_init()


def num_taps(kernel_size: int, remove_center: bool) -> int:
  """Sampling points per group: `kernel_size**2`, less the centre tap with `remove_center`."""
  return kernel_size * kernel_size - int(remove_center)


def check_block_args(name: str, channels: int, kernel_size: int, groups: int, dilation: int,
                     padding: int | None, remove_center: bool, dw_kernel_size: int | None) -> int:
  """Validates the shared DCNv3 / DCNv4 geometry; returns the padding (default: the window's half, which keeps H, W)."""
  for arg, value in (('channels', channels), ('kernel_size', kernel_size), ('groups', groups),
                     ('kernel_dilation', dilation)):
    _args.positive_int(value, arg, name)
  if dw_kernel_size is not None:
    _args.positive_int(dw_kernel_size, 'dw_kernel_size', name)
    if dw_kernel_size % 2 == 0:
      raise ValueError(f'{name}: dw_kernel_size must be odd (the depthwise conv keeps H, W), got {dw_kernel_size}')
  if channels % groups:
    raise ValueError(f'{name}: channels={channels} must be divisible by groups={groups}')
  if remove_center and kernel_size % 2 == 0:
    raise ValueError(f'{name}: remove_center needs an odd kernel_size, got {kernel_size}')
  if padding is None:
    padding = dilation * (kernel_size - 1) // 2
  _args.pair(padding, 'padding', name)
  if 2 * padding != dilation * (kernel_size - 1):
    raise ValueError(f'{name}: padding={padding} must keep the spatial size (the offsets are predicted at every '
                     f'input pixel): 2 * padding == kernel_dilation * (kernel_size - 1) = '
                     f'{dilation * (kernel_size - 1)}')
  return int(padding)


def check_nhwc(inputs: jax.Array, channels: int, name: str) -> None:
  """Raises a ValueError naming `name` unless `inputs` is `[..., H, W, channels]`."""
  if inputs.ndim < 3 or inputs.shape[-1] != channels:
    raise ValueError(f'{name}: inputs must have shape [..., H, W, channels={channels}], got {tuple(inputs.shape)}')


def softmax_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """Softmaxes run in float32 at least: bf16 / f16 logits would lose the small weights."""
  return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def group_softmax(logits: jax.Array, groups: int) -> jax.Array:
  """Softmax over the taps of each group: `[..., groups*K] -> [..., groups*K]` (DCNv3's mask normalisation).

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.nn.dcnv3 import group_softmax
    >>> group_softmax(jnp.zeros((1, 6), jnp.float32), 2).tolist()  # two groups of three taps
    [[0.333, 0.333, 0.333, 0.333, 0.333, 0.333]]
  """
  shaped = logits.reshape(logits.shape[:-1] + (groups, logits.shape[-1] // groups))
  weights = jax.nn.softmax(shaped.astype(softmax_dtype(logits.dtype)), axis=-1)
  return weights.astype(logits.dtype).reshape(logits.shape)


def blend_center(x: jax.Array, x_proj: jax.Array, scale_logits: jax.Array, groups: int) -> jax.Array:
  """`center_feature_scale`: `x * (1 - s) + x_proj * s`, `s = sigmoid(logits)` per group `[..., groups]`,
  broadcast over each group's `C // groups` channels."""
  s = jax.nn.sigmoid(scale_logits).astype(x.dtype)
  s = jnp.repeat(s, x.shape[-1] // groups, axis=-1)
  return x * (1 - s) + x_proj * s


_Layer = Callable[[jax.Array], jax.Array]


def _flat(inputs: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """`[..., H, W, C] -> [N, H, W, C]` and the function that puts the leading dims back."""
  batch = inputs.shape[:-3]
  return inputs.reshape((-1,) + inputs.shape[-3:]), lambda a: a.reshape(batch + a.shape[1:])


def dcnv3_block(inputs: jax.Array, input_proj: _Layer, dw_conv: _Layer, norm: _Layer, offset: _Layer, mask: _Layer,
                center_feature_scale_proj: _Layer | None, output_proj: _Layer, *, kernel_size: int, groups: int,
                padding: int, dilation: int, offset_scale: float, remove_center: bool, chunk_size: int | None = None,
                memory_budget: int | None = None,
                deterministic: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """DCNv3's computation given its layers (what the NNX module and its Linen twin share).

  `inputs [..., H, W, C]` -> `(y [..., H, W, C], offsets [..., H, W, groups*K*2], mask [..., H, W, groups*K])`.
  `chunk_size`, `memory_budget`, `deterministic` go to `deformjax.ops.dcnv3`.
  """
  from deformjax.ops import dcnv3

  inputs, unflat = _flat(inputs)
  x = input_proj(inputs)
  h = jax.nn.gelu(norm(dw_conv(inputs)), approximate=False)  # torch nn.GELU is the erf form
  offsets = offset(h)
  weights = group_softmax(mask(h), groups)
  y = dcnv3(x, offsets.astype(x.dtype), weights.astype(x.dtype), kernel_size=kernel_size, padding=padding,
            dilation=dilation, groups=groups, offset_scale=offset_scale, remove_center=remove_center,
            chunk_size=chunk_size, memory_budget=memory_budget, deterministic=deterministic)
  if center_feature_scale_proj is not None:
    y = blend_center(y, x, center_feature_scale_proj(h), groups)
  return unflat(output_proj(y)), unflat(offsets), unflat(weights)


def dcnv4_block(inputs: jax.Array, value_proj: _Layer | None, offset_mask_dw: _Layer | None, offset_mask: _Layer,
                center_feature_scale_proj: _Layer | None, output_proj: _Layer | None, *, kernel_size: int, groups: int,
                padding: int, dilation: int, offset_scale: float, remove_center: bool, chunk_size: int | None = None,
                memory_budget: int | None = None, deterministic: bool = False) -> tuple[jax.Array, jax.Array]:
  """DCNv4's computation given its layers: `inputs [..., H, W, C]` -> `(y, offset_mask [..., H, W, ceil8(G*K*3)])`.

  `chunk_size`, `memory_budget`, `deterministic` go to `deformjax.ops.dcnv4`.
  """
  from deformjax.ops import dcnv4

  inputs, unflat = _flat(inputs)
  x = inputs if value_proj is None else value_proj(inputs)
  packed = offset_mask(inputs if offset_mask_dw is None else offset_mask_dw(inputs))
  y = dcnv4(x, packed.astype(x.dtype), kernel_size=kernel_size, padding=padding, dilation=dilation, groups=groups,
            offset_scale=offset_scale, remove_center=remove_center, chunk_size=chunk_size, memory_budget=memory_budget,
            deterministic=deterministic)
  if center_feature_scale_proj is not None:
    y = blend_center(y, x, center_feature_scale_proj(y), groups)  # the reference gates on the aggregated values
  if output_proj is not None:
    y = output_proj(y)
  return unflat(y), unflat(packed)


def _linear(cin, cout, *, use_bias=True, kernel_init=_xavier_uniform, dtype, param_dtype, precision, rngs):
  return nnx.Linear(cin, cout, use_bias=use_bias, kernel_init=kernel_init, bias_init=_zeros, dtype=dtype,
                    param_dtype=param_dtype, precision=precision, rngs=rngs)


def _depthwise(channels, kernel_size, *, dtype, param_dtype, precision, rngs):
  return nnx.Conv(channels, channels, (kernel_size, kernel_size), padding=(kernel_size - 1) // 2,
                  feature_group_count=channels, kernel_init=_torch_conv_kernel_init, bias_init=_zeros, dtype=dtype,
                  param_dtype=param_dtype, precision=precision, rngs=rngs)


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
    groups: channel groups, each with its own offsets and mask (`group`).
    padding: of the sampling window; default and only value that keeps H, W:
      `kernel_dilation * (kernel_size - 1) // 2` (the offsets come per input pixel).
    kernel_dilation: dilation of the sampling window (`dilation`).
    offset_scale: scales the offsets and the dilation grid, as the reference.
    dw_kernel_size: the offset branch's depthwise kernel (default `kernel_size`).
    center_feature_scale: the learned gate described above.
    remove_center: drop the centre tap (odd kernels).
    layer_norm_epsilon: the offset branch's LayerNorm epsilon.
    dtype, param_dtype, precision: as `nnx.Linear`.
    chunk_size, memory_budget, deterministic: the execution policy, passed to
      `deformjax.ops.dcnv3`, as `DeformConv`'s to `deform_conv2d`.
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
               dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
               precision: jax.lax.PrecisionLike = None, chunk_size: int | None = None,
               memory_budget: int | None = None, deterministic: bool = False, rngs: nnx.Rngs):
    name = type(self).__name__
    self.padding = check_block_args(name, channels, kernel_size, groups, kernel_dilation, padding, remove_center,
                                    dw_kernel_size)
    self.policy = _common.sampling_policy(chunk_size, memory_budget, deterministic, name)
    self.channels, self.kernel_size, self.groups = channels, kernel_size, groups
    self.dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
    self.kernel_dilation, self.offset_scale = kernel_dilation, float(offset_scale)
    self.remove_center, self.center_feature_scale = bool(remove_center), bool(center_feature_scale)
    self.dtype = dtype
    taps = groups * num_taps(kernel_size, remove_center)
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.input_proj = _linear(channels, channels, **kw)
    self.dw_conv = _depthwise(channels, self.dw_kernel_size, **kw)
    self.norm = nnx.LayerNorm(channels, epsilon=layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.offset = _linear(channels, taps * 2, kernel_init=_zeros, **kw)
    self.mask = _linear(channels, taps, kernel_init=_zeros, **kw)
    self.center_feature_scale_proj = (_linear(channels, groups, kernel_init=_zeros, **kw)
                                      if center_feature_scale else None)
    self.output_proj = _linear(channels, channels, **kw)

  def __call__(self, inputs: jax.Array, *,
               return_offsets: bool = False) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """`inputs [..., H, W, C]` -> `[..., H, W, C]`; with `return_offsets`, also the
    offsets `[..., H, W, groups*K*2]` and the (softmaxed) mask `[..., H, W, groups*K]` used."""
    check_nhwc(inputs, self.channels, type(self).__name__)
    y, offsets, mask = dcnv3_block(
        inputs, self.input_proj, self.dw_conv, self.norm, self.offset, self.mask, self.center_feature_scale_proj,
        self.output_proj, kernel_size=self.kernel_size, groups=self.groups, padding=self.padding,
        dilation=self.kernel_dilation, offset_scale=self.offset_scale, remove_center=self.remove_center,
        **self.policy.as_kwargs())
    return (y, offsets, mask) if return_offsets else y


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
    groups: channel groups (`group`).
    padding, kernel_dilation, offset_scale, remove_center: as `DCNv3`.
    dw_kernel_size: if set, a depthwise conv before `offset_mask` (`offset_mask_dw`).
    center_feature_scale: the learned gate described above.
    output_bias: `output_proj` has a bias.
    without_pointwise: no `value_proj` / `output_proj`.
    dtype, param_dtype, precision: as `nnx.Linear`.
    chunk_size, memory_budget, deterministic: the execution policy, passed to
      `deformjax.ops.dcnv4`, as `DeformConv`'s to `deform_conv2d`.
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
               without_pointwise: bool = False, dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
               precision: jax.lax.PrecisionLike = None, chunk_size: int | None = None,
               memory_budget: int | None = None, deterministic: bool = False, rngs: nnx.Rngs):
    name = type(self).__name__
    self.padding = check_block_args(name, channels, kernel_size, groups, kernel_dilation, padding, remove_center,
                                    dw_kernel_size)
    self.policy = _common.sampling_policy(chunk_size, memory_budget, deterministic, name)
    self.channels, self.kernel_size, self.groups = channels, kernel_size, groups
    self.dw_kernel_size = dw_kernel_size
    self.kernel_dilation, self.offset_scale = kernel_dilation, float(offset_scale)
    self.remove_center, self.center_feature_scale = bool(remove_center), bool(center_feature_scale)
    self.without_pointwise = bool(without_pointwise)
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.value_proj = None if without_pointwise else _linear(channels, channels, **kw)
    self.offset_mask_dw = None if dw_kernel_size is None else _depthwise(channels, dw_kernel_size, **kw)
    self.offset_mask = _linear(channels, offset_mask_channels(groups, num_taps(kernel_size, remove_center)),
                               kernel_init=_zeros, **kw)
    self.center_feature_scale_proj = (_linear(channels, groups, kernel_init=_zeros, **kw)
                                      if center_feature_scale else None)
    self.output_proj = (None if without_pointwise else
                        _linear(channels, channels, use_bias=output_bias, **kw))

  def __call__(self, inputs: jax.Array, *, return_offsets: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`inputs [..., H, W, C]` -> `[..., H, W, C]`; with `return_offsets`, also the packed
    `offset_mask [..., H, W, ceil8(groups*K*3)]` used."""
    check_nhwc(inputs, self.channels, type(self).__name__)
    y, offset_mask = dcnv4_block(
        inputs, self.value_proj, self.offset_mask_dw, self.offset_mask, self.center_feature_scale_proj,
        self.output_proj, kernel_size=self.kernel_size, groups=self.groups, padding=self.padding,
        dilation=self.kernel_dilation, offset_scale=self.offset_scale, remove_center=self.remove_center,
        **self.policy.as_kwargs())
    return (y, offset_mask) if return_offsets else y


__all__ = ['DCNv3', 'DCNv4', 'blend_center', 'check_block_args', 'check_nhwc', 'dcnv3_block', 'dcnv4_block',
           'group_softmax', 'num_taps', 'softmax_dtype']
