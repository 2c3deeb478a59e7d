"""Linen twins of the NNX modules, for Linen codebases.

Same parameters (names, shapes, initialisation) and the same numbers as the NNX
modules: the shared pieces live in `deformjax.nn._common`, and a test copies NNX
weights into these modules and compares outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from deformjax.nn import _common
from deformjax.nn.deform_conv import _explicit_padding
from deformjax.ops import _args
from deformjax.ops.roi_pool import deform_roi_pool, roi_align


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
  offset_groups: int = 1
  modulated: bool = True
  offset_scale: float = 1.0
  max_offset: float | None = None
  predict_offsets: bool = True
  sow_offsets: bool = False
  chunk_size: int | None = None
  memory_budget: int | None = None
  deterministic: bool = False

  @nn.compact
  def __call__(self, inputs, offsets=None, mask=None, *, return_offsets: bool = False):
    name = 'DeformConv'
    kh, kw = _args.positive_pair(self.kernel_size, 'kernel_size', name)
    strides, dilation = _common.conv_geometry(self.strides, self.input_dilation, self.kernel_dilation, name)
    groups = _args.positive_int(self.feature_group_count, 'feature_group_count', name)
    _args.positive_int(self.offset_groups, 'offset_groups', name)
    _common.check_padding(self.padding, name)
    _common.check_geometry(inputs, (kh, kw), strides, self.padding, dilation, name)
    in_features = inputs.shape[-1]
    kernel_shape = (kh, kw, in_features // groups, self.features)
    kernel = self.param('kernel', self.kernel_init, kernel_shape, self.param_dtype)
    _common.check_kernel_mask(self.mask, kernel_shape, name)
    _common.check_modulation(mask, kh * kw * self.offset_groups, kernel_shape, name)
    if self.mask is not None:
      kernel = kernel * self.mask
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    if offsets is None:
      if not self.predict_offsets:
        raise ValueError('DeformConv: offsets are required when the layer has no predictor (predict_offsets=False)')
      taps = kh * kw * self.offset_groups
      extra = {} if self.conv_general_dilated is None else {'conv_general_dilated': self.conv_general_dilated}
      pred = nn.Conv(
          taps * (3 if self.modulated else 2), (kh, kw), strides=strides,
          padding=_explicit_padding(self.padding), kernel_dilation=dilation,
          kernel_init=nn.initializers.zeros_init(), bias_init=nn.initializers.zeros_init(),
          dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
          promote_dtype=self.promote_dtype, name='offset_conv', **extra,
      )(inputs)
      offsets, predicted_mask = _common.split_prediction(pred, taps * 2, self.modulated, self.offset_scale,
                                                         self.max_offset)
      mask = predicted_mask if mask is None else mask
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    inputs, padding = _common.pad_for_mode(inputs, self.padding, (kh, kw), dilation)
    y = _common.deform_conv_any_batch(
        inputs, offsets, kernel, mask, bias, strides=strides, padding=padding,
        dilation=dilation, groups=groups, offset_groups=self.offset_groups,
        precision=self.precision, chunk_size=self.chunk_size, memory_budget=self.memory_budget,
        deterministic=self.deterministic,
    )
    if self.sow_offsets:
      self.sow('intermediates', 'offsets', offsets)
      if mask is not None:
        self.sow('intermediates', 'mask', mask)
    return (y, offsets, mask) if return_offsets else y


class DeformRoIPool(nn.Module):
  """Linen twin of `deformjax.nn.DeformRoIPool` (parameters `offset_hidden_{i}`,
  `offset_out`, and `mask_hidden`, `mask_out` when modulated)."""

  output_size: int | Sequence[int]
  spatial_scale: float = 1.0
  sampling_ratio: int = 0
  gamma: float = 0.1
  aligned: bool = True
  max_sampling_grid: Any = None
  hidden_features: Sequence[int] = (1024, 1024)
  modulated: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, features, rois, *, return_offsets: bool = False):
    oh, ow = _args.positive_pair(self.output_size, 'output_size', 'DeformRoIPool')
    kw = dict(output_size=(oh, ow), spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
              aligned=self.aligned, max_sampling_grid=self.max_sampling_grid)
    dense = lambda n, name, zero=False: nn.Dense(
        n, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name=name,
        **(dict(kernel_init=nn.initializers.zeros_init()) if zero else {}))
    r = rois.shape[0]
    flat = roi_align(features, rois, **kw).reshape(r, -1)
    h = flat
    for i, width in enumerate(self.hidden_features):
      h = jax.nn.relu(dense(width, f'offset_hidden_{i}')(h))
    offsets = dense(oh * ow * 2, 'offset_out', zero=True)(h).reshape(r, oh, ow, 2)
    out = deform_roi_pool(features, rois, offsets, gamma=self.gamma, **kw)
    mask = None
    if self.modulated:
      m = jax.nn.relu(dense(self.hidden_features[0], 'mask_hidden')(flat)) if self.hidden_features else flat
      mask = _common.mask_from_logits(dense(oh * ow, 'mask_out', zero=True)(m)).reshape(r, oh, ow, 1)
      out = out * mask.astype(out.dtype)
    return (out, offsets, mask) if return_offsets else out
