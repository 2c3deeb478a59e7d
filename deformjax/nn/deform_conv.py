"""Flax NNX DeformConv: a deformable conv that predicts its own offsets and mask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import ConvGeneralDilatedT, Dtype, Initializer, PrecisionLike, PromoteDtypeFn

from deformjax.nn import _blocks, _common
from deformjax.nn.sampling import Sampling
from deformjax.ops import _args

_default_kernel_init = initializers.lecun_normal()  # nnx.Conv's


class DeformConv(nnx.Module):
  """Deformable convolution (DCNv1, or DCNv2 when `modulated`), NHWC: a drop-in for `nnx.Conv`.

  The layer owns its offset predictor: a regular conv with the same kernel size,
  strides, padding and dilation producing `offset_groups*kh*kw*2` offsets (and
  `offset_groups*kh*kw` mask logits when modulated). The predictor starts at
  zero weights and zero bias, and the mask is `2*sigmoid(logits)`, so a fresh
  DeformConv computes exactly what `nnx.Conv` with the same kernel computes.
  (DCNv2's paper and mmcv use `sigmoid`, 0.5 at init; the factor 2 keeps the
  fresh layer equal to a conv. `deformjax.convert` halves a loaded mmcv
  kernel to compensate.)

  Arguments are `nnx.Conv`'s, in the same positions and with the same meaning,
  and draw the same random numbers: the kernel and bias take the same keys from
  `rngs` as `nnx.Conv` would, and the zero-initialised predictor draws none, so
  swapping a conv for a DeformConv leaves every other layer's initialisation
  unchanged. Differences:

  - `kernel_size` is always 2-D (an int means square; `nnx.Conv` reads an int
    as a 1-D kernel).
  - `input_dilation` must be 1: a deformable conv samples the input at its own
    resolution (a ValueError names it otherwise).
  - `padding='CIRCULAR'` / `'REFLECT'` pad the image (wrap / reflect) by the
    SAME amounts and sample the padded image: at zero offsets this is exactly
    `nnx.Conv`; offsets can reach into the wrapped / reflected border.
  - `conv_general_dilated` is used by the offset predictor (the deformable conv
    itself is `deform_conv2d`).

  Offsets can also be passed in (torchvision `DeformConv2d` style), in which case
  the predictor is not run; with `predict_offsets=False` there is no predictor
  and offsets are required.

  Two different masks, each named as the library it comes from names it:

  - the constructor's `mask` is `nnx.Conv`'s **kernel mask**: a fixed array of
    the kernel's shape `[kh, kw, in_features // feature_group_count,
    out_features]` that multiplies the kernel weights (e.g. to zero taps);
  - the call's `mask` is the **modulation** of DCNv2 (torchvision's
    `deform_conv2d(..., mask=)`): `[..., Ho, Wo, offset_groups*kh*kw]`, one
    scalar per output pixel and tap, predicted by the layer when `modulated`.

  Each is checked against its own shape, and an error names which one it is.

  Args:
    in_features: input channels C.
    out_features: output channels.
    kernel_size: int (square) or (kh, kw).
    strides: int or (sh, sw), as `nnx.Conv`'s.
    padding: int, (ph, pw), ((t, b), (l, r)), 'SAME', 'VALID', 'CIRCULAR' or 'REFLECT'.
    input_dilation: must be 1 (kept for `nnx.Conv`'s positions).
    kernel_dilation: int or (dh, dw), as `nnx.Conv`'s.
    feature_group_count: feature groups, as `nnx.Conv`'s.
    use_bias: add a bias, as `nnx.Conv`'s.
    dtype: the computation dtype, as `nnx.Conv`'s.
    param_dtype: the parameters' dtype, as `nnx.Conv`'s.
    precision: of the contraction with the kernel, as `nnx.Conv`'s.
    kernel_init: the kernel's initializer, as `nnx.Conv`'s.
    bias_init: the bias's initializer, as `nnx.Conv`'s.
    conv_general_dilated: the offset predictor's convolution, as `nnx.Conv`'s.
    promote_dtype: the dtype promotion of inputs and parameters, as `nnx.Conv`'s.
    preferred_element_type: the output dtype of the contraction, as `nnx.Conv`'s.
    kernel_metadata: metadata of the kernel Param (e.g. `sharding_names`).
    bias_metadata: metadata of the bias Param.
    mask: the kernel mask, as `nnx.Conv`'s: None or an array of the kernel's
      shape `[kh, kw, in_features // feature_group_count, out_features]`
      multiplying the kernel. Not the DCNv2 modulation (see `__call__`).
    offset_groups: channel groups with their own offset field. None (with
      `predict_offsets=False`) infers it from the offsets of each call, as
      torchvision's `DeformConv2d` does.
    modulated: predict a DCNv2 modulation mask.
    offset_scale: multiplies the predicted offsets (a smaller value slows offset
      learning relative to the kernel).
    max_offset: if set, predicted offsets are bounded softly to
      `max_offset * tanh(offset / max_offset)` pixels.
    predict_offsets: build the offset predictor.
    sow_offsets: also `sow` offsets and mask as `nnx.Intermediate` (`offsets`,
      `mask`: the fields of `Sampling`) on every call, for visualisation of a whole model:
      `y, sown = nnx.capture(model, nnx.Intermediate)(x)`.
    chunk_size: most output pixels per pass of `deform_conv2d` (None: the execution policy).
    memory_budget: most bytes of sampled values per pass of `deform_conv2d`.
    deterministic_gradients: bit-identical gradients run to run on GPU/TPU (reverse mode only).
    rngs: random number generators (keyword-only).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.nn import DeformConv
    >>> layer = DeformConv(3, 8, 3, rngs=nnx.Rngs(0))
    >>> y, sampling = layer(jnp.ones((2, 16, 16, 3), jnp.float32), return_sampling=True)
    >>> y.shape, sampling.offsets.shape, sampling.mask.shape
    ((2, 16, 16, 8), (2, 16, 16, 18), (2, 16, 16, 9))
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int | Sequence[int],
      strides: None | int | Sequence[int] = 1,
      *,
      padding: _args.PaddingLike = 'SAME',
      input_dilation: None | int | Sequence[int] = 1,
      kernel_dilation: None | int | Sequence[int] = 1,
      feature_group_count: int = 1,
      use_bias: bool = True,
      mask: jax.Array | None = None,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      precision: PrecisionLike = None,
      kernel_init: Initializer = _default_kernel_init,
      bias_init: Initializer = initializers.zeros_init(),  # noqa: B008 (nnx.Conv's own default)
      conv_general_dilated: ConvGeneralDilatedT = jax.lax.conv_general_dilated,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      preferred_element_type: Dtype | None = None,
      rngs: nnx.Rngs,
      kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      offset_groups: int | None = 1,
      modulated: bool = True,
      offset_scale: float = 1.0,
      max_offset: float | None = None,
      predict_offsets: bool = True,
      sow_offsets: bool = False,
      chunk_size: int | None = None,
      memory_budget: int | None = None,
      deterministic_gradients: bool = False,
  ) -> None:
    name = type(self).__name__
    kh, kw = _args.positive_pair(kernel_size, 'kernel_size', name)
    strides, kernel_dilation = _common.conv_geometry(strides, input_dilation, kernel_dilation, name)
    _blocks.check_deform_conv_args(name, in_features, out_features, feature_group_count, offset_groups, max_offset,
                                   predict_offsets)
    self.policy = _common.sampling_policy(chunk_size, memory_budget, deterministic_gradients, name)
    kernel_shape = (kh, kw, in_features // feature_group_count, out_features)
    _common.check_kernel_mask(mask, kernel_shape, name)
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = (kh, kw)
    self.kernel_shape = kernel_shape
    self.strides = strides
    _common.check_padding(padding, name)
    self.padding = padding
    self.input_dilation = input_dilation
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    self.use_bias = use_bias
    self.mask = mask
    self.offset_groups = offset_groups
    self.modulated = modulated
    self.offset_scale = offset_scale
    self.max_offset = max_offset
    self.sow_offsets = sow_offsets
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type

    # The same draws, in the same order, as nnx.Conv: kernel, then bias.
    self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, param_dtype), **kernel_metadata)
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype), **bias_metadata)
                 if use_bias else None)
    if predict_offsets:
      assert offset_groups is not None, 'check_deform_conv_args: predict_offsets needs offset_groups'
      # Zero-initialised: it needs no random numbers, and takes none from `rngs`, so
      # the layers built after this one initialise as they would after an nnx.Conv.
      self.offset_conv: nnx.Conv | None = nnx.Conv(
          in_features, kh * kw * offset_groups * (3 if modulated else 2), (kh, kw), strides=strides,
          padding=_blocks.explicit_padding(padding), kernel_dilation=kernel_dilation,
          kernel_init=initializers.zeros_init(), bias_init=initializers.zeros_init(),
          dtype=dtype, param_dtype=param_dtype, precision=precision, conv_general_dilated=conv_general_dilated,
          promote_dtype=promote_dtype, rngs=nnx.Rngs(0),
      )
    else:
      self.offset_conv = None

  def __call__(
      self,
      inputs: jax.Array,
      offsets: jax.Array | None = None,
      mask: jax.Array | None = None,
      *,
      return_sampling: bool = False,
  ) -> jax.Array | tuple[jax.Array, Sampling]:
    """Applies the deformable conv.

    Args:
      inputs: `[..., H, W, in_features]` (any leading batch dims, or none).
      offsets: optional `[..., Ho, Wo, offset_groups*kh*kw*2]` (torchvision order);
        None runs the offset predictor.
      mask: the DCNv2 modulation, as torchvision's `deform_conv2d(..., mask=)`:
        optional `[..., Ho, Wo, offset_groups*kh*kw]`, one scalar per output
        pixel and tap. None uses the predicted modulation when the predictor
        runs and `modulated`, else 1. (Not the kernel mask: that is the
        constructor's `mask`.)
      return_sampling: also return the offsets and modulation used.

    Returns:
      `[..., Ho, Wo, out_features]`, or `(y, Sampling(offsets, mask))` with
      `return_sampling` (mask None when unmodulated and none was passed).
    """
    name = type(self).__name__
    _common.check_in_features(inputs, self.in_features, name)
    if self.offset_groups is not None:  # else the op infers it from the offsets, and checks the mask
      taps = self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
      _common.check_modulation(mask, taps, self.kernel_shape, name)
    kernel = self.kernel[...] if self.mask is None else self.kernel[...] * self.mask
    y, offsets, mask = _blocks.deform_conv_block(
        inputs, offsets, mask, kernel, None if self.bias is None else self.bias[...], self.offset_conv,
        lambda *arrays: self.promote_dtype(arrays, dtype=self.dtype), kernel_size=self.kernel_size,
        strides=self.strides, padding=self.padding, dilation=self.kernel_dilation, groups=self.feature_group_count,
        offset_groups=self.offset_groups, modulated=self.modulated, offset_scale=self.offset_scale,
        max_offset=self.max_offset, name=name, precision=self.precision,
        preferred_element_type=self.preferred_element_type, **self.policy.as_kwargs())
    if self.sow_offsets:
      self.sow(nnx.Intermediate, 'offsets', offsets)
      if mask is not None:
        self.sow(nnx.Intermediate, 'mask', mask)
    return (y, Sampling(offsets, mask)) if return_sampling else y


__all__ = ['DeformConv']
