"""Deformable convolution (DCNv1 offsets, DCNv2 modulation) from gather + einsum.

The op builds the bilinearly sampled columns `[pixels, kh*kw, C]` of the
flattened output pixels (n, ho, wo) (four corner gathers fused with their
weights) and contracts them with the kernel in one einsum. How many pixels one
pass holds is an execution policy chosen per backend at lowering time
(`deformjax.ops._policy`): cache-sized chunks walked by `lax.map` on CPU, one
pass on GPU/TPU while the columns fit a memory budget, equal blocks beyond it.
The pass body is rematerialised, so the backward pass never stores more than
one pass of columns either.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from deformjax.ops import _args, _engine, _geometry, _policy

_PrecisionLike = str | jax.lax.Precision | tuple | None
_FN = 'deform_conv2d'
# The arrays a PyTorch user passes in PyTorch's layout (torchvision.ops.deform_conv2d's), and which layout.
_LAYOUTS = MappingProxyType({'inputs': 'NCHW', 'kernel': 'OIHW', 'offsets': 'NCHW', 'mask': 'NCHW'})


def output_size(
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    strides: int | Sequence[int] = 1,
    padding: _args.PaddingLike = 0,
    dilation: int | Sequence[int] = 1,
) -> tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]:
  """Output spatial size and explicit ((top, bottom), (left, right)) padding.

  Same arithmetic as `lax.conv_general_dilated`; used by the op and by modules
  that must predict offsets of the right shape.
  """
  window = _args.conv_window(in_hw, kernel_hw, strides, padding, dilation, 'output_size')
  return window.out_hw, window.pads


def _infer_offset_groups(offsets, taps: int) -> int:
  """torchvision's rule: offsets carry offset_groups*kh*kw*2 channels."""
  channels = np.shape(offsets)[-1] if np.ndim(offsets) == 4 else None
  if channels is None:
    return 1  # the shape check names what offsets must look like
  if channels == 0 or channels % (2 * taps):
    raise ValueError(
        f'{_FN}: offsets must have shape [N, Ho, Wo, offset_groups*kh*kw*2]; their {channels} channels are not a '
        f'positive multiple of 2*kh*kw = {2 * taps}, so offset_groups cannot be inferred, got '
        f'{tuple(np.shape(offsets))}'
    )
  return channels // (2 * taps)


class _Checked(NamedTuple):
  """The arguments of a call that passed `_check_args`: arrays, group counts and the conv window."""
  inputs: jax.Array
  offsets: jax.Array
  kernel: jax.Array
  mask: jax.Array | None
  bias: jax.Array | None
  groups: int
  offset_groups: int
  window: _args.ConvWindow


def _check_arrays(inputs, offsets, kernel, mask, bias) -> tuple[jax.Array | None, ...]:
  """The five arrays as jax.Arrays, the floating ones and the ranks the shape checks rely on refused by name."""
  inputs, offsets, kernel, mask, bias = (
      _args.as_array(a, name, _FN) for a, name in
      zip((inputs, offsets, kernel, mask, bias), ('inputs', 'offsets', 'kernel', 'mask', 'bias')))
  _args.check_floating(inputs, 'inputs', _FN)
  _args.check_floating(offsets, 'offsets', _FN)
  _args.check_floating(kernel, 'kernel', _FN)
  _args.check_rank(inputs, 4, 'inputs', '[N, H, W, C]', _FN)
  _args.check_rank(kernel, 4, 'kernel', '[kh, kw, C // groups, C_out]', _FN)
  return inputs, offsets, kernel, mask, bias


def _check_groups(channels: int, kernel_shape: tuple[int, ...], groups: int, offset_groups) -> int:
  """`offset_groups` as an int; both group counts divide the channels they split, and the kernel fits them."""
  kh, kw, cin_g, cout = kernel_shape
  offset_groups = _args.positive_int(offset_groups, 'offset_groups', _FN)
  if channels % groups:
    raise ValueError(f'{_FN}: inputs channels C={channels} must be divisible by groups={groups}')
  if channels % offset_groups:
    raise ValueError(f'{_FN}: inputs channels C={channels} must be divisible by offset_groups={offset_groups}')
  if cout % groups:
    raise ValueError(f'{_FN}: kernel output channels C_out={cout} must be divisible by groups={groups}')
  if cin_g != channels // groups or kh < 1 or kw < 1:
    raise ValueError(
        f'{_FN}: kernel must have shape [kh, kw, C // groups, C_out] = [kh, kw, {channels // groups}, C_out] '
        f'with kh, kw >= 1, got {tuple(kernel_shape)}'
    )
  return offset_groups


