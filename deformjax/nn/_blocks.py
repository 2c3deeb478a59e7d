"""The computation of every `deformjax.nn` operator module, given its layers: one block per operator.

Each NNX module and its Linen twin (`deformjax.nn.linen`) build their own
parameters the way their API builds them, check their arguments, and then call
the same block here, so the two compute the same numbers by construction. The
block owns what happens between the parameters and the op: the offset
predictor's output split into offsets and mask, the dtype promotion, the
padding mode, the softmaxes, and the call into `deformjax.ops` with the
module's execution policy (`chunk_size`, `memory_budget`, `deterministic_gradients`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeGuard, cast

import jax
import jax.numpy as jnp
import numpy as np

from deformjax.nn import _common
from deformjax.nn._common import Layer
from deformjax.ops import _args, level_shapes


def _all_ints(values: Sequence[Any]) -> TypeGuard[Sequence[int]]:
  """Every entry a Python int."""
  return all(isinstance(v, int) for v in values)


def explicit_padding(padding: _args.PaddingLike) -> str | tuple[tuple[int, int], ...]:
  """deformjax padding forms, already checked (`_common.check_padding`) -> a form `nnx.Conv` / `nn.Conv` reads
  identically (for the offset predictor): the mode's name, or one (low, high) pair per spatial axis."""
  if isinstance(padding, str):
    return padding.upper()
  if not isinstance(padding, Sequence):  # an int, or a numpy integer, which the padding check also accepts
    p = int(padding)
    return ((p, p), (p, p))
  if _all_ints(padding):
    return tuple((int(p), int(p)) for p in padding)
  # Checked: not all ints, so ((top, bottom), (left, right)).
  return tuple((int(lo), int(hi)) for lo, hi in cast(Sequence[Sequence[int]], padding))


def check_deform_conv_args(name: str, in_features: int, out_features: int, feature_group_count: int,
                           offset_groups: int | None, max_offset: float | None, predict_offsets: bool) -> None:
  """Validates a DeformConv's widths, groups and `max_offset` by name (the NNX module when built, the Linen twin
  when it first sees its input's width). `offset_groups=None` (inferred per call) needs `predict_offsets=False`."""
  _args.positive_int(feature_group_count, 'feature_group_count', name)
  if offset_groups is None and predict_offsets:
    raise ValueError(f'{name}: offset_groups=None (inferred from the offsets passed in) needs predict_offsets=False; '
                     'a layer that predicts its offsets must know how many to predict')
  if offset_groups is None:
    offset_groups = 1  # the op infers the count from the offsets and checks it against the channels
  _args.positive_int(offset_groups, 'offset_groups', name)
  if in_features % feature_group_count or out_features % feature_group_count:
    raise ValueError(f'{name}: in_features={in_features} and out_features={out_features} must be divisible by '
                     f'feature_group_count={feature_group_count}')
  if in_features % offset_groups:
    raise ValueError(f'{name}: in_features={in_features} must be divisible by offset_groups={offset_groups}')
  if max_offset is not None and not (_args.is_real(max_offset) and max_offset > 0):
    raise ValueError(f'{name}: max_offset must be positive or None, got {max_offset!r}')


