"""Linen twins of the NNX modules, for Linen codebases.

Same parameters (names, shapes, initialisation) and the same numbers as the NNX
modules: the shared pieces live in `deformjax.nn._common` and the family's
block functions, and a test copies NNX weights into these modules and compares
outputs. `DeformConv` keeps `nn.Conv`'s positional fields; in the other twins
the fields after the width and kernel size (or output size) are keyword-only,
as the NNX constructors' arguments are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from deformjax.nn import _blocks, _common
from deformjax.nn.sampling import AttentionSampling, Sampling
from deformjax.ops import _args, offset_mask_channels


class DeformConv(nn.Module):
  """Linen twin of `deformjax.nn.DeformConv`: a drop-in for `flax.linen.Conv`.

  Fields are `nn.Conv`'s, in the same order (so positional use carries over),
  followed by the deformable ones; the same differences as the NNX module
  (2-D `kernel_size`, `input_dilation` must be 1, CIRCULAR / REFLECT sample the
  padded image, `conv_general_dilated` serves the offset predictor).
  Parameters: `kernel [kh, kw, C // groups, features]`, `bias [features]`, and
  `offset_conv/{kernel, bias}` (zero-initialised) when offsets are predicted.
  Offsets and mask are sown into the `intermediates` collection when
  `sow_offsets`.

  Two different masks, as in the NNX module: the field `mask` is `nn.Conv`'s
  kernel mask (`[kh, kw, C // groups, features]`, multiplying the kernel); the
  call's `mask` is the DCNv2 modulation (`[..., Ho, Wo, offset_groups*kh*kw]`,
  torchvision's `deform_conv2d(..., mask=)`). Each is checked against its own
  shape, and an error names which one it is.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from deformjax.nn import linen
    >>> layer = linen.DeformConv(features=8, kernel_size=3)
    >>> x = jnp.ones((2, 16, 16, 3), jnp.float32)
    >>> params = layer.init(jax.random.key(0), x)
    >>> layer.apply(params, x).shape
    (2, 16, 16, 8)
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: None | int | Sequence[int] = 1
  padding: Any = 'SAME'
  input_dilation: None | int | Sequence[int] = 1
  kernel_dilation: None | int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  mask: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  promote_dtype: Any = nn.dtypes.promote_dtype
  conv_general_dilated: Any = None
  offset_groups: int | None = 1
  modulated: bool = True
  offset_scale: float = 1.0
  max_offset: float | None = None
  predict_offsets: bool = True
  sow_offsets: bool = False
  chunk_size: int | None = None
  memory_budget: int | None = None
  deterministic_gradients: bool = False

  @nn.compact
  def __call__(self, inputs, offsets=None, mask=None, *, return_sampling: bool = False):
    """As `deformjax.nn.DeformConv.__call__`: `y`, or `(y, Sampling(offsets, mask))` with `return_sampling`."""
    name = 'DeformConv'
    kh, kw = _args.positive_pair(self.kernel_size, 'kernel_size', name)
    strides, dilation = _common.conv_geometry(self.strides, self.input_dilation, self.kernel_dilation, name)
    _common.check_padding(self.padding, name)
    _common.check_policy(self.chunk_size, self.memory_budget, self.deterministic_gradients, name)
    in_features, groups = inputs.shape[-1], self.feature_group_count
    _blocks.check_deform_conv_args(name, in_features, self.features, groups, self.offset_groups, self.max_offset,
                                   self.predict_offsets)
    kernel_shape = (kh, kw, in_features // groups, self.features)
    kernel = self.param('kernel', self.kernel_init, kernel_shape, self.param_dtype)
    _common.check_kernel_mask(self.mask, kernel_shape, name)
    if self.offset_groups is not None:
      _common.check_modulation(mask, kh * kw * self.offset_groups, kernel_shape, name)
    if self.mask is not None:
      kernel = kernel * self.mask
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    offset_conv = None
    if self.predict_offsets:
      assert self.offset_groups is not None, 'check_deform_conv_args: predict_offsets needs offset_groups'
      extra = {} if self.conv_general_dilated is None else {'conv_general_dilated': self.conv_general_dilated}
      offset_conv = nn.Conv(
          self.offset_groups * kh * kw * (3 if self.modulated else 2), (kh, kw), strides=strides,
          padding=_blocks.explicit_padding(self.padding), kernel_dilation=dilation,
          kernel_init=nn.initializers.zeros_init(), bias_init=nn.initializers.zeros_init(),
          dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
          promote_dtype=self.promote_dtype, name='offset_conv', **extra)
    y, offsets, mask = _blocks.deform_conv_block(
        inputs, offsets, mask, kernel, bias, offset_conv,
        lambda *arrays: self.promote_dtype(*arrays, dtype=self.dtype), kernel_size=(kh, kw), strides=strides,
        padding=self.padding, dilation=dilation, groups=groups, offset_groups=self.offset_groups,
        modulated=self.modulated, offset_scale=self.offset_scale, max_offset=self.max_offset, name=name,
        precision=self.precision, chunk_size=self.chunk_size, memory_budget=self.memory_budget,
        deterministic_gradients=self.deterministic_gradients)
    if self.sow_offsets:
      self.sow('intermediates', 'offsets', offsets)
      if mask is not None:
        self.sow('intermediates', 'mask', mask)
    return (y, Sampling(offsets, mask)) if return_sampling else y


class DeformRoIPool(nn.Module):
  """Linen twin of `deformjax.nn.DeformRoIPool` (parameters `offset_hidden_{i}`,
  `offset_out`, and `mask_hidden`, `mask_out` when modulated); fields after
  `output_size` are keyword-only, `modulation='sigmoid'` is mmcv's mask as in
  the NNX module.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from deformjax.nn import linen
    >>> pool = linen.DeformRoIPool(7, hidden_features=(64,), modulated=True, modulation='sigmoid')
    >>> feats = jnp.ones((2, 32, 32, 8), jnp.float32)
    >>> rois = jnp.array([[0, 1.0, 2.0, 20.0, 24.0], [1, 4.0, 4.0, 30.0, 12.0]], jnp.float32)
    >>> params = pool.init(jax.random.key(0), feats, rois)
    >>> pool.apply(params, feats, rois).shape
    (2, 7, 7, 8)
  """

  output_size: int | Sequence[int]
  _: dataclasses.KW_ONLY
  spatial_scale: float = 1.0
  sampling_ratio: int = 0
  gamma: float = 0.1
  aligned: bool = True
  max_sampling_grid: Any = None
  hidden_features: Sequence[int] = (1024, 1024)
  modulated: bool = False
  modulation: str = '2sigmoid'
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  chunk_size: int | None = None
  memory_budget: int | None = None
  deterministic_gradients: bool = False

  @nn.compact
  def __call__(self, features, rois, *, return_sampling: bool = False):
    """As `deformjax.nn.DeformRoIPool.__call__`."""
    oh, ow = _args.positive_pair(self.output_size, 'output_size', 'DeformRoIPool')
    _blocks.check_roi_pool_options(self.aligned, self.modulated, self.modulation, 'DeformRoIPool')
    _common.check_policy(self.chunk_size, self.memory_budget, self.deterministic_gradients, 'DeformRoIPool')

    def dense(n: int, name: str, zero: bool = False) -> nn.Dense:
      init: dict[str, Any] = {'kernel_init': nn.initializers.zeros_init()} if zero else {}
      return nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name=name, **init)

    mask_hidden = dense(self.hidden_features[0], 'mask_hidden') if self.modulated and self.hidden_features else None
    out, offsets, mask = _blocks.deform_roi_pool_block(
        features, rois, [dense(width, f'offset_hidden_{i}') for i, width in enumerate(self.hidden_features)],
        dense(oh * ow * 2, 'offset_out', zero=True), mask_hidden,
        dense(oh * ow, 'mask_out', zero=True) if self.modulated else None, output_size=(oh, ow), gamma=self.gamma,
        modulation=self.modulation, spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
        aligned=self.aligned, max_sampling_grid=self.max_sampling_grid, chunk_size=self.chunk_size,
        memory_budget=self.memory_budget, deterministic_gradients=self.deterministic_gradients)
    return (out, Sampling(offsets, mask)) if return_sampling else out