def _check_args(inputs, offsets, kernel, mask, bias, *, strides, padding, dilation, groups, offset_groups,
                preferred_element_type, chunk_size, memory_budget, deterministic_gradients) -> _Checked:
  """Arrays, dtypes, shapes and scalar arguments, each refused by name, in the order a reader meets them."""
  inputs, offsets, kernel, mask, bias = _check_arrays(inputs, offsets, kernel, mask, bias)
  n, h, w, c = inputs.shape
  kh, kw, _, cout = kernel.shape
  groups = _args.positive_int(groups, 'groups', _FN)
  if offset_groups is None:
    offset_groups = _infer_offset_groups(offsets, kh * kw)
  og = _check_groups(c, tuple(kernel.shape), groups, offset_groups)
  window = _args.conv_window((h, w), (kh, kw), strides, padding, dilation, _FN)
  (ho, wo), taps = window.out_hw, kh * kw
  _args.check_shape(offsets, (n, ho, wo, og * taps * 2), 'offsets', '[N, Ho, Wo, offset_groups*kh*kw*2]', _FN)
  if mask is not None:
    _args.check_floating(mask, 'mask', _FN)
    _args.check_shape(mask, (n, ho, wo, og * taps), 'mask', '[N, Ho, Wo, offset_groups*kh*kw]', _FN)
  if bias is not None:
    _args.check_floating(bias, 'bias', _FN)
    _args.check_shape(bias, (cout,), 'bias', '[C_out]', _FN)
  _args.check_policy(chunk_size, memory_budget, deterministic_gradients, _FN)
  if preferred_element_type is not None and not jnp.issubdtype(np.dtype(preferred_element_type), jnp.floating):
    raise ValueError(f'{_FN}: preferred_element_type must be a floating dtype (the sampled values are '
                     f'fractional), got {np.dtype(preferred_element_type)}')
  return _Checked(inputs, offsets, kernel, mask, bias, groups, og, window)


@dataclasses.dataclass(frozen=True)
class _ConvGeometry(_geometry.WindowGeometry):
  """A `deform_conv2d` call's geometry: the window's (`groups`: the offset groups), the kernel's `feature_groups`,
  and the dtype of the contraction (`compute_dtype`, the promoted dtype of inputs and kernel; samples are read and
  summed in `acc_dtype`)."""

  feature_groups: int
  compute_dtype: np.dtype


def _conv_geometry(args: _Checked, preferred_element_type: DTypeLike | None) -> _ConvGeometry:
  """The call's `_ConvGeometry`: the op's dtype policy (the promoted dtype of inputs and kernel, sampled and
  accumulated in at least float32), int64 table rows (or the error that asks for them) past 2**31 rows."""
  n, (kh, kw, _, cout) = args.inputs.shape[0], args.kernel.shape
  compute = _args.promote(args.inputs.dtype, args.kernel.dtype)
  out = np.dtype(preferred_element_type) if preferred_element_type is not None else compute
  return _ConvGeometry(
      out_shape=(n, *args.window.out_hw, cout), out_dtype=out, acc_dtype=_args.promote(compute, jnp.float32),
      cdtype=_args.coordinate_dtype(args.offsets.dtype, compute),
      **_geometry.window_fields(args.inputs.shape, (kh, kw), args.window, args.offset_groups, _FN),
      feature_groups=args.groups, compute_dtype=compute)


def _corners(geom: _ConvGeometry, start, count, off, m):
  """Flat table rows and weights of the four corners of `count` pixels from `start`, 2 x 4 x [count*K*G].

  Computed in one vectorised pass and handed to the columns pass as arrays:
  computed inside a chunk body, XLA fuses the whole index arithmetic into the
  gather and redoes it for every channel (measured 1.4-1.7x slower forward on
  CPU). `_engine.run_passes` makes them for all pixels at once while they fit
  `_engine.INDEX_BLOCK_BYTES`, else per block of chunks.
  """
  (kh, kw), (dh, dw), cdtype = geom.kernel_hw, geom.dilation, geom.cdtype
  img, oy, ox = _engine.output_pixels(start, count, geom.n, geom.out_hw, geom.idx_dtype)
  tap_i = np.repeat(np.arange(kh), kw) * dh
  tap_j = np.tile(np.arange(kw), kh) * dw
  y, x = (
      (pos * stride - pad).astype(cdtype)[:, None, None] + jnp.asarray(tap, cdtype)[None, :, None]
      + off[..., axis].astype(cdtype)
      for pos, stride, pad, tap, axis in zip((oy, ox), geom.strides, geom.pads, (tap_i, tap_j), (0, 1)))
  group_row = jnp.arange(geom.groups, dtype=geom.idx_dtype)[None, None, :]
  return _engine.image_corners(y, x, None if m is None else m.astype(cdtype), img, geom.hw, geom.groups,
                               group_row, geom.idx_dtype)


