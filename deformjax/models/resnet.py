"""ResNet pyramid backbones with frozen batch norm, NHWC, as Deformable DETR's backbones compute them.

One architecture, the two parameter layouts transformers' Deformable DETR uses:

- timm's `resnet18` / `resnet34` / `resnet50` / `resnet101` / `resnet152` (`use_timm_backbone=True`, the
  layout of the official `SenseTime/deformable-detr*` checkpoints): a bottleneck block strides in its 3x3 conv;
- transformers' own `ResNetBackbone` (`ResNetConfig`): `embedding_size`, `hidden_sizes`, `depths`,
  `layer_type`; a bottleneck block strides in its first 1x1 conv when `downsample_in_bottleneck`.

The stem is a 7x7 stride-2 conv (no bias), a frozen batch norm, ReLU and a 3x3 stride-2 max pool (padding 1);
four stages of residual blocks follow, the first at stride 1 (2 with transformers' `downsample_in_first_stage`)
and the others at stride 2. A block's shortcut is a 1x1 conv and a frozen batch norm where the width or the
stride changes. Every batch norm is frozen (transformers' `DeformableDetrFrozenBatchNorm2d`): `x * s + b` with
`s = weight * rsqrt(running_var + 1e-5)` and `b = bias - running_mean * s`, its four vectors `nnx.BatchStat`s,
so that an optimiser over `nnx.Param` leaves them alone, as the references do.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from jax.typing import DTypeLike

from deformjax.ops import _args

# PyTorch's default Conv2d kernel initialisation (kaiming_uniform(a=sqrt(5))): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_conv_init = initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')

# timm's ResNets by name: (block, blocks per stage, output width per stage).
RESNET_PRESETS = MappingProxyType({
    'resnet18': ('basic', (2, 2, 2, 2), (64, 128, 256, 512)),
    'resnet34': ('basic', (3, 4, 6, 3), (64, 128, 256, 512)),
    'resnet50': ('bottleneck', (3, 4, 6, 3), (256, 512, 1024, 2048)),
    'resnet101': ('bottleneck', (3, 4, 23, 3), (256, 512, 1024, 2048)),
    'resnet152': ('bottleneck', (3, 8, 36, 3), (256, 512, 1024, 2048)),
})


class FrozenBatchNorm(nnx.Module):
  """Batch norm with fixed statistics and affine parameters (transformers' `DeformableDetrFrozenBatchNorm2d`).

  `x * s + (bias - running_mean * s)` with `s = weight * rsqrt(running_var + epsilon)`, over the last axis.
  The four vectors are `nnx.BatchStat`s: not trained by an optimiser over `nnx.Param`.

  Args:
    num_features: channels (the last axis).
    epsilon: added to the variance (1e-5, as transformers).
    param_dtype: the vectors' dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.models.resnet import FrozenBatchNorm
    >>> FrozenBatchNorm(4)(jnp.ones((1, 2, 2, 4), jnp.float32)).shape
    (1, 2, 2, 4)
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-5, param_dtype: DTypeLike = jnp.float32):
    self.num_features, self.epsilon = num_features, epsilon
    self.weight = nnx.BatchStat(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
    self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
    self.running_var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises `x [..., num_features]` with the fixed statistics."""
    if x.shape[-1] != self.num_features:
      raise ValueError(f'FrozenBatchNorm: x must have {self.num_features} channels last, got shape {tuple(x.shape)}')
    scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.epsilon)
    bias = self.bias[...] - self.running_mean[...] * scale
    shape = (1,) * (x.ndim - 1) + (-1,)  # rank-explicit: [C] over [..., C]
    return x * scale.astype(x.dtype).reshape(shape) + bias.astype(x.dtype).reshape(shape)


class ResNetBlock(nnx.Module):
  """A residual block: `relu(norms(convs(x)) + shortcut(x))`, basic (two 3x3) or bottleneck (1x1, 3x3, 1x1).

  Args:
    in_features, out_features: widths (a bottleneck's inner width is `out_features // 4`).
    block: `'basic'` or `'bottleneck'`.
    stride: the block's stride (1 or 2).
    stride_in_1x1: a bottleneck strides in its first 1x1 conv (transformers' `downsample_in_bottleneck`)
      instead of its 3x3 conv (timm's).
    dtype, param_dtype, precision: as `nnx.Conv`.
    rngs: random number generators.
  """

  def __init__(self, in_features: int, out_features: int, *, block: str = 'basic', stride: int = 1,
               stride_in_1x1: bool = False, dtype: DTypeLike | None = None, param_dtype: DTypeLike = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    conv: dict[str, Any] = dict(use_bias=False, kernel_init=_torch_conv_init, dtype=dtype, param_dtype=param_dtype,
                                precision=precision, rngs=rngs)
    if block == 'basic':
      specs = [(in_features, out_features, 3, stride), (out_features, out_features, 3, 1)]
    else:
      mid = out_features // 4
      specs = [(in_features, mid, 1, stride if stride_in_1x1 else 1), (mid, mid, 3, 1 if stride_in_1x1 else stride),
               (mid, out_features, 1, 1)]
    self.convs = nnx.List([nnx.Conv(cin, cout, (k, k), strides=s, padding=((k // 2,) * 2,) * 2, **conv)
                           for cin, cout, k, s in specs])
    self.norms = nnx.List([FrozenBatchNorm(cout, param_dtype=param_dtype) for _, cout, _, _ in specs])
    if in_features != out_features or stride != 1:
      self.shortcut_conv: nnx.Conv | None = nnx.Conv(in_features, out_features, (1, 1), strides=stride,
                                                     padding='VALID', **conv)
      self.shortcut_norm: FrozenBatchNorm | None = FrozenBatchNorm(out_features, param_dtype=param_dtype)
    else:
      self.shortcut_conv = self.shortcut_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [N, H, W, in_features]` -> `[N, H / stride, W / stride, out_features]`."""
    h = x
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      h = norm(conv(h))
      if i < len(self.convs) - 1:
        h = jax.nn.relu(h)
    shortcut = x
    if self.shortcut_conv is not None:
      assert self.shortcut_norm is not None  # built with shortcut_conv
      shortcut = self.shortcut_norm(self.shortcut_conv(x))
    return jax.nn.relu(h + shortcut)


def _max_pool_3x3(x: jax.Array) -> jax.Array:
  """PyTorch's `MaxPool2d(3, stride=2, padding=1)` on `x [N, H, W, C]`: the maximum of nine strided slices of `x`
  (standard ONNX operators, where a reduce-window would export as a `MaxPool` over NHWC)."""
  h, w = x.shape[1:3]
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  # Edge rows and columns repeated in place of -inf padding: a window's maximum is the same (the repeated value
  # is already in the window), and the graph needs no Pad over a symbolic batch.
  padded = jnp.concatenate([x[:, :1], x, x[:, -1:]], axis=1)
  padded = jnp.concatenate([padded[:, :, :1], padded, padded[:, :, -1:]], axis=2)
  taps = [padded[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2] for i in range(3) for j in range(3)]
  return functools.reduce(jnp.maximum, taps)


class ResNet(nnx.Module):
  """A ResNet returning the maps of the stages Deformable DETR reads (timm's or transformers' ResNet backbone).

  Args:
    depths: blocks per stage (four stages).
    widths: output width of each stage (a bottleneck's is four times its inner width).
    block: `'basic'` or `'bottleneck'`.
    stem_features: the stem conv's width (64; transformers' `embedding_size`).
    in_features: image channels.
    out_indices: the stages returned, 1 to 4 (stage `i` has stride `2 ** (i + 1)`), increasing;
      Deformable DETR reads `(2, 3, 4)`, or `(4,)` with one feature level.
    stride_in_1x1: see `ResNetBlock` (transformers' `downsample_in_bottleneck`).
    downsample_in_first_stage: the first stage strides 2 (transformers' option; timm's never does).
    dtype, param_dtype, precision: as `nnx.Conv`.
    rngs: random number generators.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.models import ResNet
    >>> net = nnx.eval_shape(lambda: ResNet((1, 1, 1, 1), (8, 16, 32, 64), stem_features=8, rngs=nnx.Rngs(0)))
    >>> maps = nnx.eval_shape(lambda m, x: m(x), net, jnp.ones((1, 64, 64, 3), jnp.float32))  # shapes only
    >>> [m.shape for m in maps], net.channels
    ([(1, 8, 8, 16), (1, 4, 4, 32), (1, 2, 2, 64)], (16, 32, 64))
  """

  def __init__(self, depths: Sequence[int], widths: Sequence[int], *, block: str = 'basic',
               stem_features: int = 64, in_features: int = 3, out_indices: Sequence[int] = (2, 3, 4),
               stride_in_1x1: bool = False, downsample_in_first_stage: bool = False,
               dtype: DTypeLike | None = None, param_dtype: DTypeLike = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    name = type(self).__name__
    depths = tuple(_args.positive_int(d, 'depths', name) for d in depths)
    widths = tuple(_args.positive_int(w, 'widths', name) for w in widths)
    if len(depths) != 4 or len(widths) != 4:
      raise ValueError(f'{name}: depths and widths must list 4 stages, got {depths} and {widths}')
    if block not in ('basic', 'bottleneck'):
      raise ValueError(f"{name}: block must be 'basic' or 'bottleneck', got {block!r}")
    out_indices = tuple(out_indices)
    if not out_indices or any(i not in (1, 2, 3, 4) for i in out_indices) or list(out_indices) != sorted(
        set(out_indices)):
      raise ValueError(f'{name}: out_indices must be increasing stages among 1..4, got {out_indices}')
    self.out_indices, self.widths = out_indices, widths
    kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.stem_conv = nnx.Conv(_args.positive_int(in_features, 'in_features', name), stem_features, (7, 7),
                              strides=2, padding=((3, 3), (3, 3)), use_bias=False, kernel_init=_torch_conv_init, **kw)
    self.stem_norm = FrozenBatchNorm(stem_features, param_dtype=param_dtype)
    stages, cin = [], stem_features
    for i, (depth, width) in enumerate(zip(depths, widths)):
      stride = 2 if i > 0 or downsample_in_first_stage else 1
      stages.append(nnx.List([ResNetBlock(cin if j == 0 else width, width, block=block, stride=stride if j == 0 else 1,
                                          stride_in_1x1=stride_in_1x1, **kw) for j in range(depth)]))
      cin = width
    self.stages = nnx.List(stages)

  @property
  def channels(self) -> tuple[int, ...]:
    """The widths of the returned maps."""
    return tuple(self.widths[i - 1] for i in self.out_indices)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """`x [N, H, W, in_features]` -> the maps of `out_indices`, NHWC, highest resolution first."""
    if x.ndim != 4 or x.shape[-1] != self.stem_conv.in_features:
      raise ValueError(f'{type(self).__name__}: x must have shape [N, H, W, {self.stem_conv.in_features}] (NHWC), '
                       f'got {tuple(x.shape)}')
    h = jax.nn.relu(self.stem_norm(self.stem_conv(x)))
    h = _max_pool_3x3(h)
    out = []
    for i, stage in enumerate(self.stages, start=1):
      if i > self.out_indices[-1]:
        break
      for block in stage:
        h = block(h)
      if i in self.out_indices:
        out.append(h)
    return out


def resnet_preset(name: str, *, out_indices: Sequence[int] = (2, 3, 4), **kwargs: Any) -> ResNet:
  """timm's ResNet `name` (a key of `RESNET_PRESETS`) as a `ResNet` with frozen batch norm.

  Args:
    name: `'resnet18'`, `'resnet34'`, `'resnet50'`, `'resnet101'` or `'resnet152'`.
    out_indices: the stages returned (see `ResNet`).
    kwargs: `ResNet`'s other keywords (`dtype`, `param_dtype`, `precision`, `rngs`, ...).

  Example:
    >>> from flax import nnx
    >>> from deformjax.models import resnet_preset
    >>> nnx.eval_shape(lambda: resnet_preset('resnet50', rngs=nnx.Rngs(0))).channels
    (512, 1024, 2048)
  """
  if name not in RESNET_PRESETS:
    raise ValueError(f'resnet_preset: name must be one of {sorted(RESNET_PRESETS)}, got {name!r}')
  block, depths, widths = RESNET_PRESETS[name]
  return ResNet(depths, widths, block=block, out_indices=out_indices, **kwargs)


__all__ = ['RESNET_PRESETS', 'FrozenBatchNorm', 'ResNet', 'ResNetBlock', 'resnet_preset']