def _dense(features: int, name: str, *, zero: bool = False, use_bias: bool = True, bias_init=None, dtype,
           param_dtype, precision) -> nn.Dense:
  """An `nn.Dense` initialised as the family's NNX layers: Xavier-uniform (or zero) kernel, zero (or given) bias."""
  return nn.Dense(features, use_bias=use_bias,
                  kernel_init=nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform(),
                  bias_init=bias_init or nn.initializers.zeros_init(), dtype=dtype, param_dtype=param_dtype,
                  precision=precision, name=name)


def _depthwise(channels: int, kernel_size: int, name: str, *, dtype, param_dtype, precision) -> nn.Conv:
  return nn.Conv(channels, (kernel_size, kernel_size), padding=(kernel_size - 1) // 2, feature_group_count=channels,
                 kernel_init=_common.torch_conv_kernel_init, bias_init=nn.initializers.zeros_init(), dtype=dtype,
                 param_dtype=param_dtype, precision=precision, name=name)


class DCNv3(nn.Module):
  """Linen twin of `deformjax.nn.DCNv3` (InternImage's DCNv3 block); channels come from the input.

  Parameters, as the NNX module's: `input_proj`, `dw_conv`, `norm`, `offset`,
  `mask`, `output_proj` (and `center_feature_scale_proj`), with the same
  shapes and initialisation. Fields after `kernel_size` are keyword-only and
  in the NNX module's order (shared with `DCNv4`: `groups, padding,
  kernel_dilation, offset_scale, dw_kernel_size, center_feature_scale,
  remove_center`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from deformjax.nn import linen
    >>> layer = linen.DCNv3(kernel_size=3, groups=4)
    >>> x = jnp.ones((2, 8, 8, 16), jnp.float32)
    >>> params = layer.init(jax.random.key(0), x)
    >>> layer.apply(params, x).shape
    (2, 8, 8, 16)
  """

  kernel_size: int = 3
  _: dataclasses.KW_ONLY
  groups: int = 4
  padding: int | None = None
  kernel_dilation: int = 1
  offset_scale: float = 1.0
  dw_kernel_size: int | None = None
  center_feature_scale: bool = False
  remove_center: bool = False
  layer_norm_epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  chunk_size: int | None = None
  memory_budget: int | None = None
  deterministic_gradients: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array, *, return_sampling: bool = False):
    """`inputs [..., H, W, C]` -> `[..., H, W, C]`, or `(y, Sampling(offsets, mask))` with `return_sampling`."""
    name = 'DCNv3'
    if inputs.ndim < 3:
      raise ValueError(f'{name}: inputs must have shape [..., H, W, channels], got {tuple(inputs.shape)}')
    c = inputs.shape[-1]
    padding = _common.check_block_args(name, c, self.kernel_size, self.groups, self.kernel_dilation, self.padding,
                                       self.remove_center, self.dw_kernel_size)
    _common.check_policy(self.chunk_size, self.memory_budget, self.deterministic_gradients, name)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    taps = self.groups * _common.num_taps(self.kernel_size, self.remove_center)
    y, offsets, mask = _blocks.dcnv3_block(
        inputs, _dense(c, 'input_proj', **kw), _depthwise(c, self.dw_kernel_size or self.kernel_size, 'dw_conv', **kw),
        nn.LayerNorm(self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name='norm'),
        _dense(taps * 2, 'offset', zero=True, **kw), _dense(taps, 'mask', zero=True, **kw),
        _dense(self.groups, 'center_feature_scale_proj', zero=True, **kw) if self.center_feature_scale else None,
        _dense(c, 'output_proj', **kw), kernel_size=self.kernel_size, groups=self.groups, padding=padding,
        dilation=self.kernel_dilation, offset_scale=self.offset_scale, remove_center=self.remove_center,
        chunk_size=self.chunk_size, memory_budget=self.memory_budget,
        deterministic_gradients=self.deterministic_gradients)
    return (y, Sampling(offsets, mask)) if return_sampling else y