def deform_conv_block(inputs: jax.Array, offsets: jax.Array | None, mask: jax.Array | None, kernel: jax.Array,
                      bias: jax.Array | None, offset_conv: Layer | None,
                      promote: Callable[[jax.Array, jax.Array, jax.Array | None], tuple], *,
                      kernel_size: tuple[int, int], strides: tuple[int, int], padding: _args.PaddingLike,
                      dilation: tuple[int, int], groups: int, offset_groups: int | None, modulated: bool,
                      offset_scale: float, max_offset: float | None, name: str, precision: Any = None,
                      preferred_element_type: Any = None, chunk_size: int | None = None,
                      memory_budget: int | None = None,
                      deterministic_gradients: bool = False) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """`DeformConv`'s computation given its parameters (what the NNX module and its Linen twin share).

  Args:
    inputs: `[..., H, W, C]`, any leading batch dims (or none).
    offsets: `[..., Ho, Wo, offset_groups*kh*kw*2]`, or None to run `offset_conv`.
    mask: the DCNv2 modulation `[..., Ho, Wo, offset_groups*kh*kw]`, or None (the predicted one when the
      predictor runs and `modulated`, else 1).
    kernel: `[kh, kw, C // groups, F]`, the kernel mask already applied; bias: `[F]` or None.
    offset_conv: the offset predictor, `[..., H, W, C] -> [..., Ho, Wo, offset_groups*kh*kw*(3 or 2)]`, or None.
    promote: `(inputs, kernel, bias) -> (inputs, kernel, bias)` in the compute dtype (the module's
      `promote_dtype`).
    The keywords: the layer's geometry and prediction settings; `chunk_size`, `memory_budget`,
    `deterministic_gradients` go to `deformjax.ops.deform_conv2d`.

  Returns:
    `(y [..., Ho, Wo, F], offsets, mask)`, mask None when unmodulated and none was passed.
  """
  if offsets is None:
    if offset_conv is None:
      raise ValueError(f'{name}: offsets are required when the layer has no predictor (predict_offsets=False)')
    assert offset_groups is not None, 'check_deform_conv_args: a predictor needs offset_groups'
    _common.check_geometry(inputs, kernel_size, strides, padding, dilation, name)
    taps = offset_groups * kernel_size[0] * kernel_size[1]
    offsets, predicted_mask = _common.split_prediction(offset_conv(inputs), taps * 2, modulated, offset_scale,
                                                       max_offset)
    mask = predicted_mask if mask is None else mask
  inputs, kernel, bias = promote(inputs, kernel, bias)
  inputs, padding = _common.pad_for_mode(inputs, padding, kernel_size, dilation)
  y = _common.deform_conv_any_batch(
      inputs, offsets, kernel, mask, bias, strides=strides, padding=padding, dilation=dilation, groups=groups,
      offset_groups=offset_groups, precision=precision, preferred_element_type=preferred_element_type,
      chunk_size=chunk_size, memory_budget=memory_budget, deterministic_gradients=deterministic_gradients)
  return y, offsets, mask


