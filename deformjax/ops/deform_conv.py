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

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from deformjax.ops import _args, _policy, sampling
from deformjax.ops._policy import CPU_CHUNK_BYTES
from deformjax.ops.sampling import INDEX_BLOCK_BYTES

_PrecisionLike = str | jax.lax.Precision | tuple | None


def _infer_offset_groups(offsets, taps: int, fn: str) -> int:
  """torchvision's rule: offsets carry offset_groups*kh*kw*2 channels."""
  channels = np.shape(offsets)[-1] if np.ndim(offsets) == 4 else None
  if channels is None:
    return 1  # the shape check names what offsets must look like
  if channels == 0 or channels % (2 * taps):
    raise ValueError(
        f'{fn}: offsets must have shape [N, Ho, Wo, offset_groups*kh*kw*2]; their {channels} channels are not a '
        f'positive multiple of 2*kh*kw = {2 * taps}, so offset_groups cannot be inferred, got '
        f'{tuple(np.shape(offsets))}'
    )
  return channels // (2 * taps)


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
  return _output_size(in_hw, kernel_hw, strides, padding, dilation, 'output_size')


def _output_size(in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides: int | Sequence[int],
                 padding: _args.PaddingLike, dilation: int | Sequence[int], fn: str
                 ) -> tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]:
  """`output_size`, its errors labelled with the calling op's name `fn`."""
  sh, sw = _args.positive_pair(strides, 'strides', fn)
  dh, dw = _args.positive_pair(dilation, 'dilation', fn)
  kh, kw = kernel_hw
  window = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
  pads = _args.padding_pairs(padding, in_hw, window, (sh, sw), fn)
  sizes = []
  for size, (lo, hi), win, s, axis in zip(in_hw, pads, window, (sh, sw), 'HW'):
    if _policy.known_le(win, size + lo + hi) is False:
      raise ValueError(
          f'{fn}: padded input {axis} = {size}+{lo}+{hi} is smaller than the dilated kernel '
          f'({win}); no output position exists'
      )
    sizes.append((size + lo + hi - win) // s + 1)
  return (sizes[0], sizes[1]), pads


class _Geometry(NamedTuple):
  """Static description of a deform_conv2d call: what the corner computation needs besides the arrays."""
  n: int
  hw: tuple[int, int]
  out_hw: tuple[int, int]
  strides: tuple[int, int]
  pads: tuple[int, int]  # top, left
  dilation: tuple[int, int]
  kernel_hw: tuple[int, int]
  offset_groups: int
  cdtype: np.dtype
  idx_dtype: np.dtype


def _corners(geom: _Geometry, start, count, off, m):
  """Flat table rows and weights of the four corners of `count` pixels from `start`, 2 x 4 x [count*K*G].

  Computed in one vectorised pass and handed to the columns pass as arrays:
  computed inside a chunk body, XLA fuses the whole index arithmetic into the
  gather and redoes it for every channel (measured 1.4-1.7x slower forward on
  CPU). `sampling.run_passes` makes them for all pixels at once while they fit
  `sampling.INDEX_BLOCK_BYTES`, else per block of chunks.
  """
  (kh, kw), (dh, dw), cdtype = geom.kernel_hw, geom.dilation, geom.cdtype
  img, oy, ox = sampling.output_pixels(start, count, geom.n, geom.out_hw, geom.idx_dtype)
  tap_i = np.repeat(np.arange(kh), kw) * dh
  tap_j = np.tile(np.arange(kw), kh) * dw
  y, x = (
      (pos * stride - pad).astype(cdtype)[:, None, None] + jnp.asarray(tap, cdtype)[None, :, None]
      + off[..., axis].astype(cdtype)
      for pos, stride, pad, tap, axis in zip((oy, ox), geom.strides, geom.pads, (tap_i, tap_j), (0, 1)))
  group_row = jnp.arange(geom.offset_groups, dtype=geom.idx_dtype)[None, None, :]
  return sampling.image_corners(y, x, None if m is None else m.astype(cdtype), img, geom.hw, geom.offset_groups,
                                group_row, geom.idx_dtype)


def _contract(taps: int, groups: int, precision, acc_dtype, cols, kernel):
  """[count*K*G, C/G] sampled columns (compute dtype) x kernel -> [count, C_out]."""
  if groups == 1:
    return jnp.dot(cols.reshape(-1, kernel.shape[0]), kernel, precision=precision, preferred_element_type=acc_dtype)
  _, cin_g, _, cout_g = kernel.shape
  out = jnp.einsum('bkgc,kcgo->bgo', cols.reshape(-1, taps, groups, cin_g), kernel, precision=precision,
                   preferred_element_type=acc_dtype)
  return out.reshape(-1, groups * cout_g)


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
    deterministic: bool = False,
) -> jax.Array:
  """Deformable 2-D convolution, NHWC, with torchvision's semantics.

  Output pixel (n, ho, wo), tap k = i*kw + j of offset group g samples input
  channel group g at
  `y = ho*stride_h - pad_top + i*dilation_h + dy`,
  `x = wo*stride_w - pad_left + j*dilation_w + dx`,
  with `dy = offsets[n, ho, wo, (g*kh*kw + k)*2]`, `dx = ...*2 + 1]`, bilinearly
  (out-of-image corners read 0), multiplies by `mask[n, ho, wo, g*kh*kw + k]`
  and contracts with `kernel[i, j]`.

  Args:
    inputs: `[N, H, W, C]`.
    offsets: `[N, Ho, Wo, offset_groups*kh*kw*2]`, (dy, dx) pairs in
      torchvision's channel order; an NCHW torchvision offset tensor becomes
      this by `transpose(0, 2, 3, 1)`.
    kernel: `[kh, kw, C // groups, C_out]` (HWIO).
    mask: optional `[N, Ho, Wo, offset_groups*kh*kw]` modulation (DCNv2); any
      real values, None means 1.
    bias: optional `[C_out]`.
    strides: int or (sh, sw).
    padding: int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID'.
      Padding is never materialised: padded positions read 0 like any point
      outside the image.
    dilation: int or (dh, dw).
    groups: feature groups (C and C_out divisible by it).
    offset_groups: groups of input channels sharing one offset field. None
      infers it from the offsets' channels, `offset_groups*kh*kw*2`
      (torchvision's rule).
    precision: passed to the contraction with the kernel. float32 follows
      JAX's default matmul precision, which on recent NVIDIA GPUs (A100, H100)
      and TPUs is TF32 / bf16-pass arithmetic (~3e-4 relative); pass
      `precision='highest'` (or set `jax_default_matmul_precision='highest'`)
      for float32-exact results. The sampling itself is always exact.
    preferred_element_type: output dtype; by default the promoted dtype of
      inputs and kernel. Sampling and accumulation happen in float32 for
      bfloat16/float16 inputs (float64 for float64).
    chunk_size: output pixels (over N*Ho*Wo) per pass: on CPU it replaces the
      cache-sized default chunk, on GPU/TPU it caps the pass. One pass holds a
      sampled-columns buffer of `chunk_size*kh*kw*C*4` bytes (8 for float64),
      which bounds the temporary memory of the forward and backward passes.
      None leaves it to the execution policy below.
    memory_budget: most bytes of sampled columns one pass may hold. The policy
      is chosen for the platform the function is lowered for (also by
      `jax.export(..., platforms=[...])` on another host): on GPU/TPU the op
      runs in one pass while the whole columns buffer fits the budget (None:
      `current_accelerator_memory_budget()`, 1 GiB unless a
      `with accelerator_memory_budget(nbytes):` scope sets it) and in equal
      blocks beyond it; on CPU
      it walks cache-sized chunks (`CPU_CHUNK_BYTES`, 0.5 MiB, or the budget if
      smaller), which is fastest there. Besides the columns, both passes keep
      the corner rows and weights of the sample points: 32 bytes per point and
      offset group (48 for float64), `8*offset_groups/C` of the whole float32
      columns buffer, made per block of chunks past `INDEX_BLOCK_BYTES`.
      With a symbolic batch (`jax.export`) the choice between one pass and
      chunks is made when the exported function is called with real shapes.
    deterministic: make every gradient bit-identical run to run. XLA's GPU
      scatter-add uses atomics in no fixed order; with this flag the input
      gradient is a sorted segment sum instead (`sampling.sorted_segment_sum`)
      when lowered for GPU/TPU, at a cost in speed. CPU is deterministic
      either way. It trades forward-mode autodiff (`jax.jvp`, `jacfwd`) away:
      reverse mode (`grad`, `vjp`, grad of grad), `vmap` and `checkpoint` work.

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
  fn = 'deform_conv2d'
  inputs, offsets, kernel, mask, bias = (
      _args.as_array(a, name, fn) for a, name in
      zip((inputs, offsets, kernel, mask, bias), ('inputs', 'offsets', 'kernel', 'mask', 'bias')))
  _args.check_floating(inputs, 'inputs', fn)
  _args.check_floating(offsets, 'offsets', fn)
  _args.check_floating(kernel, 'kernel', fn)
  _args.check_rank(inputs, 4, 'inputs', '[N, H, W, C]', fn)
  _args.check_rank(kernel, 4, 'kernel', '[kh, kw, C // groups, C_out]', fn)
  groups = _args.positive_int(groups, 'groups', fn)
  n, h, w, c = inputs.shape
  kh, kw, cin_g, cout = kernel.shape
  if offset_groups is None:
    offset_groups = _infer_offset_groups(offsets, kh * kw, fn)
  offset_groups = _args.positive_int(offset_groups, 'offset_groups', fn)
  if c % groups:
    raise ValueError(f'{fn}: inputs channels C={c} must be divisible by groups={groups}')
  if c % offset_groups:
    raise ValueError(f'{fn}: inputs channels C={c} must be divisible by offset_groups={offset_groups}')
  if cout % groups:
    raise ValueError(f'{fn}: kernel output channels C_out={cout} must be divisible by groups={groups}')
  if cin_g != c // groups or kh < 1 or kw < 1:
    raise ValueError(
        f'{fn}: kernel must have shape [kh, kw, C // groups, C_out] = [kh, kw, {c // groups}, C_out] '
        f'with kh, kw >= 1, got {tuple(kernel.shape)}'
    )
  (ho, wo), ((pt, _), (pl, _)) = _output_size((h, w), (kh, kw), strides, padding, dilation, fn)
  sh, sw = _args.pair(strides, 'strides', fn)
  dh, dw = _args.pair(dilation, 'dilation', fn)
  taps = kh * kw
  og = offset_groups
  _args.check_shape(offsets, (n, ho, wo, og * taps * 2), 'offsets', '[N, Ho, Wo, offset_groups*kh*kw*2]', fn)
  if mask is not None:
    _args.check_floating(mask, 'mask', fn)
    _args.check_shape(mask, (n, ho, wo, og * taps), 'mask', '[N, Ho, Wo, offset_groups*kh*kw]', fn)
  if bias is not None:
    _args.check_floating(bias, 'bias', fn)
    _args.check_shape(bias, (cout,), 'bias', '[C_out]', fn)
  sampling.check_policy_args(chunk_size, memory_budget, deterministic, fn)

  compute_dtype = _args.promote(inputs.dtype, kernel.dtype)
  acc_dtype = _args.promote(compute_dtype, jnp.float32)
  cdtype = _args.coordinate_dtype(offsets.dtype, compute_dtype)
  out_dtype = np.dtype(preferred_element_type) if preferred_element_type is not None else compute_dtype
  if not jnp.issubdtype(out_dtype, jnp.floating):
    raise ValueError(f'{fn}: preferred_element_type must be a floating dtype (the sampled values are '
                     f'fractional), got {out_dtype}')
  inputs = inputs.astype(compute_dtype)
  kernel = kernel.astype(compute_dtype)

  pixels = n * ho * wo
  if _policy.known_le(pixels, 0) or _policy.known_le(h * w * c, 0):
    # Nothing to sample: every tap reads zero, the result is the bias alone.
    out = jnp.zeros((n, ho, wo, cout), acc_dtype)
  else:
    native = _policy.native_op('deform_conv2d')  # an exporter's own operator (deformjax.export: ONNX DeformConv)
    out = None if native is None else native(inputs, offsets, kernel, mask, bias, strides=strides, padding=padding,
                                             dilation=dilation, groups=groups, offset_groups=og)
    if out is not None:
      return out.astype(out_dtype)
    idx_dtype = _args.index_dtype(n * h * w * og, fn)
    geom = _Geometry(n, (h, w), (ho, wo), (sh, sw), (pt, pl), (dh, dw), (kh, kw), og, cdtype, idx_dtype)
    # Sampled in the accumulation dtype: for bf16/f16 inputs the backward's
    # scatter-add then accumulates in float32 (exact to f32, and 3x faster on CPU
    # than XLA's bf16 scatter), at the price of one f32 copy of the input.
    table = inputs.reshape(n * h * w * og, c // og).astype(acc_dtype)
    # Offsets and mask are re-laid out tap-major ([.., K, G, ..]) before sampling,
    # so the sampled columns come out as [chunk, K, C] without transposing them.
    off = offsets.reshape(pixels, og, taps, 2).transpose(0, 2, 1, 3)
    m = None if mask is None else mask.reshape(pixels, og, taps).transpose(0, 2, 1)
    kernel_operand = kernel.reshape(taps * c, cout) if groups == 1 else kernel.reshape(taps, cin_g, groups,
                                                                                       cout // groups)
    contract = functools.partial(_contract, taps, groups, precision, acc_dtype)
    sample = functools.partial(sampling.sampled_pass, contract, compute_dtype, bool(deterministic), table,
                               kernel_operand)
    out = sampling.run_passes(
        functools.partial(_corners, geom), sample, (off, m), pixels=pixels,
        bytes_per_pixel=taps * c * acc_dtype.itemsize,
        point_bytes=taps * og * (idx_dtype.itemsize + cdtype.itemsize) * 4, idx_dtype=idx_dtype,
        chunk_size=chunk_size, memory_budget=memory_budget)
    out = out.reshape(n, ho, wo, cout)
  if bias is not None:
    out = out + bias.astype(acc_dtype).reshape(1, 1, 1, cout)
  return out.astype(out_dtype)


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


__all__ = ['CPU_CHUNK_BYTES', 'INDEX_BLOCK_BYTES',
           'columns_bytes', 'deform_conv2d', 'output_size']