class DCNv4(nn.Module):
  """Linen twin of `deformjax.nn.DCNv4`; channels come from the input.

  Parameters, as the NNX module's: `value_proj`, `offset_mask_dw` (with
  `dw_kernel_size`), `offset_mask`, `center_feature_scale_proj`, `output_proj`.
  Fields after `kernel_size` are keyword-only, in the NNX module's order.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from deformjax.nn import linen
    >>> layer = linen.DCNv4(kernel_size=3, groups=2)
    >>> x = jnp.ones((2, 8, 8, 32), jnp.float32)
    >>> params = layer.init(jax.random.key(0), x)
    >>> params['params']['offset_mask']['kernel'].shape
    (32, 56)
  """

  kernel_size: int = 3
  _: dataclasses.KW_ONLY
  groups: int = 4
  padding: int | None = None
  kernel_dilation: int = 1
  offset_scale: float = 1.0
  dw_kernel_size: int | None = None
  center_feature_scale: bool = False
  remove_center: bool = False
  output_bias: bool = True
  without_pointwise: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  chunk_size: int | None = None
  memory_budget: int | None = None
  deterministic_gradients: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array, *, return_sampling: bool = False):
    """`inputs [..., H, W, C]` -> `[..., H, W, C]`, or `(y, Sampling(offsets, mask))` with `return_sampling` (split
    out of the packed offset_mask, as `deformjax.nn.DCNv4`)."""
    name = 'DCNv4'
    if inputs.ndim < 3:
      raise ValueError(f'{name}: inputs must have shape [..., H, W, channels], got {tuple(inputs.shape)}')
    c = inputs.shape[-1]
    padding = _common.check_block_args(name, c, self.kernel_size, self.groups, self.kernel_dilation, self.padding,
                                       self.remove_center, self.dw_kernel_size)
    _common.check_policy(self.chunk_size, self.memory_budget, self.deterministic_gradients, name)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    packed = offset_mask_channels(self.groups, _common.num_taps(self.kernel_size, self.remove_center))
    pointwise = not self.without_pointwise
    y, offset_mask = _blocks.dcnv4_block(
        inputs, _dense(c, 'value_proj', **kw) if pointwise else None,
        _depthwise(c, self.dw_kernel_size, 'offset_mask_dw', **kw) if self.dw_kernel_size else None,
        _dense(packed, 'offset_mask', zero=True, **kw),
        _dense(self.groups, 'center_feature_scale_proj', zero=True, **kw) if self.center_feature_scale else None,
        _dense(c, 'output_proj', use_bias=self.output_bias, **kw) if pointwise else None,
        kernel_size=self.kernel_size, groups=self.groups, padding=padding, dilation=self.kernel_dilation,
        offset_scale=self.offset_scale, remove_center=self.remove_center, chunk_size=self.chunk_size,
        memory_budget=self.memory_budget, deterministic_gradients=self.deterministic_gradients)
    if not return_sampling:
      return y
    points = _common.num_taps(self.kernel_size, self.remove_center)
    return y, Sampling(*_blocks.split_offset_mask(offset_mask, self.groups, points))