def _contract(taps: int, groups: int, precision, acc_dtype, cols, kernel):
  """[count*K*G, C/G] sampled columns (compute dtype) x kernel -> [count, C_out]."""
  if groups == 1:
    return jnp.dot(cols.reshape(-1, kernel.shape[0]), kernel, precision=precision, preferred_element_type=acc_dtype)
  _, cin_g, _, cout_g = kernel.shape
  out = jnp.einsum('bkgc,kcgo->bgo', cols.reshape(-1, taps, groups, cin_g), kernel, precision=precision,
                   preferred_element_type=acc_dtype)
  return out.reshape(-1, groups * cout_g)


def _plan(geom: _ConvGeometry, inputs: jax.Array, offsets: jax.Array, kernel: jax.Array, mask: jax.Array | None,
          precision: _PrecisionLike, chunk_size: int | None, memory_budget: int | None,
          deterministic_gradients: bool) -> jax.Array:
  """The sampled columns contracted with the kernel (inputs and kernel in the compute dtype), in passes:
  `[N, Ho, Wo, C_out]` in the accumulation dtype."""
  n, h, w, c = inputs.shape
  kh, kw, cin_g, cout = kernel.shape
  (ho, wo), og, groups, taps = geom.out_hw, geom.groups, geom.feature_groups, kh * kw
  pixels = n * ho * wo
  # Sampled in the accumulation dtype: for bf16/f16 inputs the backward's
  # scatter-add then accumulates in float32 (exact to f32, and 3x faster on CPU
  # than XLA's bf16 scatter), at the price of one f32 copy of the input.
  table = inputs.reshape(n * h * w * og, c // og).astype(geom.acc_dtype)
  # Offsets and mask are re-laid out tap-major ([.., K, G, ..]) before sampling,
  # so the sampled columns come out as [chunk, K, C] without transposing them.
  off = offsets.reshape(pixels, og, taps, 2).transpose(0, 2, 1, 3)
  m = None if mask is None else mask.reshape(pixels, og, taps).transpose(0, 2, 1)
  kernel = kernel.reshape(taps * c, cout) if groups == 1 else kernel.reshape(taps, cin_g, groups, cout // groups)
  contract = functools.partial(_contract, taps, groups, precision, geom.acc_dtype)
  sample = functools.partial(_engine.sampled_pass, contract, geom.compute_dtype, bool(deterministic_gradients), table,
                             kernel)
  out = _engine.run_passes(
      functools.partial(_corners, geom), sample, (off, m), pixels=pixels,
      bytes_per_pixel=taps * c * geom.acc_dtype.itemsize,
      point_bytes=_engine.corner_bytes(taps * og, geom.idx_dtype, geom.cdtype), idx_dtype=geom.idx_dtype,
      chunk_size=chunk_size, memory_budget=memory_budget)
  return out.reshape(n, ho, wo, cout)


def deform_conv2d(
    inputs: jax.Array,
    offsets: jax.Array,
    kernel: jax.Array,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    strides: int | Sequence[int] = 1,
    padding: _args.PaddingLike = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    offset_groups: int | None = None,
    precision: _PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    deterministic_gradients: bool = False,
) -> jax.Array:
  """Deformable 2-D convolution, NHWC, with torchvision's semantics.

  Output pixel (n, ho, wo), tap k = i*kw + j of offset group g samples input
  channel group g at
  `y = ho*stride_h - pad_top + i*dilation_h + dy`,
  `x = wo*stride_w - pad_left + j*dilation_w + dx`,
  with `dy = offsets[n, ho, wo, (g*kh*kw + k)*2]`, `dx = ...*2 + 1]`, bilinearly
  (out-of-image corners read 0), multiplies by `mask[n, ho, wo, g*kh*kw + k]`
  and contracts with `kernel[i, j]`. How the work is split into passes, and
  what each pass holds in memory: the documentation's execution-policy page.

  Args:
    inputs: `[N, H, W, C]`. A PyTorch `[N, C, H, W]` tensor: `transpose(0, 2, 3, 1)`.
    offsets: `[N, Ho, Wo, offset_groups*kh*kw*2]`, (dy, dx) pairs in
      torchvision's channel order. torchvision's NCHW offsets: `transpose(0, 2, 3, 1)`.
    kernel: `[kh, kw, C // groups, C_out]` (HWIO). PyTorch's OIHW: `transpose(2, 3, 1, 0)`.
    mask: optional `[N, Ho, Wo, offset_groups*kh*kw]` modulation (DCNv2); None means 1.
    bias: optional `[C_out]`.
    strides: int or (sh, sw).
    padding: int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID';
      never materialised: padded positions read 0.
    dilation: int or (dh, dw).
    groups: feature groups (C and C_out divisible by it).
    offset_groups: groups of input channels sharing one offset field; None
      infers it from the offsets' channels (torchvision's rule).
    precision: of the contraction with the kernel; `'highest'` for float32-exact
      results on GPUs and TPUs, whose default is TF32 / bf16 passes.
    preferred_element_type: output dtype; default the promoted dtype of inputs
      and kernel (sampled and accumulated in at least float32).
    chunk_size: most output pixels per pass; None leaves it to the execution policy.
    memory_budget: most bytes of sampled columns per pass; None: cache-sized
      chunks on CPU, `current_accelerator_memory_budget()` on GPU/TPU.
    deterministic_gradients: bit-identical gradients run to run on GPU/TPU (a
      sorted segment sum instead of scatter-add atomics); reverse mode only.

  Returns:
    `[N, Ho, Wo, C_out]`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from deformjax.ops import deform_conv2d
    >>> x = jnp.ones((2, 8, 8, 4))
    >>> off = jnp.zeros((2, 8, 8, 2 * 3 * 3))
    >>> w = jnp.ones((3, 3, 4, 6))
    >>> deform_conv2d(x, off, w, padding=1).shape
    (2, 8, 8, 6)
  """
  check = functools.partial(
      _check_args, strides=strides, padding=padding, dilation=dilation, groups=groups, offset_groups=offset_groups,
      preferred_element_type=preferred_element_type, chunk_size=chunk_size, memory_budget=memory_budget,
      deterministic_gradients=deterministic_gradients)
  args = _args.checked(check, _LAYOUTS, _FN, dict(inputs=inputs, offsets=offsets, kernel=kernel, mask=mask, bias=bias))
  geom = _conv_geometry(args, preferred_element_type)
  if geom.empty:  # every tap reads zero: the result is the bias alone
    return _geometry.empty_result(geom, args.bias)
  return _deform_conv2d(args.inputs, args.offsets, args.kernel, args.mask, args.bias, geom=geom,
                        padding=_args.frozen(padding), precision=_args.frozen(precision), chunk_size=chunk_size,
                        memory_budget=memory_budget, deterministic_gradients=bool(deterministic_gradients))


@_policy.jit_core('geom', 'padding', 'precision', 'chunk_size', 'memory_budget', 'deterministic_gradients')
def _deform_conv2d(inputs, offsets, kernel, mask, bias, *, geom: _ConvGeometry, padding, precision, chunk_size,
                   memory_budget, deterministic_gradients) -> jax.Array:
  """`deform_conv2d` on checked arguments, one compiled program per shapes and settings: an exporter's own operator
  where one is set (`padding` as the caller gave it is for it), else the plan, then the bias."""
  inputs, kernel = inputs.astype(geom.compute_dtype), kernel.astype(geom.compute_dtype)
  native = _policy.native_op(_FN)  # an exporter's own operator (deformjax.export: ONNX DeformConv)
  native_out = None if native is None else native(inputs, offsets, kernel, mask, bias, strides=geom.strides,
                                                  padding=padding, dilation=geom.dilation, groups=geom.feature_groups,
                                                  offset_groups=geom.groups)
  if native_out is not None:
    return native_out.astype(geom.out_dtype)
  out = _plan(geom, inputs, offsets, kernel, mask, precision, chunk_size, memory_budget, deterministic_gradients)
  if bias is not None:
    out = out + bias.astype(geom.acc_dtype).reshape(1, 1, 1, geom.out_shape[-1])
  return out.astype(geom.out_dtype)


def columns_bytes(
    inputs_shape: Sequence[int], kernel_shape: Sequence[int], offsets_shape: Sequence[int],
    dtype: DTypeLike = jnp.float32, chunk_size: int | None = None,
    memory_budget: int | None = None, platform: str | None = None,
) -> int:
  """Bytes of the sampled-columns buffer one pass of `deform_conv2d` holds.

  Follows the op's execution policy for `platform` ('cpu', 'gpu', 'tpu', ...;
  None: JAX's default backend): columns bytes are
  `pixels_per_pass * kh * kw * C * itemsize(accumulation dtype)`, where
  `pixels_per_pass` is at most `chunk_size` and at most what `memory_budget`
  (or the platform's default) allows. Useful to pick either for a memory budget.
  """
  _, _, _, c = inputs_shape
  kh, kw = kernel_shape[:2]
  n, ho, wo = offsets_shape[:3]
  itemsize = _args.promote(dtype, jnp.float32).itemsize
  bytes_per_pixel = kh * kw * c * itemsize
  pixels = max(n * ho * wo, 1)
  where = 'cpu' if (platform or jax.default_backend()) == 'cpu' else 'accelerator'
  cap = _policy.pixels_per_pass(bytes_per_pixel, chunk_size, memory_budget, where)
  num_chunks = -(-pixels // cap)
  return -(-pixels // num_chunks) * bytes_per_pixel


__all__ = ['columns_bytes', 'deform_conv2d', 'output_size']
