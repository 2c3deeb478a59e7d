"""Deformable convolution (DCNv1 offsets, DCNv2 modulation) from gather + einsum.

The op walks the flattened output pixels (n, ho, wo) in chunks. Per chunk it
builds the bilinearly sampled columns `[chunk, kh*kw, C]` (four corner gathers
fused with their weights) and contracts them with the kernel in one einsum.
Chunking is what makes it fast on CPU as well as bounded in memory: a columns
buffer that stays in cache beats one that is written out to RAM (measured in
experiments/bench_ops.py), and the chunk body is rematerialised so that the
backward pass never stores more than one chunk of columns either.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deformjax.ops import _args
from deformjax.ops.sampling import bilinear_corners, gather_corners

# Columns bytes per chunk when the caller does not choose: large enough that the
# per-iteration overhead is amortised, small enough to stay in L2 on CPU. Swept
# 0.25-8 MiB on the benchmark shapes: 0.5 MiB gave the best forward+backward
# (2.1-2.4x of lax.conv vs 3.2-3.3x at 2 MiB) at the same forward time.
DEFAULT_CHUNK_BYTES = 512 * 1024
# Bytes of precomputed corner rows + weights made at once (see deform_conv2d):
# 8 per sample point, i.e. 8*offset_groups/C of the whole columns buffer.
INDEX_BLOCK_BYTES = 64 * 1024 * 1024


def _check_groups(value, name: str, fn: str) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{fn}: {name} must be a positive int, got {value!r}')
  return int(value)


def output_size(
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    strides=1,
    padding: _args.PaddingLike = 0,
    dilation=1,
    fn: str = 'deform_conv2d',
) -> tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]:
  """Output spatial size and explicit ((top, bottom), (left, right)) padding.

  Same arithmetic as `lax.conv_general_dilated`; used by the op and by modules
  that must predict offsets of the right shape.
  """
  sh, sw = _args.positive_pair(strides, 'strides', fn)
  dh, dw = _args.positive_pair(dilation, 'dilation', fn)
  kh, kw = kernel_hw
  window = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
  pads = _args.padding_pairs(padding, in_hw, window, (sh, sw), fn)
  sizes = []
  for size, (lo, hi), win, s, axis in zip(in_hw, pads, window, (sh, sw), 'HW'):
    if size + lo + hi < win:
      raise ValueError(
          f'{fn}: padded input {axis} = {size}+{lo}+{hi} is smaller than the dilated kernel '
          f'({win}); no output position exists'
      )
    sizes.append((size + lo + hi - win) // s + 1)
  return (sizes[0], sizes[1]), pads


def deform_conv2d(
    inputs: jax.Array,
    offsets: jax.Array,
    kernel: jax.Array,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    strides=1,
    padding: _args.PaddingLike = 0,
    dilation=1,
    groups: int = 1,
    offset_groups: int = 1,
    precision=None,
    preferred_element_type=None,
    chunk_size: int | None = None,
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
    offset_groups: groups of input channels sharing one offset field.
    precision: passed to the contraction with the kernel.
    preferred_element_type: output dtype; by default the promoted dtype of
      inputs and kernel. Sampling and accumulation happen in float32 for
      bfloat16/float16 inputs (float64 for float64).
    chunk_size: output pixels (over N*Ho*Wo) per chunk. The sampled-columns
      buffer of one chunk is `chunk_size*kh*kw*C*4` bytes (8 for float64), and
      it bounds the temporary memory of the forward and backward passes. None
      picks chunks of about 0.5 MiB. Besides the chunk, both passes keep the
      corner rows and weights of the sample points: 32 bytes per point and
      offset group (48 for float64), `8*offset_groups/C` of the whole float32
      columns buffer, made per block of chunks past `INDEX_BLOCK_BYTES`
      (64 MiB).

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
  _args.check_floating(inputs, 'inputs', fn)
  _args.check_floating(offsets, 'offsets', fn)
  _args.check_floating(kernel, 'kernel', fn)
  _args.check_rank(inputs, 4, 'inputs', '[N, H, W, C]', fn)
  _args.check_rank(kernel, 4, 'kernel', '[kh, kw, C // groups, C_out]', fn)
  groups = _check_groups(groups, 'groups', fn)
  offset_groups = _check_groups(offset_groups, 'offset_groups', fn)
  n, h, w, c = inputs.shape
  kh, kw, cin_g, cout = kernel.shape
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
  (ho, wo), ((pt, _), (pl, _)) = output_size((h, w), (kh, kw), strides, padding, dilation, fn)
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
  if chunk_size is not None and (
      not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1
  ):
    raise ValueError(f'{fn}: chunk_size must be a positive int or None, got {chunk_size!r}')

  compute_dtype = _args.promote(inputs.dtype, kernel.dtype)
  acc_dtype = _args.promote(compute_dtype, jnp.float32)
  cdtype = _args.coordinate_dtype(offsets.dtype, compute_dtype)
  out_dtype = np.dtype(preferred_element_type) if preferred_element_type is not None else compute_dtype
  inputs = inputs.astype(compute_dtype)
  kernel = kernel.astype(compute_dtype)

  pixels = n * ho * wo
  if pixels == 0 or h * w * c == 0:
    # Nothing to sample: every tap reads zero, the result is the bias alone.
    out = jnp.zeros((n, ho, wo, cout), acc_dtype)
    if bias is not None:
      out = out + bias.astype(acc_dtype).reshape(1, 1, 1, cout)
    return out.astype(out_dtype)

  if chunk_size is None:
    chunk_size = max(1, DEFAULT_CHUNK_BYTES // (taps * c * acc_dtype.itemsize))
  chunk = min(int(chunk_size), pixels)
  num_chunks = -(-pixels // chunk)
  # Corner rows and weights are computed in one vectorised pass and handed to
  # the chunk loop as arrays. Computed inside the chunk body, XLA fuses the whole
  # index arithmetic into the gather and redoes it for every channel (measured
  # 1.4-1.7x slower forward). Those arrays (8 per sample point) are made for all
  # pixels at once while they fit INDEX_BLOCK_BYTES, else per block of chunks.
  point_bytes = taps * og * (4 + cdtype.itemsize) * 4
  per_block = max(1, min(num_chunks, INDEX_BLOCK_BYTES // max(1, chunk * point_bytes)))
  num_blocks = -(-num_chunks // per_block)
  per_block = -(-num_chunks // num_blocks)
  block = per_block * chunk
  padded = num_blocks * block
  idx_dtype = _args.index_dtype(max(n * h * w * og, padded), fn)

  cg = c // og
  # Sampled in the accumulation dtype: for bf16/f16 inputs the backward's
  # scatter-add then accumulates in float32 (exact to f32, and 3x faster on CPU
  # than XLA's bf16 scatter), at the price of one f32 copy of the input.
  table = inputs.reshape(n * h * w * og, cg).astype(acc_dtype)
  # Offsets and mask are re-laid out tap-major ([.., K, G, ..]) before sampling,
  # so the sampled columns come out as [chunk, K, C] without transposing them.
  off = offsets.reshape(pixels, og, taps, 2).transpose(0, 2, 1, 3)
  off = jnp.pad(off, ((0, padded - pixels), (0, 0), (0, 0), (0, 0))).reshape(num_blocks, block, taps, og, 2)
  xs = [jnp.arange(num_blocks, dtype=idx_dtype), off]
  if mask is not None:
    m = mask.reshape(pixels, og, taps).transpose(0, 2, 1)
    xs.append(jnp.pad(m, ((0, padded - pixels), (0, 0), (0, 0))).reshape(num_blocks, block, taps, og))

  tap_i = np.repeat(np.arange(kh), kw) * dh
  tap_j = np.tile(np.arange(kw), kh) * dw
  group_row = jnp.arange(og, dtype=idx_dtype)
  if groups == 1:
    w_mat = kernel.reshape(taps * c, cout)
  else:
    w_grp = kernel.reshape(taps, cin_g, groups, cout // groups)

  def corners(args):
    """Flat table rows and weights of the four corners, 2 x 4 x [per_block, chunk*K*G]."""
    bi, off_b = args[0], args[1]
    p = bi * block + jnp.arange(block, dtype=idx_dtype)
    # Padding pixels past the end reuse the last image; their mask/offsets are 0
    # and their outputs are sliced off.
    img = jnp.minimum(p // (ho * wo), n - 1)
    rem = p % (ho * wo)
    oy = (rem // wo) * sh - pt
    ox = (rem % wo) * sw - pl
    y = oy.astype(cdtype)[:, None, None] + jnp.asarray(tap_i, cdtype)[None, :, None] + off_b[..., 0].astype(cdtype)
    x = ox.astype(cdtype)[:, None, None] + jnp.asarray(tap_j, cdtype)[None, :, None] + off_b[..., 1].astype(cdtype)
    idx, wts = bilinear_corners(y, x, h, w, idx_dtype)  # 4 x [block, K, G]
    if mask is not None:
      wts = tuple(wt * args[2].astype(cdtype) for wt in wts)
    image_start = (img * (h * w))[:, None, None]
    rows = tuple(((image_start + i) * og + group_row[None, None, :]).reshape(per_block, -1) for i in idx)
    return rows, tuple(wt.reshape(per_block, -1) for wt in wts)

  def chunk_body(args):
    rows, wts = args
    cols = gather_corners(table, rows, wts, acc_dtype)  # [chunk*K*G, C/G]
    cols = cols.astype(compute_dtype)
    if groups == 1:
      return jnp.dot(
          cols.reshape(chunk, taps * c), w_mat, precision=precision, preferred_element_type=acc_dtype
      )
    cols = cols.reshape(chunk, taps, groups, cin_g)
    out = jnp.einsum(
        'bkgc,kcgo->bgo', cols, w_grp, precision=precision, preferred_element_type=acc_dtype
    )
    return out.reshape(chunk, cout)

  # prevent_cse=False is safe inside lax.map (scan already keeps the
  # rematerialised body from being merged with the forward one).
  remat_chunk = jax.checkpoint(chunk_body, prevent_cse=False)
  if num_blocks == 1:
    # All corners at top level: computed once and kept for the backward pass,
    # and 1.25x faster forward than inside an outer loop (measured, N=8 64x64x64).
    rows, wts = corners(tuple(a[0] for a in xs))
    out = lax.map(remat_chunk, (rows, wts))
  else:
    block_body = lambda args: lax.map(remat_chunk, corners(args))
    out = lax.map(jax.checkpoint(block_body, prevent_cse=False), tuple(xs))
  out = out.reshape(padded, cout)[:pixels].reshape(n, ho, wo, cout)
  if bias is not None:
    out = out + bias.astype(acc_dtype).reshape(1, 1, 1, cout)
  return out.astype(out_dtype)


def columns_bytes(
    inputs_shape, kernel_shape, offsets_shape, dtype=jnp.float32, chunk_size: int | None = None
) -> int:
  """Bytes of the sampled-columns buffer one chunk of `deform_conv2d` needs.

  Useful to pick `chunk_size` for a memory budget: columns bytes are
  `chunk_size * kh * kw * C * itemsize(accumulation dtype)`.
  """
  _, _, _, c = inputs_shape
  kh, kw = kernel_shape[:2]
  n, ho, wo = offsets_shape[:3]
  itemsize = _args.promote(dtype, jnp.float32).itemsize
  pixels = n * ho * wo
  if chunk_size is None:
    chunk_size = max(1, DEFAULT_CHUNK_BYTES // (kh * kw * c * itemsize))
  return min(chunk_size, max(pixels, 1)) * kh * kw * c * itemsize


__all__ = ['deform_conv2d', 'output_size', 'columns_bytes', 'DEFAULT_CHUNK_BYTES']
