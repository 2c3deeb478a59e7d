"""InternImage (DCNv3) and FlashInternImage (DCNv4) image classifiers, NHWC, with the official presets.

The architecture is the reference classifiers' (`classification/models/intern_image.py`
of InternImage, `classification/models/flash_intern_image.py` of DCNv4), for the
T / S / B configurations of their `configs/*_1k_224.yaml`:

- stem: conv 3x3 stride 2 (3 -> C/2) -> LayerNorm -> GELU -> conv 3x3 stride 2 (C/2 -> C) -> LayerNorm;
- 4 levels of `depths[i]` blocks at `C * 2**i` channels with `groups[i]` DCN groups; a block is
  `x + drop_path(gamma1 * dcn(norm1(x)))` then `x + drop_path(gamma2 * mlp(norm2(x)))`, or with
  `post_norm` `x + drop_path(gamma1 * norm1(dcn(x)))` (and the same for the MLP); `gamma` is the
  layer scale (absent: 1); the MLP is Linear -> GELU -> Linear at `mlp_ratio` times the width;
- after its blocks a level applies a LayerNorm (not with `post_norm`) and, except the last, a
  downsampling conv 3x3 stride 2 (no bias, doubling the channels) -> LayerNorm;
- the head: conv 1x1 (no bias) to `cls_scale` times the last width (768 -> 1152 for T) -> BatchNorm ->
  GELU -> global average pool -> Linear to the classes.

The DCN core is `deformjax.nn.DCNv3` (InternImage: LayerNorm + GELU offset branch on a depthwise
conv, softmax mask) or `deformjax.nn.DCNv4` (FlashInternImage: packed offset/mask head, optional
depthwise conv before it, no output-projection bias, and no bias on the MLP's second layer).
Every LayerNorm has epsilon 1e-6; the head's BatchNorm PyTorch's defaults (epsilon 1e-5,
momentum 0.1, i.e. flax momentum 0.9). Parameter names follow the reference modules
(`patch_embed`, `levels[i].blocks[j].dcn`, `conv_head`, `head`), so that
`deformjax.convert` maps an official checkpoint one tensor to one parameter.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from jax.typing import DTypeLike

from deformjax.nn import DCNv3, DCNv4

# PyTorch's default Conv2d kernel initialisation (kaiming_uniform(a=sqrt(5))): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_conv_init = initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
# The references' trunc_normal_(std=.02) truncates at +-2 in absolute terms (100 standard deviations): a normal.
_linear_init = initializers.normal(0.02)
_zeros = initializers.zeros_init()
_LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class InternImageConfig:
  """The architecture of an InternImage / FlashInternImage classifier (the reference's constructor arguments).

  Attributes:
    channels: width of the first level (`C`); level `i` has `C * 2**i`.
    depths: blocks per level.
    groups: DCN channel groups per level (each must divide its level's width).
    mlp_ratio: the MLP's hidden width over the block width.
    offset_scale: the DCN's `offset_scale`.
    layer_scale: initial value of the per-channel `gamma1` / `gamma2` (None: no layer scale).
    post_norm: blocks normalise after the DCN / MLP instead of before (and levels have no final norm).
    dw_kernel_size: the DCN's depthwise kernel in the offset branch (DCNv3: None means the
      sampling kernel, 3; DCNv4: None means no depthwise conv).
    drop_path_rate: stochastic depth of the last block (linear from 0 over all blocks).
    cls_scale: width of the head's 1x1 conv over the last level's width.
    mlp_fc2_bias: the MLP's second linear layer has a bias (InternImage: yes; FlashInternImage: no).
    dcn_output_bias: the DCN's output projection has a bias (DCNv4 only; DCNv3's always has one).
  """

  channels: int
  depths: tuple[int, ...]
  groups: tuple[int, ...]
  mlp_ratio: float = 4.0
  offset_scale: float = 1.0
  layer_scale: float | None = None
  post_norm: bool = False
  dw_kernel_size: int | None = None
  drop_path_rate: float = 0.0
  cls_scale: float = 1.5
  mlp_fc2_bias: bool = True
  dcn_output_bias: bool = True

  def __post_init__(self):
    if len(self.depths) != len(self.groups) or not self.depths:
      raise ValueError(f'InternImageConfig: depths {self.depths} and groups {self.groups} must be non-empty and '
                       'of the same length (one entry per level)')
    for i, g in enumerate(self.groups):
      if (self.channels * 2**i) % g:
        raise ValueError(f'InternImageConfig: groups[{i}]={g} must divide level {i} width '
                         f'channels * 2**{i} = {self.channels * 2**i}')
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f'InternImageConfig: drop_path_rate must be in [0, 1), got {self.drop_path_rate}')

  @property
  def num_features(self) -> int:
    """Width of the last level."""
    return self.channels * 2 ** (len(self.depths) - 1)


# The official ImageNet-1k 224 configurations (`classification/configs/internimage_{t,s,b}_1k_224.yaml`), plus
# 'micro': a 16-channel, one-block-per-level model for tests (not an official size; InternImage-T is 't').
INTERNIMAGE_PRESETS: Mapping[str, InternImageConfig] = types.MappingProxyType({
    't': InternImageConfig(64, (4, 4, 18, 4), (4, 8, 16, 32), drop_path_rate=0.1),
    's': InternImageConfig(80, (4, 4, 21, 4), (5, 10, 20, 40), layer_scale=1e-5, post_norm=True, drop_path_rate=0.4),
    'b': InternImageConfig(112, (4, 4, 21, 4), (7, 14, 28, 56), layer_scale=1e-5, post_norm=True,
                           drop_path_rate=0.5),
    'micro': InternImageConfig(16, (1, 1, 1, 1), (1, 2, 4, 8)),
})
# `classification/configs/flash_intern_image_{t,s,b}_1k_224.yaml` of DCNv4 (16 channels per group, as its
# kernel requires), plus the same 'micro' test model.
FLASH_INTERNIMAGE_PRESETS: Mapping[str, InternImageConfig] = types.MappingProxyType({
    name: dataclasses.replace(cfg, mlp_fc2_bias=False, dcn_output_bias=False) for name, cfg in {
        't': InternImageConfig(64, (4, 4, 18, 4), (4, 8, 16, 32), drop_path_rate=0.1),
        's': InternImageConfig(80, (4, 4, 21, 4), (5, 10, 20, 40), layer_scale=1e-5, post_norm=True,
                               dw_kernel_size=3, drop_path_rate=0.4),
        'b': InternImageConfig(112, (4, 4, 21, 4), (7, 14, 28, 56), layer_scale=1e-5, offset_scale=0.5,
                               post_norm=True, dw_kernel_size=3, drop_path_rate=0.5),
        'micro': InternImageConfig(16, (1, 1, 1, 1), (1, 2, 4, 8)),
    }.items()
})


def resolve_config(preset: str | InternImageConfig, presets: Mapping[str, InternImageConfig],
                   name: str = 'preset') -> InternImageConfig:
  """`preset` as a config: a name in `presets` (case-insensitive) or an `InternImageConfig` as is.

  Example:
    >>> from deformjax.models import INTERNIMAGE_PRESETS, resolve_config
    >>> resolve_config('T', INTERNIMAGE_PRESETS).depths
    (4, 4, 18, 4)
  """
  if isinstance(preset, InternImageConfig):
    return preset
  if isinstance(preset, str) and preset.lower() in presets:
    return presets[preset.lower()]
  raise ValueError(f"{name} must be an InternImageConfig or one of {', '.join(repr(p) for p in presets)}, "
                   f'got {preset!r}')


def _drop_path_rates(rate: float, depths: tuple[int, ...]) -> list[list[float]]:
  """Per-level stochastic-depth rates: linear from 0 to `rate` over all `sum(depths)` blocks, as the reference."""
  total = sum(depths)
  flat = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
  starts = [sum(depths[:i]) for i in range(len(depths))]
  return [flat[s:s + d] for s, d in zip(starts, depths, strict=True)]


def _drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth (timm's `DropPath`): zero whole samples of `x [N, ...]` with probability `rate`, scaling
  the kept ones by `1 / (1 - rate)`. Identity when `key` is None or `rate` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


def _at_least_float32(dtype: DTypeLike) -> jnp.dtype:
  """Logits are float32 for bfloat16 / float16 / float32 compute, float64 for float64 compute."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)  # torch nn.GELU is the erf form