class MSDeformAttn(nn.Module):
  """Linen twin of `deformjax.nn.MSDeformAttn` (Deformable DETR's multi-scale deformable attention).

  Parameters, as the NNX module's: `value_proj` (`d_model -> value_features`),
  `sampling_offsets` (zero kernel, directional bias), `attention_weights`
  (zeros), `output_proj` (`value_features -> d_model`). Fields after
  `num_points` are keyword-only.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from deformjax.nn import linen
    >>> layer = linen.MSDeformAttn(32, num_heads=4, num_levels=2, num_points=3)
    >>> f32 = jnp.float32
    >>> args = (jnp.ones((2, 5, 32), f32), jnp.full((2, 5, 2, 2), 0.5, f32), jnp.ones((2, 80, 32), f32), [(8, 8), (4, 4)])
    >>> params = layer.init(jax.random.key(0), *args)
    >>> layer.apply(params, *args).shape
    (2, 5, 32)
  """

  d_model: int
  num_heads: int = 8
  num_levels: int = 4
  num_points: int = 4
  _: dataclasses.KW_ONLY
  value_features: int | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  chunk_size: int | None = None
  memory_budget: int | None = None
  deterministic_gradients: bool = False

  @nn.compact
  def __call__(self, query: jax.Array, reference_points: jax.Array, inputs: jax.Array,
               spatial_shapes: Sequence[tuple[int, int]], padding_mask: jax.Array | None = None, *,
               return_sampling: bool = False):
    """As `deformjax.nn.MSDeformAttn.__call__`."""
    name = 'MSDeformAttn'
    value_features = _blocks.check_layer_args(name, self.d_model, self.num_heads, self.num_levels, self.num_points,
                                            self.value_features)
    _common.check_policy(self.chunk_size, self.memory_budget, self.deterministic_gradients, name)
    if query.ndim != 3 or query.shape[-1] != self.d_model:
      raise ValueError(f'{name}: query must have shape [N, Lq, d_model={self.d_model}], got {tuple(query.shape)}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    samples = self.num_heads * self.num_levels * self.num_points
    bias = _blocks.directional_bias_init(self.num_heads, self.num_levels, self.num_points)
    out, locations, weights = _blocks.ms_deform_attn_block(
        query, reference_points, inputs, spatial_shapes, padding_mask, _dense(value_features, 'value_proj', **kw),
        _dense(samples * 2, 'sampling_offsets', zero=True, bias_init=bias, **kw),
        _dense(samples, 'attention_weights', zero=True, **kw), _dense(self.d_model, 'output_proj', **kw),
        num_heads=self.num_heads, num_levels=self.num_levels, num_points=self.num_points, name=name,
        chunk_size=self.chunk_size, memory_budget=self.memory_budget,
        deterministic_gradients=self.deterministic_gradients)
    return (out, AttentionSampling(locations, weights)) if return_sampling else out


__all__ = ['DCNv3', 'DCNv4', 'DeformConv', 'DeformRoIPool', 'MSDeformAttn']