def group_softmax(logits: jax.Array, groups: int) -> jax.Array:
  """Softmax over the taps of each group: `[..., groups*K] -> [..., groups*K]` (DCNv3's mask normalisation).

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.nn._blocks import group_softmax
    >>> group_softmax(jnp.zeros((1, 6), jnp.float32), 2).tolist()  # two groups of three taps
    [[0.333, 0.333, 0.333, 0.333, 0.333, 0.333]]
  """
  shaped = logits.reshape(logits.shape[:-1] + (groups, logits.shape[-1] // groups))
  weights = jax.nn.softmax(shaped.astype(_common.softmax_dtype(logits.dtype)), axis=-1)
  return weights.astype(logits.dtype).reshape(logits.shape)


def dcnv3_block(inputs: jax.Array, input_proj: Layer, dw_conv: Layer, norm: Layer, offset: Layer, mask: Layer,
                center_feature_scale_proj: Layer | None, output_proj: Layer, *, kernel_size: int, groups: int,
                padding: int, dilation: int, offset_scale: float, remove_center: bool, chunk_size: int | None = None,
                memory_budget: int | None = None,
                deterministic_gradients: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """DCNv3's computation given its layers (what the NNX module and its Linen twin share).

  `inputs [..., H, W, C]` -> `(y [..., H, W, C], offsets [..., H, W, groups*K*2], mask [..., H, W, groups*K])`.
  `chunk_size`, `memory_budget`, `deterministic_gradients` go to `deformjax.ops.dcnv3`.
  """
  from deformjax.ops import dcnv3

  batch = inputs.shape[:-3]
  inputs = _common.flatten_batch(inputs, batch)
  x = input_proj(inputs)
  h = jax.nn.gelu(norm(dw_conv(inputs)), approximate=False)  # torch nn.GELU is the erf form
  offsets = offset(h)
  weights = group_softmax(mask(h), groups)
  y = dcnv3(x, offsets.astype(x.dtype), weights.astype(x.dtype), kernel_size=kernel_size, padding=padding,
            dilation=dilation, groups=groups, offset_scale=offset_scale, remove_center=remove_center,
            chunk_size=chunk_size, memory_budget=memory_budget, deterministic_gradients=deterministic_gradients)
  if center_feature_scale_proj is not None:
    y = _common.blend_center(y, x, center_feature_scale_proj(h), groups)
  y = output_proj(y)
  return (_common.unflatten_batch(y, batch), _common.unflatten_batch(offsets, batch),
          _common.unflatten_batch(weights, batch))


def dcnv4_block(inputs: jax.Array, value_proj: Layer | None, offset_mask_dw: Layer | None, offset_mask: Layer,
                center_feature_scale_proj: Layer | None, output_proj: Layer | None, *, kernel_size: int, groups: int,
                padding: int, dilation: int, offset_scale: float, remove_center: bool, chunk_size: int | None = None,
                memory_budget: int | None = None, deterministic_gradients: bool = False) -> tuple[jax.Array, jax.Array]:
  """DCNv4's computation given its layers: `inputs [..., H, W, C]` -> `(y, offset_mask [..., H, W, ceil8(G*K*3)])`.

  `chunk_size`, `memory_budget`, `deterministic_gradients` go to `deformjax.ops.dcnv4`.
  """
  from deformjax.ops import dcnv4

  batch = inputs.shape[:-3]
  inputs = _common.flatten_batch(inputs, batch)
  x = inputs if value_proj is None else value_proj(inputs)
  packed = offset_mask(inputs if offset_mask_dw is None else offset_mask_dw(inputs))
  y = dcnv4(x, packed.astype(x.dtype), kernel_size=kernel_size, padding=padding, dilation=dilation, groups=groups,
            offset_scale=offset_scale, remove_center=remove_center, chunk_size=chunk_size, memory_budget=memory_budget,
            deterministic_gradients=deterministic_gradients)
  if center_feature_scale_proj is not None:
    y = _common.blend_center(y, x, center_feature_scale_proj(y), groups)  # the reference gates on the aggregated values
  if output_proj is not None:
    y = output_proj(y)
  return _common.unflatten_batch(y, batch), _common.unflatten_batch(packed, batch)


def split_offset_mask(packed: jax.Array, groups: int, points: int) -> tuple[jax.Array, jax.Array]:
  """DCNv4's packed `[..., ceil8(groups*points*3)]` -> `(offsets [..., groups*points*2], mask [..., groups*points])`,
  in `deformjax.ops.dcnv3`'s layout (the padding channels dropped).

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.nn._blocks import split_offset_mask
    >>> offsets, mask = split_offset_mask(jnp.arange(8.0)[None], groups=2, points=1)  # per group: x, y, mask
    >>> offsets.tolist(), mask.tolist()
    ([[0.0, 1.0, 3.0, 4.0]], [[2.0, 5.0]])
  """
  per_group = packed[..., :groups * points * 3].reshape(packed.shape[:-1] + (groups, points * 3))
  lead = packed.shape[:-1]
  return (per_group[..., :points * 2].reshape(lead + (groups * points * 2,)),
          per_group[..., points * 2:].reshape(lead + (groups * points,)))


def directional_bias_init(num_heads: int, num_levels: int,
                          num_points: int) -> Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]:
  """Deformable DETR's sampling-offset bias: head `m` looks along the angle `2*pi*m/num_heads`, its point `p`
  at `p + 1` grid steps (the direction scaled so its larger coordinate is 1), identical at every level.

  Returns a flax initializer `(key, shape, dtype) -> [num_heads*num_levels*num_points*2]` in the
  `(head, level, point, (x, y))` order of the layer's `sampling_offsets` outputs.

  Example:
    >>> import jax
    >>> from deformjax.nn._blocks import directional_bias_init
    >>> bias = directional_bias_init(4, 1, 2)(jax.random.key(0), (16,), 'float32')
    >>> bias.reshape(4, 2, 2)[1].tolist()  # head 1 looks up (+y): one step, then two
    [[0.0, 1.0], [0.0, 2.0]]
  """
  thetas = np.arange(num_heads, dtype=np.float64) * (2.0 * np.pi / num_heads)
  grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
  grid = grid / np.abs(grid).max(-1, keepdims=True)
  grid = np.broadcast_to(grid[:, None, None, :], (num_heads, num_levels, num_points, 2))
  grid = grid * np.arange(1, num_points + 1, dtype=np.float64)[None, None, :, None]
  flat = grid.reshape(-1)

  def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    del key
    if tuple(shape) != flat.shape:
      raise ValueError(f'directional_bias_init: shape must be {flat.shape}, got {tuple(shape)}')
    return jnp.asarray(flat, dtype)

  return init


def check_spatial_shapes(spatial_shapes: Sequence[tuple[int, int]] | np.ndarray | jax.Array, num_levels: int,
                         name: str) -> tuple[tuple[int, int], ...]:
  """`num_levels` positive `(H_l, W_l)` pairs from a sequence or a concrete `[L, 2]` integer array (numpy, jax:
  transformers' habit); a traced array is refused by name (`level_shapes`)."""
  shapes = level_shapes(spatial_shapes, name)
  if len(shapes) != num_levels:
    raise ValueError(f'{name}: spatial_shapes must have num_levels={num_levels} (H_l, W_l) pairs, got {len(shapes)}')
  return shapes


def check_layer_args(name: str, d_model: int, num_heads: int, num_levels: int, num_points: int,
                     value_features: int | None) -> int:
  """Validates the layer's sizes (each a positive int, widths divisible by `num_heads`); returns the value width
  (`value_features`, default `d_model`)."""
  for arg, value in (('d_model', d_model), ('num_heads', num_heads), ('num_levels', num_levels),
                     ('num_points', num_points)):
    _args.positive_int(value, arg, name)
  if d_model % num_heads:
    raise ValueError(f'{name}: d_model={d_model} must be divisible by num_heads={num_heads}')
  if value_features is None:
    return d_model
  _args.positive_int(value_features, 'value_features', name)
  if value_features % num_heads:
    raise ValueError(f'{name}: value_features={value_features} must be divisible by num_heads={num_heads}')
  return int(value_features)


def sampling_locations(reference_points: jax.Array, offsets: jax.Array,
                       spatial_shapes: Sequence[tuple[int, int]]) -> jax.Array:
  """Deformable DETR's sampling locations `[N, Lq, M, L, P, 2]` in [0, 1] (x, y).

  Points (`reference_points [N, Lq, L, 2]`): `ref + offset / (W_l, H_l)`, offsets in
  pixels of each level. Boxes (`[N, Lq, L, 4]`, (cx, cy, w, h)): `centre + offset / P
  * wh / 2`, offsets in units of the box.

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.nn._blocks import sampling_locations
    >>> ref = jnp.full((1, 1, 1, 2), 0.5)
    >>> offsets = jnp.ones((1, 1, 1, 1, 1, 2))  # one pixel right and down
    >>> sampling_locations(ref, offsets, [(4, 8)]).reshape(2).tolist()
    [0.625, 0.75]
  """
  ref = reference_points[:, :, None, :, None, :]
  if reference_points.shape[-1] == 2:
    normaliser = jnp.asarray([[w, h] for h, w in spatial_shapes], offsets.dtype)
    return ref + offsets / normaliser[None, None, None, :, None, :]
  num_points = offsets.shape[-2]
  return ref[..., :2] + offsets / num_points * ref[..., 2:] * 0.5


def ms_deform_attn_block(query: jax.Array, reference_points: jax.Array, inputs: jax.Array,
                         spatial_shapes: Sequence[tuple[int, int]] | np.ndarray | jax.Array,
                         padding_mask: jax.Array | None,
                         value_proj: Callable[[jax.Array], jax.Array],
                         sampling_offsets: Callable[[jax.Array], jax.Array],
                         attention_weights: Callable[[jax.Array], jax.Array],
                         output_proj: Callable[[jax.Array], jax.Array], *, num_heads: int, num_levels: int,
                         num_points: int, name: str = 'MSDeformAttn', chunk_size: int | None = None,
                         memory_budget: int | None = None,
                         deterministic_gradients: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The layer's computation given its four projections (what `MSDeformAttn` and its Linen twin share).

  Shapes as `MSDeformAttn.__call__`; `value_proj` maps `d_model` to the value
  width (a multiple of `num_heads`), `output_proj` maps it back. Returns
  `(out [N, Lq, C], locations [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P])`.
  `chunk_size`, `memory_budget`, `deterministic_gradients` go to `deformjax.ops.ms_deform_attn`.
  """
  from deformjax.ops import ms_deform_attn

  m, lv, p, c = num_heads, num_levels, num_points, query.shape[-1] if query.ndim == 3 else -1
  shapes = check_spatial_shapes(spatial_shapes, lv, name)
  if query.ndim != 3:
    raise ValueError(f'{name}: query must have shape [N, Lq, d_model], got {tuple(query.shape)}')
  n, lq = query.shape[:2]
  total = sum(h * w for h, w in shapes)
  if inputs.shape == (total, lq, c) != (n, total, c):
    raise ValueError(f'{name}: query {tuple(query.shape)} and inputs {tuple(inputs.shape)} look sequence-first '
                     "([Lq, N, C], [S, N, C]: mmcv's batch_first=False): deformjax is batch-first: pass "
                     'query.transpose(1, 0, 2) and inputs.transpose(1, 0, 2)')
  if inputs.shape != (n, total, c):
    raise ValueError(f'{name}: inputs must have shape [N={n}, sum(H_l*W_l)={total}, d_model={c}], got '
                     f'{tuple(inputs.shape)}')
  if reference_points.ndim != 4 or reference_points.shape[:3] != (n, lq, lv) or reference_points.shape[3] not in (
      2, 4):
    raise ValueError(f'{name}: reference_points must have shape [N={n}, Lq={lq}, num_levels={lv}, 2 or 4], got '
                     f'{tuple(reference_points.shape)}')
  if padding_mask is not None and tuple(padding_mask.shape) != (n, total):
    raise ValueError(f'{name}: padding_mask must have shape [N={n}, sum(H_l*W_l)={total}], got '
                     f'{tuple(padding_mask.shape)}')
  value = value_proj(inputs)
  if padding_mask is not None:
    value = jnp.where(padding_mask[..., None], jnp.zeros((), value.dtype), value)
  value = value.reshape(n, total, m, value.shape[-1] // m)
  offsets = sampling_offsets(query).reshape(n, lq, m, lv, p, 2)
  logits = attention_weights(query).reshape(n, lq, m, lv * p)
  weights = jax.nn.softmax(logits.astype(_common.softmax_dtype(logits.dtype)), axis=-1)
  weights = weights.astype(value.dtype).reshape(n, lq, m, lv, p)
  locations = sampling_locations(reference_points.astype(offsets.dtype), offsets, shapes)
  out = output_proj(ms_deform_attn(value, shapes, locations.astype(value.dtype), weights, chunk_size=chunk_size,
                                   memory_budget=memory_budget, deterministic_gradients=deterministic_gradients))
  return out, locations, weights


ROI_MODULATIONS = ('2sigmoid', 'sigmoid')


def check_roi_pool_options(aligned: bool, modulated: bool, modulation: str, name: str) -> None:
  """`DeformRoIPool`'s flags, refused when it is built rather than at its first call: `aligned` and `modulated`
  bools (TypeError; a truthy string or 0/1 would otherwise pass silently), `modulation` one of `ROI_MODULATIONS`."""
  for flag, value in (('aligned', aligned), ('modulated', modulated)):
    _args.check_bool(value, flag, name)
  if not isinstance(modulation, str) or modulation not in ROI_MODULATIONS:
    raise ValueError(f'{name}: modulation must be one of {ROI_MODULATIONS}, got {modulation!r}')


def bin_mask(logits: jax.Array, modulation: str) -> jax.Array:
  """The per-bin mask from its logits: `2*sigmoid` (1 at the zero init, so a fresh layer is RoIAlign) or
  `sigmoid` (mmcv's `ModulatedDeformRoIPoolPack`, 0.5 at the zero init)."""
  return _common.mask_from_logits(logits) if modulation == '2sigmoid' else jax.nn.sigmoid(logits)


def deform_roi_pool_block(features: jax.Array, rois: jax.Array, offset_hidden: Sequence[Layer], offset_out: Layer,
                          mask_hidden: Layer | None, mask_out: Layer | None, *, output_size: tuple[int, int],
                          gamma: float, modulation: str, **pool_kwargs: Any
                          ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """`DeformRoIPool`'s computation given its layers (what the NNX module and its Linen twin share).

  Args:
    features: `[N, H, W, C]`; rois: `[R, 5]` (batch_index, x1, y1, x2, y2).
    offset_hidden: the hidden FC layers of the offset branch (ReLU after each); offset_out: its last FC,
      `-> out_h*out_w*2` normalised (dy, dx) offsets.
    mask_hidden, mask_out: the mask branch (ReLU after `mask_hidden`, which may be None); `mask_out` None:
      unmodulated.
    output_size: `(out_h, out_w)`; gamma, modulation: as the module's.
    pool_kwargs: `spatial_scale`, `sampling_ratio`, `aligned`, `max_sampling_grid` and the execution policy, for
      `deformjax.ops.roi_align` and `deform_roi_pool`.

  Returns:
    `(pooled [R, out_h, out_w, C], offsets [R, out_h, out_w, 2], mask [R, out_h, out_w, 1] or None)`.
  """
  from deformjax.ops import deform_roi_pool, roi_align

  (oh, ow), r = output_size, rois.shape[0]
  flat = roi_align(features, rois, output_size=output_size, **pool_kwargs).reshape(r, -1)
  h = flat
  for layer in offset_hidden:
    h = jax.nn.relu(layer(h))
  offsets = offset_out(h).reshape(r, oh, ow, 2)
  out = deform_roi_pool(features, rois, offsets, output_size=output_size, gamma=gamma, **pool_kwargs)
  if mask_out is None:
    return out, offsets, None
  m = jax.nn.relu(mask_hidden(flat)) if mask_hidden is not None else flat
  mask = bin_mask(mask_out(m), modulation).reshape(r, oh, ow, 1)
  return out * mask.astype(out.dtype), offsets, mask


__all__ = ['ROI_MODULATIONS', 'bin_mask', 'check_deform_conv_args', 'check_layer_args', 'check_roi_pool_options',
           'check_spatial_shapes', 'dcnv3_block', 'dcnv4_block', 'deform_conv_block', 'deform_roi_pool_block',
           'directional_bias_init', 'explicit_padding', 'group_softmax', 'ms_deform_attn_block', 'sampling_locations',
           'split_offset_mask']