class _Common:
  """Keyword arguments every layer shares (dtype, param_dtype, precision, rngs)."""

  def __init__(self, dtype, param_dtype, precision, rngs):
    self.kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.precision = precision

  def linear(self, cin, cout, *, use_bias=True):
    return nnx.Linear(cin, cout, use_bias=use_bias, kernel_init=_linear_init, bias_init=_zeros,
                      precision=self.precision, **self.kw)

  def conv(self, cin, cout, kernel, stride, *, use_bias):
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=(kernel - 1) // 2, use_bias=use_bias,
                    kernel_init=_torch_conv_init, bias_init=_zeros, precision=self.precision, **self.kw)

  def norm(self, c):
    # Two-pass variance, as PyTorch: flax's default E[x^2] - E[x]^2 loses digits where |mean| >> std.
    return nnx.LayerNorm(c, epsilon=_LN_EPS, use_fast_variance=False, **self.kw)


class _Stem(nnx.Module):
  """`patch_embed`: [N, H, W, 3] -> [N, H/4, W/4, C]."""

  def __init__(self, in_features, channels, mk: _Common):
    self.conv1 = mk.conv(in_features, channels // 2, 3, 2, use_bias=True)
    self.norm1 = mk.norm(channels // 2)
    self.conv2 = mk.conv(channels // 2, channels, 3, 2, use_bias=True)
    self.norm2 = mk.norm(channels)

  def __call__(self, x):
    return self.norm2(self.conv2(_gelu(self.norm1(self.conv1(x)))))


class _MLP(nnx.Module):
  def __init__(self, channels, hidden, fc2_bias, mk: _Common):
    self.fc1 = mk.linear(channels, hidden)
    self.fc2 = mk.linear(hidden, channels, use_bias=fc2_bias)

  def __call__(self, x):
    return self.fc2(_gelu(self.fc1(x)))


class _Block(nnx.Module):
  """`InternImageLayer`: DCN and MLP residual branches, each with layer scale and drop path."""

  def __init__(self, core: str, channels: int, groups: int, cfg: InternImageConfig, drop_rate: float,
               policy: dict, mk: _Common):
    self.post_norm, self.drop_rate = cfg.post_norm, float(drop_rate)
    self.norm1 = mk.norm(channels)
    dcn_kw: dict[str, Any] = dict(groups=groups, offset_scale=cfg.offset_scale, dw_kernel_size=cfg.dw_kernel_size,
                                  precision=mk.precision, **mk.kw, **policy)
    if core == 'dcnv3':
      self.dcn: DCNv3 | DCNv4 = DCNv3(channels, 3, **dcn_kw)
    else:
      self.dcn = DCNv4(channels, 3, output_bias=cfg.dcn_output_bias, **dcn_kw)
    self.norm2 = mk.norm(channels)
    self.mlp = _MLP(channels, int(channels * cfg.mlp_ratio), cfg.mlp_fc2_bias, mk)
    if cfg.layer_scale is not None:
      self.gamma1: nnx.Param | None = nnx.Param(jnp.full((channels,), cfg.layer_scale, mk.kw['param_dtype']))
      self.gamma2: nnx.Param | None = nnx.Param(jnp.full((channels,), cfg.layer_scale, mk.kw['param_dtype']))
    else:
      self.gamma1 = self.gamma2 = None

  def _branch(self, x, fn, norm, gamma, key):
    y = norm(fn(x)) if self.post_norm else fn(norm(x))
    if gamma is not None:
      y = y * gamma[...].astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))  # rank-explicit: [C] over NHWC
    return x + _drop_path(y, self.drop_rate, key)

  def __call__(self, x: jax.Array, keys: jax.Array | None) -> jax.Array:
    k1, k2 = (None, None) if keys is None else (keys[0], keys[1])
    x = self._branch(x, self.dcn, self.norm1, self.gamma1, k1)
    return self._branch(x, self.mlp, self.norm2, self.gamma2, k2)


class _Downsample(nnx.Module):
  def __init__(self, channels, mk: _Common):
    self.conv = mk.conv(channels, 2 * channels, 3, 2, use_bias=False)
    self.norm = mk.norm(2 * channels)

  def __call__(self, x):
    return self.norm(self.conv(x))


class _Level(nnx.Module):
  """`InternImageBlock`: the blocks of one level, its final norm and its downsampling layer."""

  def __init__(self, core, level, cfg: InternImageConfig, rates, downsample, policy, mk: _Common):
    channels = cfg.channels * 2**level
    self.blocks = nnx.List([_Block(core, channels, cfg.groups[level], cfg, r, policy, mk) for r in rates])
    self.norm = None if cfg.post_norm else mk.norm(channels)
    self.downsample = _Downsample(channels, mk) if downsample else None


class _ConvHead(nnx.Module):
  """`conv_head`: conv 1x1 (no bias) -> BatchNorm -> GELU."""

  def __init__(self, cin, cout, mk: _Common):
    self.conv = mk.conv(cin, cout, 1, 1, use_bias=False)
    self.bn = nnx.BatchNorm(cout, momentum=0.9, epsilon=1e-5, use_fast_variance=False, **mk.kw)
    # flax keeps the running statistics in float32 whatever param_dtype is; float64 models need float64 ones.
    self.bn.mean = nnx.BatchStat(jnp.zeros((cout,), mk.kw['param_dtype']))
    self.bn.var = nnx.BatchStat(jnp.ones((cout,), mk.kw['param_dtype']))

  def __call__(self, x, train):
    return _gelu(self.bn(self.conv(x), use_running_average=not train))


def _call_block(block: _Block, x: jax.Array, keys: jax.Array | None) -> jax.Array:
  return block(x, keys)


_remat_block = nnx.remat(_call_block)


class _InternImageBase(nnx.Module):
  core = 'dcnv3'
  presets: Mapping[str, InternImageConfig] = INTERNIMAGE_PRESETS

  def __init__(self, preset: str | InternImageConfig = 't', *, num_classes: int = 1000, in_features: int = 3,
               drop_path_rate: float | None = None, remat: bool = False, dtype: DTypeLike | None = None,
               param_dtype: DTypeLike = jnp.float32, precision: jax.lax.PrecisionLike = None,
               chunk_size: int | None = None, memory_budget: int | None = None, deterministic_gradients: bool = False,
               rngs: nnx.Rngs):
    policy = dict(chunk_size=chunk_size, memory_budget=memory_budget, deterministic_gradients=deterministic_gradients)
    cfg = resolve_config(preset, self.presets)
    if drop_path_rate is not None:
      cfg = dataclasses.replace(cfg, drop_path_rate=float(drop_path_rate))
    if not isinstance(num_classes, int) or num_classes < 0:
      raise ValueError(f'{type(self).__name__}: num_classes must be an int >= 0 (0: no head, features out), '
                       f'got {num_classes!r}')
    self.config, self.num_classes, self.remat, self.dtype = cfg, num_classes, bool(remat), dtype
    mk = _Common(dtype, param_dtype, precision, rngs)
    self.patch_embed = _Stem(in_features, cfg.channels, mk)
    rates = _drop_path_rates(cfg.drop_path_rate, cfg.depths)
    n = len(cfg.depths)
    self.levels = nnx.List([_Level(self.core, i, cfg, rates[i], i < n - 1, policy, mk) for i in range(n)])
    head_features = int(cfg.num_features * cfg.cls_scale)
    self.conv_head = _ConvHead(cfg.num_features, head_features, mk)
    self.head = mk.linear(head_features, num_classes) if num_classes > 0 else None

  def _levels(self, x: jax.Array, train: bool, rngs: nnx.Rngs | None, last: int) -> list[jax.Array]:
    """Runs the stem and levels `0..last`; returns each level's map after its blocks and norm, before its
    downsampling, and the last one downsampled when that level has a downsampling layer."""
    if x.ndim != 4 or x.shape[-1] != self.patch_embed.conv1.in_features:
      raise ValueError(f'{type(self).__name__}: x must have shape [N, H, W, '
                       f'{self.patch_embed.conv1.in_features}], got {tuple(x.shape)}')
    drop = train and self.config.drop_path_rate > 0
    if drop and rngs is None:
      raise ValueError(f'{type(self).__name__}: train=True with drop_path_rate={self.config.drop_path_rate} '
                       "needs rngs with a 'dropout' (or 'default') stream")
    num_blocks = sum(self.config.depths)
    keys = jax.random.split(rngs.dropout(), (num_blocks, 2)) if drop and rngs is not None else None
    call = _remat_block if self.remat else _call_block
    x = self.patch_embed(x)
    i, maps = 0, []
    for level in self.levels[:last + 1]:
      for block in level.blocks:
        x = call(block, x, None if keys is None else keys[i])
        i += 1
      if level.norm is not None:
        x = level.norm(x)
      maps.append(x)
      if level.downsample is not None:
        x = level.downsample(x)
    return maps + [x]

  def features(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """`x [N, H, W, in_features]` -> pooled features `[N, cls_scale * num_features]` (before `head`)."""
    x = self._levels(x, train, rngs, len(self.levels) - 1)[-1]
    x = self.conv_head(x, train)
    return jnp.mean(x, axis=(1, 2))

  def pyramid_channels(self, out_indices: Sequence[int] = (0, 1, 2, 3)) -> tuple[int, ...]:
    """The widths of `pyramid`'s maps: level `i` has `channels * 2**i`."""
    return tuple(self.config.channels * 2**i for i in self._check_indices(out_indices))

  def _check_indices(self, out_indices: Sequence[int]) -> tuple[int, ...]:
    out_indices = tuple(out_indices)
    n = len(self.levels)
    if not out_indices or list(out_indices) != sorted(set(out_indices)) or not all(
        isinstance(i, int) and 0 <= i < n for i in out_indices):
      raise ValueError(f'{type(self).__name__}: out_indices must be increasing levels among 0..{n - 1}, got '
                       f'{out_indices}')
    return out_indices

  def pyramid(self, x: jax.Array, out_indices: Sequence[int] = (0, 1, 2, 3), *, train: bool = False,
              rngs: nnx.Rngs | None = None) -> list[jax.Array]:
    """The maps of levels `out_indices`, as the upstream detection backbones return them (each level's output
    after its blocks and its norm, before its downsampling; the classifier's `conv_head` and `head` unused).

    Args:
      x: `[N, H, W, in_features]` NHWC.
      out_indices: increasing levels among 0..3 (level `i` has stride `2 ** (i + 2)`).
      train, rngs: as `__call__` (drop path).

    Returns:
      `[N, H / 2 ** (i + 2), W / 2 ** (i + 2), channels * 2 ** i]` for each `i` in `out_indices`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deformjax.models import InternImage
      >>> model = nnx.eval_shape(lambda: InternImage('micro', num_classes=0, rngs=nnx.Rngs(0)))
      >>> maps = nnx.eval_shape(lambda m, x: m.pyramid(x, (1, 2, 3)), model, jnp.ones((1, 64, 64, 3), jnp.float32))
      >>> [m.shape for m in maps], model.pyramid_channels((1, 2, 3))
      ([(1, 8, 8, 32), (1, 4, 4, 64), (1, 2, 2, 128)], (32, 64, 128))
    """
    out_indices = self._check_indices(out_indices)
    maps = self._levels(x, train, rngs, out_indices[-1])
    return [maps[i] for i in out_indices]

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """`x [N, H, W, in_features]` (NHWC, H and W multiples of 32 for the official sizes) -> logits
    `[N, num_classes]` in float32 (float64 when computing in float64; the pooled features with
    `num_classes=0`).

    `train=True` uses the head's batch statistics (and updates its running ones) and, with a drop path
    rate, drops residual branches per sample with keys from `rngs` ('dropout' stream, else 'default').
    """
    x = self.features(x, train=train, rngs=rngs)
    if self.head is not None:
      x = self.head(x)
    return x.astype(_at_least_float32(x.dtype))


class InternImage(_InternImageBase):
  """InternImage image classifier over `deformjax.nn.DCNv3` (see the module docstring for the architecture).

  Args:
    preset: 't', 's', 'b' (the official ImageNet-1k configurations, 29,918,424 / 50,079,880 /
      97,461,832 parameters at 1000 classes), 'micro' (a small test model) or an `InternImageConfig`.
    num_classes: logits produced (0: no `head`; the call returns the pooled features).
    in_features: input channels.
    drop_path_rate: overrides the preset's stochastic depth rate (the official: 0.1 / 0.4 / 0.5).
    remat: recompute each block's activations in the backward pass (`nnx.remat`): less memory, more compute.
    dtype: computation dtype (e.g. bfloat16); parameters stay `param_dtype`; logits are float32.
    param_dtype, precision: as `nnx.Linear`.
    chunk_size, memory_budget, deterministic_gradients: the sampling execution policy of every DCN layer (as
      `deformjax.nn.DCNv3`: pixels per pass, or a byte budget for one pass; bit-identical gradients on
      GPU/TPU).
    rngs: random number generators for the parameters (keyword-only).

  Example (`InternImage('t', rngs=nnx.Rngs(0))` builds InternImage-T with its weights initialised; here
  `nnx.eval_shape` builds it abstractly, shapes only, which costs no initialisation):

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.models import InternImage
    >>> model = nnx.eval_shape(lambda: InternImage('micro', num_classes=10, rngs=nnx.Rngs(0)))
    >>> graphdef, state = nnx.split(model)
    >>> x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    >>> jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x).shape
    (2, 10)
  """

  core = 'dcnv3'
  presets = INTERNIMAGE_PRESETS


class FlashInternImage(_InternImageBase):
  """FlashInternImage image classifier over `deformjax.nn.DCNv4` (see the module docstring).

  Args:
    preset: 't', 's', 'b' (the official ImageNet-1k configurations, 29,815,528 / 50,067,496 /
      97,448,960 parameters at 1000 classes), 'micro' (a small test model) or an `InternImageConfig`.
    num_classes: as `InternImage`.
    in_features: as `InternImage`.
    drop_path_rate: as `InternImage`.
    remat: as `InternImage`.
    dtype: as `InternImage`.
    param_dtype: as `InternImage`.
    precision: as `InternImage`.
    chunk_size: as `InternImage`.
    memory_budget: as `InternImage`.
    deterministic_gradients: as `InternImage`.
    rngs: as `InternImage`.

  Example:
    >>> from flax import nnx
    >>> from deformjax.models import FlashInternImage
    >>> model = nnx.eval_shape(lambda: FlashInternImage('micro', rngs=nnx.Rngs(0)))  # shapes only
    >>> model.levels[3].blocks[0].dcn.offset_mask.kernel.shape  # 128 channels, 8 groups: ceil8(8 * 9 * 3) outputs
    (128, 216)
  """

  core = 'dcnv4'
  presets = FLASH_INTERNIMAGE_PRESETS


__all__ = ['FLASH_INTERNIMAGE_PRESETS', 'INTERNIMAGE_PRESETS', 'FlashInternImage', 'InternImage',
           'InternImageConfig', 'resolve_config']
