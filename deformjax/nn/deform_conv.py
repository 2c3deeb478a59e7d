"""Flax NNX DeformConv: a deformable conv that predicts its own offsets and mask."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from deformjax.nn import _common
from deformjax.ops import _args

default_kernel_init = initializers.lecun_normal()


class DeformConv(nnx.Module):
  """Deformable convolution (DCNv1, or DCNv2 when `modulated`), NHWC.

  The layer owns its offset predictor: a regular conv with the same kernel size,
  strides, padding and dilation producing `offset_groups*kh*kw*2` offsets (and
  `offset_groups*kh*kw` mask logits when modulated). The predictor starts at
  zero weights and zero bias, and the mask is `2*sigmoid(logits)`, so a fresh
  DeformConv computes exactly what `nnx.Conv` with the same kernel computes.
  (DCNv2's paper uses `sigmoid`, 0.5 at init; the factor 2 keeps the fresh layer
  equal to a conv, so swapping a conv for a DeformConv does not change a
  pretrained network's output at step 0.)

  Offsets can also be passed in (torchvision `DeformConv2d` style), in which case
  the predictor is not run; with `predict_offsets=False` there is no predictor
  and offsets are required.

  Args:
    in_features: input channels C.
    out_features: output channels.
    kernel_size: int (square) or (kh, kw). Unlike `nnx.Conv`, where an int
      means a 1-D kernel, this layer is always 2-D.
    strides, padding, kernel_dilation, feature_group_count: as `nnx.Conv`
      (padding: int, (ph, pw), ((t, b), (l, r)), 'SAME', 'VALID').
    offset_groups: channel groups with their own offset field.
    modulated: predict a DCNv2 modulation mask.
    use_bias: add a bias to the deformable conv's output.
    offset_scale: multiplies the predicted offsets (a smaller value slows offset
      learning relative to the kernel).
    max_offset: if set, predicted offsets are bounded softly to
      `max_offset * tanh(offset / max_offset)` pixels.
    predict_offsets: build the offset predictor.
    sow_offsets: also `sow` offsets and mask as `nnx.Intermediate` (`offsets`,
      `mask`) on every call, for visualisation of a whole model:
      `y, sown = nnx.capture(model, nnx.Intermediate)(x)`.
    chunk_size, memory_budget: passed to `deform_conv2d` (pixels per pass, and
      bytes of sampled columns one pass may hold on GPU/TPU; None: the
      execution policy of the platform the model is lowered for).
    deterministic: bit-identical gradients run to run on GPU/TPU (a sorted
      segment sum instead of atomics; reverse-mode autodiff only), see
      `deform_conv2d`.
    dtype: computation dtype (None: inferred from inputs and params).
    param_dtype: parameter dtype.
    precision: passed to the contractions.
    kernel_init, bias_init: initialisers of the deformable kernel and bias.
    rngs: random number generators (keyword-only).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.nn import DeformConv
    >>> layer = DeformConv(3, 8, 3, rngs=nnx.Rngs(0))
    >>> y, offsets, mask = layer(jnp.ones((2, 16, 16, 3), jnp.float32), return_offsets=True)
    >>> y.shape, offsets.shape, mask.shape
    ((2, 16, 16, 8), (2, 16, 16, 18), (2, 16, 16, 9))
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int | Sequence[int],
      *,
      strides: int | Sequence[int] = 1,
      padding: _args.PaddingLike = 'SAME',
      kernel_dilation: int | Sequence[int] = 1,
      feature_group_count: int = 1,
      offset_groups: int = 1,
      modulated: bool = True,
      use_bias: bool = True,
      offset_scale: float = 1.0,
      max_offset: float | None = None,
      predict_offsets: bool = True,
      sow_offsets: bool = False,
      chunk_size: int | None = None,
      memory_budget: int | None = None,
      deterministic: bool = False,
      dtype=None,
      param_dtype=jnp.float32,
      precision=None,
      kernel_init=default_kernel_init,
      bias_init=initializers.zeros_init(),
      rngs: nnx.Rngs,
  ):
    name = type(self).__name__
    kh, kw = _args.positive_pair(kernel_size, 'kernel_size', name)
    if in_features % feature_group_count or out_features % feature_group_count:
      raise ValueError(
          f'{name}: in_features={in_features} and out_features={out_features} must be divisible by '
          f'feature_group_count={feature_group_count}'
      )
    if in_features % offset_groups:
      raise ValueError(f'{name}: in_features={in_features} must be divisible by offset_groups={offset_groups}')
    if max_offset is not None and max_offset <= 0:
      raise ValueError(f'{name}: max_offset must be positive or None, got {max_offset!r}')
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = (kh, kw)
    self.strides = strides
    self.padding = padding
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    self.offset_groups = offset_groups
    self.modulated = modulated
    self.use_bias = use_bias
    self.offset_scale = offset_scale
    self.max_offset = max_offset
    self.sow_offsets = sow_offsets
    self.chunk_size = chunk_size
    self.memory_budget = memory_budget
    self.deterministic = deterministic
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision

    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (kh, kw, in_features // feature_group_count, out_features), param_dtype)
    )
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
    taps = kh * kw * offset_groups
    if predict_offsets:
      self.offset_conv = nnx.Conv(
          in_features, taps * (3 if modulated else 2), (kh, kw), strides=strides,
          padding=_explicit_padding(padding), kernel_dilation=kernel_dilation,
          kernel_init=initializers.zeros_init(), bias_init=initializers.zeros_init(),
          dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs,
      )
    else:
      self.offset_conv = None

  def __call__(
      self,
      inputs: jax.Array,
      offsets: jax.Array | None = None,
      mask: jax.Array | None = None,
      *,
      return_offsets: bool = False,
  ):
    """Applies the deformable conv.

    Args:
      inputs: `[..., H, W, in_features]` (any leading batch dims, or none).
      offsets: optional `[..., Ho, Wo, offset_groups*kh*kw*2]` (torchvision order);
        None runs the offset predictor.
      mask: optional `[..., Ho, Wo, offset_groups*kh*kw]`; None uses the predicted
        mask when the predictor runs and `modulated`, else 1.
      return_offsets: also return the offsets and mask used.

    Returns:
      `[..., Ho, Wo, out_features]`, or `(y, offsets, mask)` with
      `return_offsets` (mask None when unmodulated and none was passed).
    """
    name = type(self).__name__
    _common.check_in_features(inputs, self.in_features, name)
    if offsets is None:
      if self.offset_conv is None:
        raise ValueError(f'{name}: offsets are required when the layer has no predictor (predict_offsets=False)')
      pred = self.offset_conv(inputs)
      offsets, predicted_mask = _common.split_prediction(
          pred, self.offset_groups * self.kernel_size[0] * self.kernel_size[1] * 2, self.modulated,
          self.offset_scale, self.max_offset,
      )
      mask = predicted_mask if mask is None else mask
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = dtypes.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    y = _common.deform_conv_any_batch(
        inputs, offsets, kernel, mask, bias, strides=self.strides, padding=self.padding,
        dilation=self.kernel_dilation, groups=self.feature_group_count, offset_groups=self.offset_groups,
        precision=self.precision, chunk_size=self.chunk_size, memory_budget=self.memory_budget,
        deterministic=self.deterministic,
    )
    if self.sow_offsets:
      self.sow(nnx.Intermediate, 'offsets', offsets)
      if mask is not None:
        self.sow(nnx.Intermediate, 'mask', mask)
    return (y, offsets, mask) if return_offsets else y


def _explicit_padding(padding):
  """deformjax padding forms -> a form nnx.Conv / nn.Conv reads identically."""
  if isinstance(padding, str):
    return padding.upper()
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  if all(isinstance(p, int) for p in padding):
    return tuple((int(p), int(p)) for p in padding)
  return tuple(tuple(int(v) for v in p) for p in padding)
