"""Deformable DETR (transformers' `DeformableDetrForObjectDetection`) as a Flax NNX detector, NHWC.

`DeformableDetr` computes what transformers' detector computes, from `pixel_values [N, H, W, 3]` and
`pixel_mask [N, H, W]` to `logits [N, Q, num_labels]` and `pred_boxes [N, Q, 4]` (cx, cy, w, h in [0, 1]):

1. **Backbone**: a ResNet with frozen batch norm (`deformjax.models.ResNet`, timm's or transformers' layout)
   returning the maps of its last stages, or any module returning a pyramid (InternImage's `pyramid`).
2. **Encoder** (`DeformableDetrEncoder`): per level a 1x1 conv + GroupNorm(32) input projection (extra levels
   by 3x3 stride-2 convs), the padding mask downsampled to each level (`downsample_mask`), the normalised sine
   position embedding (`sine_position_embedding`) plus a learned level embedding, the levels flattened, their
   valid ratios (`valid_ratios`) and reference points (`reference_points`), then post-norm layers of multi-scale
   deformable self-attention and an FFN (`DeformableDetrEncoderLayer`).
3. **Queries**: learned query embeddings split into position and content halves with reference points
   `sigmoid(Linear(position))`; or, with `two_stage`, every encoder pixel scored as a proposal
   (`encoder_proposals`) and the top `two_stage_num_proposals` boxes become the queries.
4. **Decoder** (`DeformableDetrDecoder`): post-norm layers of self-attention over the queries, multi-scale
   deformable cross-attention on the encoder memory around the reference points and an FFN; with
   `with_box_refine` each layer's box head refines the reference boxes the next layer reads.
5. **Heads**: per decoder layer a linear class head and a 3-layer box MLP on top of the inverse-sigmoid
   reference: the last layer's are `logits` / `pred_boxes`, the earlier ones `auxiliary_outputs`. Layers share
   heads (one module under several indices of `class_embed` / `bbox_embed`, one parameter) where transformers
   ties them (`tie_word_embeddings`, its default): without box refinement every layer shares one class head
   and one box head; with box refinement alone the box heads are per layer and the class head is shared; with
   two stages every head is per layer, the last one scoring the proposals. `DeformableDetr.untie_heads` gives
   every layer its own copies, as transformers' loader leaves heads whose checkpoint values differ.

Parameter names follow transformers' (`input_proj` is `encoder.input_convs` / `encoder.input_norms`,
`mlp.fc1` is `fc1`), so that `deformjax.convert.from_deformable_detr` maps a checkpoint one tensor to one
parameter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from flax.nnx.nn import initializers
from flax.typing import PrecisionLike
from jax.typing import DTypeLike

from deformjax.models.resnet import ResNet
from deformjax.nn import _common
from deformjax.nn.ms_deform_attn import MSDeformAttn
from deformjax.ops import _args

# transformers' `_init_weights` for Linear / Conv2d weights (`config.init_std`), biases zero.
_normal_init = initializers.normal(0.02)
_zeros = initializers.zeros_init()


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source rows of PyTorch's legacy `nearest` resize along one axis (`floor(dst * scale)` in float32)."""
  if out_size == in_size:
    return np.arange(out_size)
  if out_size == 2 * in_size:
    return np.arange(out_size) >> 1
  # ATen computes the scale and the product in float32 (`nearest_neighbor_compute_source_index`).
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def downsample_mask(pixel_mask: jax.Array, size: tuple[int, int]) -> jax.Array:
  """`pixel_mask [N, H, W]` resized to `size = (h, w)` as transformers does it.

  transformers calls `interpolate(pixel_mask[None].float(), size=size).to(bool)`:
  PyTorch's default `mode='nearest'`, which reads source row `floor(i * H / h)`
  (scale and product in float32) and likewise for columns. The indices are static,
  so this is a gather.

  Returns:
    bool `[N, h, w]`, True where the pixel is real.

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.models.deformable_detr import downsample_mask
    >>> mask = jnp.zeros((1, 6, 6), bool).at[:, :4, :3].set(True)
    >>> downsample_mask(mask, (3, 3)).astype(int)[0].tolist()
    [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
  """
  if pixel_mask.ndim != 3:
    raise ValueError(f'downsample_mask: pixel_mask must have shape [N, H, W], got {tuple(pixel_mask.shape)}')
  h, w = _args.positive_pair(tuple(size), 'size', 'downsample_mask')
  rows = _nearest_indices(pixel_mask.shape[1], h)
  cols = _nearest_indices(pixel_mask.shape[2], w)
  return pixel_mask.astype(bool)[:, rows][:, :, cols]


def sine_position_embedding(mask: jax.Array, num_features: int, *, temperature: float = 10000.0,
                            scale: float = 2 * math.pi, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """DETR's normalised sine position embedding of a padding mask (transformers'
  `DeformableDetrSinePositionEmbedding(num_features, normalize=True)`), NHWC.

  `y = cumsum(mask, H)`, `x = cumsum(mask, W)`, each normalised to
  `(v - 0.5) / (last + 1e-6) * scale`; channel `k` of each half is
  `sin(v / t_k)` (k even) or `cos(v / t_k)` (k odd) with
  `t_k = temperature ** (2 * (k // 2) / num_features)`; the y half comes first.

  Args:
    mask: bool `[N, H, W]`, True where the pixel is real.
    num_features: channels per coordinate (`d_model // 2`), even.
    temperature, scale: the embedding's.
    dtype: the computation's floating dtype.

  Returns:
    `[N, H, W, 2 * num_features]`.

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.models.deformable_detr import sine_position_embedding
    >>> sine_position_embedding(jnp.ones((2, 3, 4), bool), 8).shape
    (2, 3, 4, 16)
  """
  if mask.ndim != 3:
    raise ValueError(f'sine_position_embedding: mask must have shape [N, H, W], got {tuple(mask.shape)}')
  _args.positive_int(num_features, 'num_features', 'sine_position_embedding')
  if num_features % 2:
    raise ValueError(f'sine_position_embedding: num_features must be even (sin / cos pairs), got {num_features}')
  m = mask.astype(dtype)
  y = jnp.cumsum(m, axis=1)
  x = jnp.cumsum(m, axis=2)
  eps = 1e-6
  y = (y - 0.5) / (y[:, -1:, :] + eps) * scale
  x = (x - 0.5) / (x[:, :, -1:] + eps) * scale
  # The frequencies depend on nothing traced: computed once in float64, rounded to `dtype`.
  dim_t = jnp.asarray(temperature ** (2 * (np.arange(num_features) // 2) / num_features), dtype).reshape(1, 1, 1, -1)

  def embed(v):
    v = v[..., None] / dim_t
    return jnp.stack([jnp.sin(v[..., 0::2]), jnp.cos(v[..., 1::2])], axis=-1).reshape(*v.shape[:-1], num_features)

  return jnp.concatenate([embed(y), embed(x)], axis=-1)


def valid_ratios(mask: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """The valid fraction of a level, as (width, height): transformers' `get_valid_ratio`.

  The valid height is the number of real pixels in the first column, the valid
  width that in the first row (padding is bottom / right).

  Args:
    mask: bool `[N, H, W]`, True where real.
    dtype: the result's dtype.

  Returns:
    `[N, 2]`: `(valid_width / W, valid_height / H)`.

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.models.deformable_detr import valid_ratios
    >>> valid_ratios(jnp.zeros((1, 4, 8), bool).at[:, :3, :2].set(True)).tolist()
    [[0.25, 0.75]]
  """
  if mask.ndim != 3:
    raise ValueError(f'valid_ratios: mask must have shape [N, H, W], got {tuple(mask.shape)}')
  _, h, w = mask.shape
  valid_h = jnp.sum(mask[:, :, 0], axis=1).astype(dtype)
  valid_w = jnp.sum(mask[:, 0, :], axis=1).astype(dtype)
  return jnp.stack([valid_w / w, valid_h / h], axis=-1)


def reference_points(spatial_shapes: Sequence[tuple[int, int]], ratios: jax.Array) -> jax.Array:
  """The encoder's reference points: transformers' `DeformableDetrEncoder.get_reference_points`.

  Pixel `(i, j)` of level `l` refers to `((j + 0.5) / (r_l^x W_l), (i + 0.5) / (r_l^y H_l))`,
  its position relative to the valid part of its own level, which is then
  scaled by every level's valid ratio: `[N, S, L, 2]` (x, y).

  Args:
    spatial_shapes: static `(H_l, W_l)` of the `L` levels.
    ratios: `[N, L, 2]` (width, height) valid ratios (`valid_ratios`).

  Returns:
    `[N, sum(H_l * W_l), L, 2]` in the dtype of `ratios`.

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.models.deformable_detr import reference_points
    >>> ref = reference_points([(2, 2), (1, 1)], jnp.ones((1, 2, 2)))
    >>> ref.shape, ref[0, :, 0].tolist()
    ((1, 5, 2, 2), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75], [0.5, 0.5]])
  """
  num_levels = len(spatial_shapes)
  if ratios.ndim != 3 or ratios.shape[1:] != (num_levels, 2):
    raise ValueError(f'reference_points: ratios must have shape [N, num_levels={num_levels}, 2], got '
                     f'{tuple(ratios.shape)}')
  per_level = []
  for level, (h, w) in enumerate(spatial_shapes):
    # Pixel centres are exact in any float dtype; only the division is traced.
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing='ij')
    ref_y = jnp.asarray(ys.reshape(-1), ratios.dtype)[None] / (ratios[:, None, level, 1] * h)
    ref_x = jnp.asarray(xs.reshape(-1), ratios.dtype)[None] / (ratios[:, None, level, 0] * w)
    per_level.append(jnp.stack([ref_x, ref_y], axis=-1))
  return jnp.concatenate(per_level, axis=1)[:, :, None] * ratios[:, None]


@struct.dataclass
class DeformableDetrEncoderOutput:
  """What `DeformableDetrEncoder` returns: the memory and what a decoder needs to read it.

  Attributes:
    last_hidden_state: `[N, S, d_model]`, `S = sum(H_l * W_l)` (transformers'
      `encoder_last_hidden_state`), levels flattened row-major, in level order.
    mask_flatten: bool `[N, S]`, True where the pixel is real (transformers'
      `mask_flatten`; `MSDeformAttn`'s `padding_mask` is its negation).
    valid_ratios: `[N, L, 2]` (width, height) valid fraction of each level.
    spatial_shapes: static `(H_l, W_l)` per level.
    level_start_index: static offset of each level in `S`.
  """

  last_hidden_state: jax.Array
  mask_flatten: jax.Array
  valid_ratios: jax.Array
  spatial_shapes: tuple[tuple[int, int], ...] = struct.field(pytree_node=False)
  level_start_index: tuple[int, ...] = struct.field(pytree_node=False)


def _feed_forward_layers(d_model: int, ffn_features: int, *, dropout: float, activation_dropout: float,
                         deterministic: bool, precision: jax.lax.PrecisionLike, norm: dict[str, Any],
                         **kw: Any) -> tuple[nnx.Linear, nnx.Linear, nnx.LayerNorm, nnx.Dropout, nnx.Dropout]:
  """The feed-forward tail an encoder and a decoder layer both have, in transformers' order and under its names:
  `(fc1, fc2, final_layer_norm, dropout, activation_dropout)`; `dropout` also serves the layer's other residuals."""
  linear: dict[str, Any] = dict(kernel_init=_normal_init, bias_init=_zeros, precision=precision, **kw)
  return (nnx.Linear(d_model, ffn_features, **linear), nnx.Linear(ffn_features, d_model, **linear),
          nnx.LayerNorm(d_model, **norm), nnx.Dropout(dropout, deterministic=deterministic, rngs=kw['rngs']),
          nnx.Dropout(activation_dropout, deterministic=deterministic, rngs=kw['rngs']))


def _feed_forward(layer: Any, h: jax.Array, deterministic: bool | None) -> jax.Array:
  """`LN(h + drop(fc2(drop_act(activation(fc1(h))))))`, the tail `_feed_forward_layers` built."""
  ffn = layer.activation_dropout(layer.activation(layer.fc1(h)), deterministic=deterministic)
  return layer.final_layer_norm(h + layer.dropout(layer.fc2(ffn), deterministic=deterministic))


class DeformableDetrEncoderLayer(nnx.Module):
  """One Deformable DETR encoder layer (transformers' `DeformableDetrEncoderLayer`), post-norm.

  `h = LN(h + drop(attn(h + pos, ref, h)))`, then
  `h = LN(h + drop(fc2(drop_act(activation(fc1(h))))))`.

  Args:
    d_model: the width.
    num_heads, num_levels, num_points: the attention's (`MSDeformAttn`).
    ffn_features: `fc1`'s width (transformers' `encoder_ffn_dim`).
    dropout: rate after the attention and after `fc2` (`config.dropout`).
    activation_dropout: rate after the activation (`config.activation_dropout`).
    activation: the FFN's nonlinearity (`config.activation_function`, ReLU by default).
    layer_norm_epsilon: both LayerNorms' (PyTorch's 1e-5).
    deterministic: dropout off unless a call says otherwise (`nnx.Module.eval()` sets it too). It changes
      what the layer computes (dropout or not), never how the attention samples.
    deterministic_gradients: the attention's bit-identical gradients run to run on GPU/TPU
      (`MSDeformAttn(deterministic_gradients=...)`, a sorted segment sum in place of scatter-adds); the same forward.
      Named apart from `deterministic` because that one is dropout's: ``nnx.Module.train()`` / ``.eval()``
      switch dropout and leave this alone.
    chunk_size, memory_budget: the attention's execution policy (`MSDeformAttn`'s: queries per pass, or
      a byte budget for one pass); they change how it runs, not what it computes.
    dtype, param_dtype, precision: as `nnx.Linear`.
    rngs: random number generators; `rngs.dropout` (or the default stream) drives dropout.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.models import DeformableDetrEncoderLayer
    >>> layer = DeformableDetrEncoderLayer(32, 4, 2, 2, 64, deterministic=True, rngs=nnx.Rngs(0))
    >>> h, ref = jnp.ones((1, 20, 32), jnp.float32), jnp.full((1, 20, 2, 2), 0.5, jnp.float32)
    >>> nnx.eval_shape(lambda m, h, ref: m(h, h, ref, [(4, 4), (2, 2)]), layer, h, ref).shape  # shapes only
    (1, 20, 32)
  """

  def __init__(self, d_model: int, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
               ffn_features: int = 1024, *, dropout: float = 0.1, activation_dropout: float = 0.0,
               activation: Callable[[jax.Array], jax.Array] = jax.nn.relu, layer_norm_epsilon: float = 1e-5,
               deterministic: bool = False, deterministic_gradients: bool = False, chunk_size: int | None = None,
               memory_budget: int | None = None, dtype: DTypeLike | None = None,
               param_dtype: DTypeLike = jnp.float32, precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    name = type(self).__name__
    _args.positive_int(ffn_features, 'ffn_features', name)
    policy = _attention_policy(chunk_size, memory_budget, deterministic_gradients, name)
    kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = MSDeformAttn(d_model, num_heads, num_levels, num_points, precision=precision, **policy, **kw)
    norm: dict[str, Any] = dict(epsilon=layer_norm_epsilon, use_fast_variance=False, **kw)
    self.self_attn_layer_norm = nnx.LayerNorm(d_model, **norm)
    self.fc1, self.fc2, self.final_layer_norm, self.dropout, self.activation_dropout = _feed_forward_layers(
        d_model, ffn_features, dropout=dropout, activation_dropout=activation_dropout, deterministic=deterministic,
        precision=precision, norm=norm, **kw)
    self.activation = activation

  def __call__(self, hidden_states: jax.Array, position_embeddings: jax.Array, reference_points: jax.Array,
               spatial_shapes: Sequence[tuple[int, int]], padding_mask: jax.Array | None = None, *,
               deterministic: bool | None = None) -> jax.Array:
    """Updates `hidden_states [N, S, d_model]`.

    Args:
      hidden_states: `[N, S, d_model]`, the flattened levels (queries and values at once).
      position_embeddings: `[N, S, d_model]`, added to the queries only.
      reference_points: `[N, S, num_levels, 2]` (`reference_points`).
      spatial_shapes: static `(H_l, W_l)` of the levels.
      padding_mask: optional bool `[N, S]`, True where padding (values read there are zero).
      deterministic: overrides the layer's `deterministic` for this call.

    Returns:
      `[N, S, d_model]`.
    """
    if position_embeddings.shape != hidden_states.shape:
      raise ValueError(f'{type(self).__name__}: position_embeddings must have the shape of hidden_states '
                       f'{tuple(hidden_states.shape)}, got {tuple(position_embeddings.shape)}')
    attn = self.self_attn(hidden_states + position_embeddings, reference_points, hidden_states, spatial_shapes,
                          padding_mask)
    h = self.self_attn_layer_norm(hidden_states + self.dropout(attn, deterministic=deterministic))
    return _feed_forward(self, h, deterministic)


def _attention_policy(chunk_size: int | None, memory_budget: int | None, deterministic_gradients: bool,
                      name: str) -> dict:
  """The attention's execution-policy keywords (`MSDeformAttn`'s names), refused under the encoder's names."""
  _args.check_bool(deterministic_gradients, 'deterministic_gradients', name)
  _common.check_policy(chunk_size, memory_budget, False, name)
  return dict(chunk_size=chunk_size, memory_budget=memory_budget, deterministic_gradients=bool(deterministic_gradients))


def _extra_level_shape(h: int, w: int) -> tuple[int, int]:
  """Output size of the 3x3, stride-2, padding-1 conv of an extra level."""
  return (h - 1) // 2 + 1, (w - 1) // 2 + 1


class DeformableDetrEncoder(nnx.Module):
  """Deformable DETR's encoder from backbone feature maps (transformers' `DeformableDetrModel` up to
  `encoder_last_hidden_state`): input projection, masks, position and level embeddings, reference points
  and `num_layers` `DeformableDetrEncoderLayer`s.

  Parameter names follow transformers': `input_convs[l]` / `input_norms[l]` are
  `input_proj.{l}.0` / `input_proj.{l}.1`, `level_embed`, `layers[j]` is
  `encoder.layers.{j}` (see `deformjax.convert.from_deformable_detr_encoder`).
  Initialisation is transformers' `_init_weights`: convs and FFN linears
  normal(0.02) with zero biases, norms ones / zeros, `level_embed` normal(1),
  the attention as `MSDeformAttn`.

  Args:
    in_features: channels of the backbone maps, highest resolution first
      (transformers' `backbone.intermediate_channel_sizes`); at most `num_levels`.
    d_model: the width (divisible by `num_groups` and by 4).
    num_heads, num_levels, num_points: transformers' `encoder_attention_heads`,
      `num_feature_levels`, `encoder_n_points`.
    num_layers: `encoder_layers`.
    ffn_features: `encoder_ffn_dim`.
    num_groups: the input projection's GroupNorm groups (32 in transformers).
    dropout, activation_dropout, activation, layer_norm_epsilon: as `DeformableDetrEncoderLayer`;
      `dropout` also applies to the flattened inputs, as transformers' encoder does.
    group_norm_epsilon: the input projection's GroupNorm epsilon (PyTorch's 1e-5).
    temperature: the sine position embedding's.
    deterministic: dropout off unless a call says otherwise (`nnx.Module.eval()` sets it too).
    deterministic_gradients, chunk_size, memory_budget: the execution policy of every layer's attention, as
      `DeformableDetrEncoderLayer` (`deterministic_gradients` is `MSDeformAttn`'s:
      bit-identical gradients on GPU/TPU, untouched by ``.train()`` / ``.eval()``).
    dtype, param_dtype, precision: as `nnx.Conv`.
    rngs: random number generators.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.models import DeformableDetrEncoder
    >>> enc = nnx.eval_shape(lambda: DeformableDetrEncoder(  # shapes only: nothing is computed
    ...     [8, 16], 32, num_heads=2, num_levels=3, num_points=2, num_layers=1, ffn_features=64, rngs=nnx.Rngs(0)))
    >>> feats = [jnp.ones((2, 8, 8, 8), jnp.float32), jnp.ones((2, 4, 4, 16), jnp.float32)]
    >>> out = nnx.eval_shape(lambda m, f, p: m(f, p, deterministic=True), enc, feats, jnp.ones((2, 32, 32), bool))
    >>> out.last_hidden_state.shape, out.spatial_shapes, out.level_start_index
    ((2, 84, 32), ((8, 8), (4, 4), (2, 2)), (0, 64, 80))
  """

  def __init__(self, in_features: Sequence[int], d_model: int = 256, *, num_heads: int = 8, num_levels: int = 4,
               num_points: int = 4, num_layers: int = 6, ffn_features: int = 1024, num_groups: int = 32,
               dropout: float = 0.1, activation_dropout: float = 0.0,
               activation: Callable[[jax.Array], jax.Array] = jax.nn.relu, layer_norm_epsilon: float = 1e-5,
               group_norm_epsilon: float = 1e-5, temperature: float = 10000.0, deterministic: bool = False,
               deterministic_gradients: bool = False, chunk_size: int | None = None,
               memory_budget: int | None = None, dtype: DTypeLike | None = None,
               param_dtype: DTypeLike = jnp.float32, precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    name = type(self).__name__
    in_features = tuple(_args.positive_int(c, 'in_features', name) for c in in_features)
    _attention_policy(chunk_size, memory_budget, deterministic_gradients, name)  # refused under this name
    for arg, value in (('d_model', d_model), ('num_levels', num_levels), ('num_layers', num_layers),
                       ('num_groups', num_groups)):
      _args.positive_int(value, arg, name)
    if not 1 <= len(in_features) <= num_levels:
      raise ValueError(f'{name}: in_features must list 1 to num_levels={num_levels} backbone widths, got '
                       f'{len(in_features)}')
    if d_model % num_groups or d_model % 4:
      raise ValueError(f'{name}: d_model={d_model} must be divisible by num_groups={num_groups} and by 4 '
                       '(sin / cos pairs of two coordinates)')
    self.in_features, self.d_model, self.num_levels = in_features, d_model, num_levels
    self.temperature = temperature
    kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    conv: dict[str, Any] = dict(kernel_init=_normal_init, bias_init=_zeros, precision=precision, **kw)
    convs = [nnx.Conv(c, d_model, (1, 1), **conv) for c in in_features]
    # Extra levels: the first from the last backbone map, the next ones from the previous extra level.
    widths = [in_features[-1]] + [d_model] * (num_levels - len(in_features) - 1)
    convs += [nnx.Conv(c, d_model, (3, 3), strides=2, padding=((1, 1), (1, 1)), **conv)
              for c in widths[:num_levels - len(in_features)]]
    self.input_convs = nnx.List(convs)
    self.input_norms = nnx.List([nnx.GroupNorm(d_model, num_groups, epsilon=group_norm_epsilon,
                                               use_fast_variance=False, **kw) for _ in range(num_levels)])
    self.level_embed = nnx.Param(initializers.normal(1.0)(rngs.params(), (num_levels, d_model), param_dtype))
    self.dropout = nnx.Dropout(dropout, deterministic=deterministic, rngs=rngs)
    self.layers = nnx.List([
        DeformableDetrEncoderLayer(d_model, num_heads, num_levels, num_points, ffn_features, dropout=dropout,
                                   activation_dropout=activation_dropout, activation=activation,
                                   layer_norm_epsilon=layer_norm_epsilon, deterministic=deterministic,
                                   deterministic_gradients=deterministic_gradients, chunk_size=chunk_size,
                                   memory_budget=memory_budget, precision=precision, **kw)
        for _ in range(num_layers)])

  def spatial_shapes(self, feature_shapes: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The `(H_l, W_l)` of all `num_levels` levels given those of the backbone maps."""
    shapes = [(h, w) for h, w in feature_shapes]
    while len(shapes) < self.num_levels:
      shapes.append(_extra_level_shape(*shapes[-1]))
    return tuple(shapes)

  def _check_features(self, features: Sequence[jax.Array], pixel_mask: jax.Array | None) -> int:
    name = type(self).__name__
    if isinstance(features, jax.Array) or not isinstance(features, Sequence):
      raise TypeError(f'{name}: features must be a sequence of {len(self.in_features)} NHWC maps, got '
                      f'{type(features).__name__}')
    if len(features) != len(self.in_features):
      raise ValueError(f'{name}: features must have {len(self.in_features)} maps (in_features={self.in_features}), '
                       f'got {len(features)}')
    n = features[0].shape[0] if features[0].ndim == 4 else None
    for level, (x, c) in enumerate(zip(features, self.in_features)):
      if x.ndim != 4 or x.shape[0] != n or x.shape[3] != c:
        raise ValueError(f'{name}: features[{level}] must have shape [N={n}, H, W, {c}], got {tuple(x.shape)}')
    if pixel_mask is not None and (pixel_mask.ndim != 3 or pixel_mask.shape[0] != n):
      raise ValueError(f'{name}: pixel_mask must have shape [N={n}, H, W] (the image\'s), got '
                       f'{tuple(pixel_mask.shape)}')
    assert n is not None  # features[0] passed the rank check above
    return n

  def __call__(self, features: Sequence[jax.Array], pixel_mask: jax.Array | None = None, *,
               deterministic: bool | None = None) -> DeformableDetrEncoderOutput:
    """Encodes backbone maps into the flattened multi-level memory.

    Args:
      features: `num_backbone` NHWC maps `[N, H_l, W_l, in_features[l]]`, highest resolution first.
      pixel_mask: optional `[N, H, W]` at the image's resolution, nonzero (True) where the
        pixel is real; without it every pixel is.
      deterministic: overrides the modules' `deterministic` for this call.

    Returns:
      A `DeformableDetrEncoderOutput` (`last_hidden_state [N, S, d_model]`, `mask_flatten`,
      `valid_ratios`, static `spatial_shapes` and `level_start_index`).
    """
    n = self._check_features(features, pixel_mask)
    sources = [norm(conv(x)) for conv, norm, x in zip(self.input_convs, self.input_norms, features)]
    for level in range(len(features), self.num_levels):
      src = features[-1] if level == len(features) else sources[-1]
      sources.append(self.input_norms[level](self.input_convs[level](src)))
    shapes = tuple((s.shape[1], s.shape[2]) for s in sources)
    if pixel_mask is None:
      masks = [jnp.ones((n, h, w), bool) for h, w in shapes]
    else:
      masks = [downsample_mask(pixel_mask, s) for s in shapes]
    # transformers embeds positions in the image's dtype, then casts to the projected maps'.
    pos_dtype = np.promote_types(features[0].dtype, np.float32)
    dtype = sources[0].dtype
    level_embed = self.level_embed[...].astype(dtype)
    pos = [sine_position_embedding(m, self.d_model // 2, temperature=self.temperature, dtype=pos_dtype).astype(dtype)
           + level_embed[level].reshape(1, 1, 1, -1) for level, m in enumerate(masks)]
    flat = jnp.concatenate([s.reshape(n, -1, self.d_model) for s in sources], axis=1)
    pos_flat = jnp.concatenate([p.reshape(n, -1, self.d_model) for p in pos], axis=1)
    mask_flat = jnp.concatenate([m.reshape(n, -1) for m in masks], axis=1)
    ratios = jnp.stack([valid_ratios(m, np.promote_types(dtype, np.float32)) for m in masks], axis=1)
    hidden = self.encode(flat, pos_flat, shapes, ratios, None if pixel_mask is None else mask_flat,
                         deterministic=deterministic)
    starts = tuple(int(v) for v in np.cumsum([0] + [h * w for h, w in shapes[:-1]]))
    return DeformableDetrEncoderOutput(hidden, mask_flat, ratios, shapes, starts)

  def encode(self, inputs_embeds: jax.Array, position_embeddings: jax.Array,
             spatial_shapes: Sequence[tuple[int, int]], valid_ratios: jax.Array,
             mask_flatten: jax.Array | None = None, *, deterministic: bool | None = None) -> jax.Array:
    """The layer stack alone, on flattened inputs (transformers' `DeformableDetrEncoder.forward`).

    Args:
      inputs_embeds: `[N, S, d_model]`, the projected levels flattened.
      position_embeddings: `[N, S, d_model]`, position plus level embeddings.
      spatial_shapes: static `(H_l, W_l)` of the `num_levels` levels.
      valid_ratios: `[N, num_levels, 2]` (width, height).
      mask_flatten: optional bool `[N, S]`, True where real.
      deterministic: overrides the modules' `deterministic` for this call.

    Returns:
      `[N, S, d_model]`.
    """
    ref = reference_points(spatial_shapes, valid_ratios)
    padding = None if mask_flatten is None else ~mask_flatten.astype(bool)
    hidden = self.dropout(inputs_embeds, deterministic=deterministic)
    for layer in self.layers:
      hidden = layer(hidden, position_embeddings, ref, spatial_shapes, padding, deterministic=deterministic)
    return hidden




def inverse_sigmoid(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """transformers' `inverse_sigmoid`: `log(max(x, eps) / max(1 - x, eps))` of `x` clipped to [0, 1].

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.models.deformable_detr import inverse_sigmoid
    >>> round(float(inverse_sigmoid(jnp.asarray(0.5))), 6), round(float(inverse_sigmoid(jnp.asarray(1.0))), 3)
    (0.0, 11.513)
  """
  x = jnp.clip(x, 0, 1)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1 - x, eps))


class DeformableDetrSelfAttention(nnx.Module):
  """Multi-head self-attention over the queries (transformers' `DeformableDetrSelfAttention`).

  Queries and keys are projected from `hidden + position_embeddings`, values from `hidden`;
  `softmax(q k^T * head_dim ** -0.5)`, dropout on the weights (`attention_dropout`), `o_proj`.

  Args:
    d_model: the width (divisible by `num_heads`).
    num_heads: heads.
    dropout: the attention weights' dropout rate.
    deterministic: dropout off unless a call says otherwise.
    dtype, param_dtype, precision: as `nnx.Linear`.
    rngs: random number generators.
  """

  def __init__(self, d_model: int, num_heads: int = 8, *, dropout: float = 0.0, deterministic: bool = False,
               dtype: DTypeLike | None = None, param_dtype: DTypeLike = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    name = type(self).__name__
    _args.positive_int(num_heads, 'num_heads', name)
    if d_model % num_heads:
      raise ValueError(f'{name}: d_model={d_model} must be divisible by num_heads={num_heads}')
    self.num_heads, self.precision = num_heads, precision
    linear: dict[str, Any] = dict(kernel_init=_normal_init, bias_init=_zeros, precision=precision, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nnx.Linear(d_model, d_model, **linear) for _ in range(4))
    self.dropout = nnx.Dropout(dropout, deterministic=deterministic, rngs=rngs)

  def __call__(self, hidden_states: jax.Array, position_embeddings: jax.Array | None = None, *,
               deterministic: bool | None = None) -> jax.Array:
    """`hidden_states [N, Q, d_model]` (and the same-shaped position embeddings) -> `[N, Q, d_model]`."""
    n, q, d = hidden_states.shape
    qk = hidden_states if position_embeddings is None else hidden_states + position_embeddings
    split = (n, q, self.num_heads, d // self.num_heads)
    query = self.q_proj(qk).reshape(split)
    key = self.k_proj(qk).reshape(split)
    value = self.v_proj(hidden_states).reshape(split)
    scores = jnp.einsum('nqhd,nkhd->nhqk', query, key, precision=self.precision) * (d // self.num_heads) ** -0.5
    weights = self.dropout(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
    out = jnp.einsum('nhqk,nkhd->nqhd', weights, value, precision=self.precision).reshape(n, q, d)
    return self.o_proj(out)


class DeformableDetrDecoderLayer(nnx.Module):
  """One Deformable DETR decoder layer (transformers' `DeformableDetrDecoderLayer`), post-norm.

  `h = LN(h + drop(self_attn(h, pos)))`; `h = LN(h + drop(encoder_attn(h + pos, ref, memory)))`;
  `h = LN(h + drop(fc2(drop_act(activation(fc1(h))))))`.

  Args:
    d_model: the width.
    num_heads, num_levels, num_points: the attentions' (`decoder_attention_heads`, `num_feature_levels`,
      `decoder_n_points`).
    ffn_features: `decoder_ffn_dim`.
    dropout, attention_dropout, activation_dropout: the config's rates.
    activation, layer_norm_epsilon: as `DeformableDetrEncoderLayer`.
    deterministic: dropout off unless a call says otherwise.
    deterministic_gradients, chunk_size, memory_budget: the cross-attention's execution policy (`MSDeformAttn`).
    dtype, param_dtype, precision: as `nnx.Linear`.
    rngs: random number generators.
  """

  def __init__(self, d_model: int, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
               ffn_features: int = 1024, *, dropout: float = 0.1, attention_dropout: float = 0.0,
               activation_dropout: float = 0.0, activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
               layer_norm_epsilon: float = 1e-5, deterministic: bool = False, deterministic_gradients: bool = False,
               chunk_size: int | None = None, memory_budget: int | None = None, dtype: DTypeLike | None = None,
               param_dtype: DTypeLike = jnp.float32, precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    name = type(self).__name__
    _args.positive_int(ffn_features, 'ffn_features', name)
    policy = _attention_policy(chunk_size, memory_budget, deterministic_gradients, name)
    kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = DeformableDetrSelfAttention(d_model, num_heads, dropout=attention_dropout,
                                                 deterministic=deterministic, precision=precision, **kw)
    norm: dict[str, Any] = dict(epsilon=layer_norm_epsilon, use_fast_variance=False, **kw)
    self.self_attn_layer_norm = nnx.LayerNorm(d_model, **norm)
    self.encoder_attn = MSDeformAttn(d_model, num_heads, num_levels, num_points, precision=precision, **policy, **kw)
    self.encoder_attn_layer_norm = nnx.LayerNorm(d_model, **norm)
    self.fc1, self.fc2, self.final_layer_norm, self.dropout, self.activation_dropout = _feed_forward_layers(
        d_model, ffn_features, dropout=dropout, activation_dropout=activation_dropout, deterministic=deterministic,
        precision=precision, norm=norm, **kw)
    self.activation = activation

  def __call__(self, hidden_states: jax.Array, position_embeddings: jax.Array, reference_points: jax.Array,
               encoder_hidden_states: jax.Array, spatial_shapes: Sequence[tuple[int, int]],
               padding_mask: jax.Array | None = None, *, deterministic: bool | None = None) -> jax.Array:
    """Updates the queries `hidden_states [N, Q, d_model]`.

    Args:
      hidden_states: `[N, Q, d_model]`.
      position_embeddings: `[N, Q, d_model]`, added to the queries (and the self-attention's keys).
      reference_points: `[N, Q, num_levels, 2]` points or `[N, Q, num_levels, 4]` boxes, scaled by the
        levels' valid ratios.
      encoder_hidden_states: `[N, S, d_model]`, the encoder's memory.
      spatial_shapes: static `(H_l, W_l)` of the levels.
      padding_mask: optional bool `[N, S]`, True where the memory is padding.
      deterministic: overrides the layer's `deterministic` for this call.

    Returns:
      `[N, Q, d_model]`.
    """
    drop = functools.partial(self.dropout, deterministic=deterministic)
    h = self.self_attn(hidden_states, position_embeddings, deterministic=deterministic)
    h = self.self_attn_layer_norm(hidden_states + drop(h))
    attn = self.encoder_attn(h + position_embeddings, reference_points, encoder_hidden_states, spatial_shapes,
                             padding_mask)
    h = self.encoder_attn_layer_norm(h + drop(attn))
    return _feed_forward(self, h, deterministic)


class DeformableDetrMLPHead(nnx.Module):
  """The box head (transformers' `DeformableDetrMLPPredictionHead`): `num_layers` linears, ReLU between.

  Args:
    in_features, hidden_features, out_features: the widths.
    num_layers: linears (3 in Deformable DETR).
    dtype, param_dtype, precision: as `nnx.Linear`.
    rngs: random number generators.
  """

  def __init__(self, in_features: int, hidden_features: int, out_features: int, num_layers: int = 3, *,
               dtype: DTypeLike | None = None, param_dtype: DTypeLike = jnp.float32,
               precision: PrecisionLike = None, rngs: nnx.Rngs):
    widths = [in_features] + [hidden_features] * (num_layers - 1) + [out_features]
    self.layers = nnx.List([
        nnx.Linear(a, b, kernel_init=_normal_init, bias_init=_zeros, precision=precision, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [..., in_features]` -> `[..., out_features]`."""
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class DeformableDetrDecoder(nnx.Module):
  """The decoder's layer stack with reference points and optional box refinement (transformers'
  `DeformableDetrDecoder`).

  Args:
    num_layers: `decoder_layers`.
    layer_kwargs: `DeformableDetrDecoderLayer`'s arguments (`d_model`, `num_heads`, ..., `rngs`).
  """

  def __init__(self, num_layers: int, **layer_kwargs: Any):
    _args.positive_int(num_layers, 'num_layers', type(self).__name__)
    self.layers = nnx.List([DeformableDetrDecoderLayer(**layer_kwargs) for _ in range(num_layers)])

  def __call__(self, inputs_embeds: jax.Array, position_embeddings: jax.Array, reference_points: jax.Array,
               encoder_hidden_states: jax.Array, spatial_shapes: Sequence[tuple[int, int]], valid_ratios: jax.Array,
               padding_mask: jax.Array | None = None, *, bbox_embed: Sequence[DeformableDetrMLPHead] | None = None,
               deterministic: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decodes the queries.

    Args:
      inputs_embeds: `[N, Q, d_model]`, the queries' content.
      position_embeddings: `[N, Q, d_model]`, the queries' positions.
      reference_points: `[N, Q, 2]` points or `[N, Q, 4]` boxes in [0, 1].
      encoder_hidden_states: `[N, S, d_model]`.
      spatial_shapes: static `(H_l, W_l)` of the levels.
      valid_ratios: `[N, L, 2]` (width, height).
      padding_mask: optional bool `[N, S]`, True where padding.
      bbox_embed: with box refinement, one box head per layer: layer `j`'s output refines the reference
        boxes (`sigmoid(head(h) + inverse_sigmoid(ref))`, gradient stopped) that layer `j + 1` reads.
      deterministic: overrides the layers' `deterministic` for this call.

    Returns:
      `(last_hidden_state [N, Q, d_model], intermediate_hidden_states [N, num_layers, Q, d_model],
      intermediate_reference_points [N, num_layers, Q, 2 or 4])`.
    """
    if reference_points.shape[-1] not in (2, 4):
      raise ValueError(f'{type(self).__name__}: reference_points must have shape [N, Q, 2] or [N, Q, 4], got '
                       f'{tuple(reference_points.shape)}')
    hidden, ref = inputs_embeds, reference_points
    intermediate, intermediate_ref = [], []
    for j, layer in enumerate(self.layers):
      ratios = valid_ratios if ref.shape[-1] == 2 else jnp.concatenate([valid_ratios, valid_ratios], -1)
      hidden = layer(hidden, position_embeddings, ref[:, :, None] * ratios[:, None], encoder_hidden_states,
                     spatial_shapes, padding_mask, deterministic=deterministic)
      if bbox_embed is not None:
        delta = bbox_embed[j](hidden)
        if ref.shape[-1] == 4:
          ref = jax.nn.sigmoid(delta + inverse_sigmoid(ref))
        else:
          ref = jax.nn.sigmoid(delta.at[..., :2].add(inverse_sigmoid(ref)))
        ref = jax.lax.stop_gradient(ref)
      intermediate.append(hidden)
      intermediate_ref.append(ref)
    return hidden, jnp.stack(intermediate, axis=1), jnp.stack(intermediate_ref, axis=1)


def proposal_position_embedding(proposals: jax.Array, num_features: int, *, temperature: float = 10000.0,
                                scale: float = 2 * math.pi) -> jax.Array:
  """The sine embedding of two-stage proposals (transformers' `get_proposal_pos_embed`).

  Each of the 4 box coordinates `sigmoid(proposals) * scale` gives `num_features` channels, `sin` / `cos`
  interleaved by frequency (`temperature ** (2 * (k // 2) / num_features)`). transformers computes it in
  float32 whatever the input; this computes it in the input's dtype, at least float32.

  Args:
    proposals: `[N, Q, 4]` box logits.
    num_features: channels per coordinate (`d_model // 2`).
    temperature, scale: the embedding's.

  Returns:
    `[N, Q, 4 * num_features]` in the dtype of `proposals`.

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.models.deformable_detr import proposal_position_embedding
    >>> proposal_position_embedding(jnp.zeros((2, 3, 4)), 8).shape
    (2, 3, 32)
  """
  dtype = np.promote_types(proposals.dtype, np.float32)
  dim_t = jnp.asarray(temperature ** (2 * (np.arange(num_features) // 2) / num_features), dtype)
  pos = (jax.nn.sigmoid(proposals).astype(dtype) * scale)[..., None] / dim_t.reshape((1,) * proposals.ndim + (-1,))
  pos = jnp.stack([jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])], axis=-1)
  return pos.reshape(*proposals.shape[:-1], 4 * num_features).astype(proposals.dtype)


def encoder_proposals(mask_flatten: jax.Array, spatial_shapes: Sequence[tuple[int, int]],
                      dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """Two-stage proposals, one box per encoder pixel (transformers' `gen_encoder_output_proposals`, boxes part).

  Pixel `(i, j)` of level `l` proposes the box `((j + 0.5) / valid_W, (i + 0.5) / valid_H, 0.05 * 2**l,
  0.05 * 2**l)`; it is valid where all four coordinates lie in (0.01, 0.99) and the pixel is real.

  Args:
    mask_flatten: bool `[N, S]`, True where the pixel is real.
    spatial_shapes: static `(H_l, W_l)` of the levels.
    dtype: the boxes' dtype.

  Returns:
    `(proposals [N, S, 4], valid [N, S, 1])`: the boxes' logits (inverse sigmoid), `inf` where not valid, and
    the validity (bool).
  """
  n = mask_flatten.shape[0]
  level_boxes, start = [], 0
  for level, (h, w) in enumerate(spatial_shapes):
    mask = mask_flatten[:, start:start + h * w].reshape(n, h, w)
    valid_h = jnp.sum(mask[:, :, 0], axis=1).astype(dtype)
    valid_w = jnp.sum(mask[:, 0, :], axis=1).astype(dtype)
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    grid = jnp.asarray(np.stack([xs, ys], axis=-1), dtype)[None] + 0.5
    grid = grid / jnp.stack([valid_w, valid_h], axis=-1).reshape(n, 1, 1, 2)
    size = jnp.full(grid.shape, 0.05 * 2.0**level, dtype)
    level_boxes.append(jnp.concatenate([grid, size], axis=-1).reshape(n, h * w, 4))
    start += h * w
  boxes = jnp.concatenate(level_boxes, axis=1)
  valid = jnp.all((boxes > 0.01) & (boxes < 0.99), axis=-1, keepdims=True) & mask_flatten[..., None]
  logits = jnp.log(boxes / (1 - boxes))
  return jnp.where(valid, logits, jnp.inf), valid


@struct.dataclass
class DeformableDetrOutput:
  """What `DeformableDetr` returns, under transformers' names (`DeformableDetrObjectDetectionOutput`).

  Attributes:
    logits: `[N, Q, num_labels]`, the last decoder layer's class logits (sigmoid scores, no background class).
    pred_boxes: `[N, Q, 4]`, its boxes (cx, cy, w, h) in [0, 1] of the unpadded image.
    auxiliary_outputs: one `{'logits': [N, Q, num_labels], 'pred_boxes': [N, Q, 4]}` per earlier decoder
      layer, first layer first (transformers returns them with a loss when `auxiliary_loss` is set; here always).
    last_hidden_state: `[N, Q, d_model]`, the decoder's output.
    init_reference_points: `[N, Q, 2]` (`[N, Q, 4]` with `two_stage`), the first layer's reference points.
    intermediate_hidden_states: `[N, decoder_layers, Q, d_model]`, every layer's output.
    intermediate_reference_points: `[N, decoder_layers, Q, 2 or 4]`, the reference points after each layer.
    encoder_last_hidden_state: `[N, S, d_model]`, the encoder's memory.
    enc_outputs_class: with `two_stage`, `[N, S, num_labels]`: every encoder pixel's proposal logits; else None.
    enc_outputs_coord_logits: with `two_stage`, `[N, S, 4]`: their box logits (`inf` at invalid proposals).
  """

  logits: jax.Array
  pred_boxes: jax.Array
  auxiliary_outputs: tuple[dict[str, jax.Array], ...]
  last_hidden_state: jax.Array
  init_reference_points: jax.Array
  intermediate_hidden_states: jax.Array
  intermediate_reference_points: jax.Array
  encoder_last_hidden_state: jax.Array
  enc_outputs_class: jax.Array | None = None
  enc_outputs_coord_logits: jax.Array | None = None


_ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = MappingProxyType({
    'relu': jax.nn.relu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
})

# transformers' `DeformableDetrConfig` defaults for the fields the detector reads.
DEFORMABLE_DETR_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    'd_model': 256, 'encoder_layers': 6, 'decoder_layers': 6, 'encoder_attention_heads': 8,
    'decoder_attention_heads': 8, 'encoder_ffn_dim': 1024, 'decoder_ffn_dim': 1024, 'encoder_n_points': 4,
    'decoder_n_points': 4, 'num_feature_levels': 4, 'num_queries': 300, 'two_stage': False,
    'two_stage_num_proposals': 300, 'with_box_refine': False, 'activation_function': 'relu', 'dropout': 0.1,
    'attention_dropout': 0.0, 'activation_dropout': 0.0, 'position_embedding_type': 'sine', 'dilation': False,
    'num_channels': 3, 'backbone_config': None, 'use_timm_backbone': True, 'backbone': 'resnet50',
    'tie_word_embeddings': True,
})


class BackboneSpec(NamedTuple):
  """The ResNet a Deformable DETR config describes (`backbone_spec`).

  Attributes:
    layout: `'timm'` (timm's ResNet, `use_timm_backbone`) or `'transformers'` (`ResNetBackbone`).
    block: `'basic'` or `'bottleneck'`.
    depths, widths: blocks and output width per stage.
    stem_features: the stem's width.
    out_indices: the stages returned (1..4).
    stride_in_1x1: transformers' `downsample_in_bottleneck`.
    downsample_in_first_stage: transformers' option of the same name.
  """

  layout: str
  block: str
  depths: tuple[int, ...]
  widths: tuple[int, ...]
  stem_features: int
  out_indices: tuple[int, ...]
  stride_in_1x1: bool = False
  downsample_in_first_stage: bool = False


_FN = 'DeformableDetr'


def _timm_spec(name: Any, out_indices: Any, output_stride: Any) -> BackboneSpec:
  from deformjax.models.resnet import RESNET_PRESETS
  if name not in RESNET_PRESETS:
    raise ValueError(f"{_FN}: config['backbone'] must be one of timm's {sorted(RESNET_PRESETS)}, got {name!r}")
  if output_stride not in (None, 32):
    raise ValueError(f'{_FN}: a dilated backbone (dilation=True, output_stride={output_stride}) is not supported')
  block, depths, widths = RESNET_PRESETS[name]
  return BackboneSpec('timm', block, depths, widths, 64, tuple(int(i) for i in out_indices))


def _transformers_spec(bc: Mapping[str, Any]) -> BackboneSpec:
  if bc.get('hidden_act', 'relu') != 'relu':
    raise ValueError(f"{_FN}: backbone_config['hidden_act'] must be 'relu', got {bc['hidden_act']!r}")
  stages = ['stem', 'stage1', 'stage2', 'stage3', 'stage4']
  if bc.get('out_features'):
    unknown = [f for f in bc['out_features'] if f not in stages[1:]]
    if unknown:
      raise ValueError(f"{_FN}: backbone_config['out_features'] must name stages among {stages[1:]}, got {unknown}")
    out_indices = tuple(stages.index(f) for f in bc['out_features'])
  else:
    out_indices = tuple(bc.get('out_indices') or (4,))
  layer_type = bc.get('layer_type', 'bottleneck')
  if layer_type not in ('basic', 'bottleneck'):
    raise ValueError(f"{_FN}: backbone_config['layer_type'] must be 'basic' or 'bottleneck', got {layer_type!r}")
  return BackboneSpec('transformers', layer_type, tuple(bc.get('depths', (3, 4, 6, 3))),
                      tuple(bc.get('hidden_sizes', (256, 512, 1024, 2048))), int(bc.get('embedding_size', 64)),
                      out_indices, bool(bc.get('downsample_in_bottleneck', False)),
                      bool(bc.get('downsample_in_first_stage', False)))


def backbone_spec(config: Mapping[str, Any]) -> BackboneSpec:
  """The ResNet a `DeformableDetrConfig.to_dict()` describes, in transformers' v5 form (`backbone_config` with
  `model_type` `'timm_backbone'` or `'resnet'`) or the older one (`use_timm_backbone`, `backbone`,
  `backbone_kwargs`, `dilation`).

  Raises:
    ValueError: naming what is not supported (another backbone, a dilated one, another activation).

  Example:
    >>> from deformjax.models.deformable_detr import backbone_spec
    >>> backbone_spec({'backbone': 'resnet18'}).widths
    (64, 128, 256, 512)
  """
  config = {**DEFORMABLE_DETR_DEFAULTS, **config}
  levels = int(config['num_feature_levels'])
  default_indices = (2, 3, 4) if levels > 1 else (4,)
  bc = config['backbone_config']
  if config['dilation']:
    raise ValueError(f"{_FN}: config['dilation']=True (a dilated last stage) is not supported")
  if bc is None:
    if config['use_timm_backbone']:
      kwargs = config.get('backbone_kwargs') or {}
      return _timm_spec(config['backbone'] or 'resnet50', kwargs.get('out_indices', default_indices),
                        kwargs.get('output_stride'))
    return _transformers_spec({'out_features': ['stage4']})
  if not isinstance(bc, Mapping):
    raise TypeError(f"{_FN}: config['backbone_config'] must be a dict (a config's to_dict()), got {type(bc).__name__}")
  model_type = bc.get('model_type')
  if model_type == 'timm_backbone':
    return _timm_spec(bc.get('backbone'), bc.get('out_indices') or default_indices, bc.get('output_stride'))
  if model_type == 'resnet':
    return _transformers_spec(bc)
  raise ValueError(f"{_FN}: backbone_config['model_type'] must be 'timm_backbone' or 'resnet' (a ResNet), got "
                   f'{model_type!r}; pass another pyramid backbone as DeformableDetr(backbone=...)')


def _num_labels(config: Mapping[str, Any]) -> int:
  if config.get('num_labels') is not None:
    return int(config['num_labels'])
  return len(config['id2label']) if config.get('id2label') else 2


def _check_config(config: Mapping[str, Any]) -> None:
  for key in ('d_model', 'encoder_layers', 'decoder_layers', 'encoder_attention_heads', 'decoder_attention_heads',
              'encoder_ffn_dim', 'decoder_ffn_dim', 'encoder_n_points', 'decoder_n_points', 'num_feature_levels',
              'num_queries', 'two_stage_num_proposals', 'num_channels'):
    _args.positive_int(config[key], f'config[{key!r}]', _FN)
  if config['position_embedding_type'] != 'sine':
    raise ValueError(f"{_FN}: config['position_embedding_type'] must be 'sine' (the learned embedding is not "
                     f"supported), got {config['position_embedding_type']!r}")
  if config['activation_function'] not in _ACTIVATIONS:
    raise ValueError(f"{_FN}: config['activation_function'] must be one of {sorted(_ACTIVATIONS)}, got "
                     f"{config['activation_function']!r}")
  if config['two_stage'] and not config['with_box_refine']:
    raise ValueError(f"{_FN}: config['two_stage']=True needs config['with_box_refine']=True (as transformers)")
  if not config['tie_word_embeddings'] and config['with_box_refine']:
    raise ValueError(f"{_FN}: config['tie_word_embeddings']=False with config['with_box_refine']=True is not "
                     "supported: transformers then refines the boxes with copies of the box heads "
                     "(model.decoder.bbox_embed) kept apart from the output heads")


def _heads(d_model: int, num_labels: int, count: int, shared: tuple[bool, bool],
           kw: dict) -> tuple[nnx.List, nnx.List]:
  """`count` class heads and box heads, initialised as the reference detector's: class biases at the 0.01 prior,
  box heads' last layer zero with bias (0, 0, -2, -2). `shared` (class, box): one module repeated `count` times."""
  prior = -math.log((1 - 0.01) / 0.01)
  classes = [nnx.Linear(d_model, num_labels, kernel_init=_normal_init,
                        bias_init=initializers.constant(prior), **kw) for _ in range(1 if shared[0] else count)]
  boxes = [DeformableDetrMLPHead(d_model, d_model, 4, 3, **kw) for _ in range(1 if shared[1] else count)]
  for head in boxes:
    last = head.layers[-1]
    assert last.bias is not None  # nnx.Linear's default use_bias=True
    last.kernel.set_value(jnp.zeros_like(last.kernel[...]))
    last.bias.set_value(jnp.asarray([0.0, 0.0, -2.0, -2.0], last.bias[...].dtype))
  return (nnx.List(classes * count if shared[0] else classes), nnx.List(boxes * count if shared[1] else boxes))


class _Pyramid(Protocol):
  """What the detector reads of its backbone besides calling it (`DeformableDetr`'s `backbone`): its maps' widths."""

  @property
  def channels(self) -> Sequence[int]: ...


class DeformableDetr(nnx.Module):
  """Deformable DETR, as transformers' `DeformableDetrForObjectDetection` computes it (NHWC).

  Built from the dict of a transformers `DeformableDetrConfig` (`config.to_dict()`, of v5 or older; nothing
  here imports transformers); missing fields take transformers' defaults (`DEFORMABLE_DETR_DEFAULTS`). Read: the widths,
  layers, heads and points (`d_model`, `encoder_layers`, `decoder_layers`, `*_attention_heads`, `*_ffn_dim`,
  `*_n_points`), `num_feature_levels`, `num_queries`, `with_box_refine`, `two_stage`, `two_stage_num_proposals`,
  the labels (`num_labels`, else `len(id2label)`), the activation and dropout rates, `tie_word_embeddings` (which
  heads the decoder layers share: see the module docstring) and the backbone (`backbone_spec`). Refused by name:
  a learned position embedding, a dilated backbone, a non-ResNet backbone config, `two_stage` without
  `with_box_refine`, untied heads with `with_box_refine`, two-stage proposals that exceed the encoder's tokens
  (at call).

  Parameters are laid out as transformers' (see the module docstring); initialisation is transformers'
  `_init_weights` (normal(0.02) linears and convs, the attention's directional offsets, normal(1) level
  embeddings, Xavier reference points) with the reference detector's head biases (class prior 0.01, box
  head last layer zero with size bias -2). The backbone's batch norms are frozen (`nnx.BatchStat`).

  Args:
    config: the `DeformableDetrConfig.to_dict()` (or any subset of its fields).
    backbone: optional pyramid module used instead of the config's ResNet: `backbone(pixel_values)` returns
      NHWC maps, highest resolution first, and `backbone.channels` their widths (e.g. `PyramidBackbone` around
      an InternImage). Its maps must not outnumber `num_feature_levels`.
    deterministic: dropout off unless a call says otherwise (``nnx.Module.eval()`` / ``.train()`` set it).
    deterministic_gradients, chunk_size, memory_budget: every deformable attention's execution policy
      (`MSDeformAttn`'s); they change how it runs, not what it computes.
    dtype, param_dtype, precision: as `nnx.Conv`.
    rngs: random number generators (`params`; `dropout` for dropout).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.models import DeformableDetr
    >>> config = dict(backbone='resnet18', d_model=32, encoder_layers=1, decoder_layers=2, num_queries=5,
    ...               encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
    ...               decoder_attention_heads=2, num_labels=3)
    >>> model = nnx.eval_shape(lambda: DeformableDetr(config, deterministic=True, rngs=nnx.Rngs(0)))
    >>> out = nnx.eval_shape(lambda m, x, p: m(x, p), model, jnp.ones((2, 64, 64, 3), jnp.float32),
    ...                      jnp.ones((2, 64, 64), jnp.float32))
    >>> out.logits.shape, out.pred_boxes.shape, len(out.auxiliary_outputs)
    ((2, 5, 3), (2, 5, 4), 1)
  """

  def __init__(self, config: Mapping[str, Any] | None = None, *, backbone: nnx.Module | None = None,
               deterministic: bool = False, deterministic_gradients: bool = False, chunk_size: int | None = None,
               memory_budget: int | None = None, dtype: DTypeLike | None = None, param_dtype: DTypeLike = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    if config is not None and not isinstance(config, Mapping):
      raise TypeError(f'{_FN}: config must be a dict (DeformableDetrConfig.to_dict()), got {type(config).__name__}')
    config = {**DEFORMABLE_DETR_DEFAULTS, **(config or {})}
    _check_config(config)
    c = config
    self.d_model, self.num_labels = int(c['d_model']), _num_labels(c)
    self.two_stage, self.with_box_refine = bool(c['two_stage']), bool(c['with_box_refine'])
    self.num_queries = int(c['two_stage_num_proposals'] if self.two_stage else c['num_queries'])
    kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    if backbone is None:
      spec = backbone_spec(c)
      self.backbone_layout: str | None = spec.layout
      backbone = ResNet(spec.depths, spec.widths, block=spec.block, stem_features=spec.stem_features,
                        in_features=int(c['num_channels']), out_indices=spec.out_indices,
                        stride_in_1x1=spec.stride_in_1x1, downsample_in_first_stage=spec.downsample_in_first_stage, **kw)
    else:
      self.backbone_layout = None
    self.backbone = backbone
    activation = _ACTIVATIONS[c['activation_function']]
    policy: dict[str, Any] = dict(deterministic_gradients=deterministic_gradients, chunk_size=chunk_size,
                                  memory_budget=memory_budget)
    self.encoder = DeformableDetrEncoder(
        tuple(cast(_Pyramid, backbone).channels), self.d_model, num_heads=c['encoder_attention_heads'],
        num_levels=c['num_feature_levels'], num_points=c['encoder_n_points'], num_layers=c['encoder_layers'],
        ffn_features=c['encoder_ffn_dim'], dropout=c['dropout'], activation_dropout=c['activation_dropout'],
        activation=activation, deterministic=deterministic, **policy, **kw)
    self._init_queries(c, kw)
    self.decoder = DeformableDetrDecoder(
        c['decoder_layers'], d_model=self.d_model, num_heads=c['decoder_attention_heads'],
        num_levels=c['num_feature_levels'], num_points=c['decoder_n_points'], ffn_features=c['decoder_ffn_dim'],
        dropout=c['dropout'], attention_dropout=c['attention_dropout'], activation_dropout=c['activation_dropout'],
        activation=activation, deterministic=deterministic, **policy, **kw)
    num_pred = int(c['decoder_layers']) + (1 if self.two_stage else 0)
    tie = bool(c['tie_word_embeddings'])
    self.class_embed, self.bbox_embed = _heads(self.d_model, self.num_labels, num_pred,
                                               (tie and not self.two_stage, tie and not self.with_box_refine), kw)

  def untie_heads(self, *names: str) -> None:
    """Gives every decoder layer its own class and / or box head: a copy of the head it shares.

    transformers' loader leaves heads apart whose checkpoint values differ under the names it would tie (the
    official box-refinement checkpoints and files written by transformers 4 hold one class head per layer);
    `from_deformable_detr` calls this for them. Heads already per layer are left as they are.

    Args:
      *names: `'class_embed'` and / or `'bbox_embed'`; none means both.

    Raises:
      ValueError: naming an unknown head.
    """
    for name in names or ('class_embed', 'bbox_embed'):
      if name not in ('class_embed', 'bbox_embed'):
        raise ValueError(f"{_FN}.untie_heads: names must be 'class_embed' or 'bbox_embed', got {name!r}")
      seen: set[int] = set()
      heads = []
      for head in getattr(self, name):
        heads.append(nnx.clone(head) if id(head) in seen else head)
        seen.add(id(head))
      setattr(self, name, nnx.List(heads))

  def _init_queries(self, c: Mapping[str, Any], kw: dict) -> None:
    d = self.d_model
    if self.two_stage:
      norm: dict[str, Any] = dict(epsilon=1e-5, use_fast_variance=False, dtype=kw['dtype'],
                                  param_dtype=kw['param_dtype'], rngs=kw['rngs'])
      linear: dict[str, Any] = dict(kernel_init=_normal_init, bias_init=_zeros, **kw)
      self.enc_output: nnx.Linear | None = nnx.Linear(d, d, **linear)
      self.enc_output_norm: nnx.LayerNorm | None = nnx.LayerNorm(d, **norm)
      self.pos_trans: nnx.Linear | None = nnx.Linear(2 * d, 2 * d, **linear)
      self.pos_trans_norm: nnx.LayerNorm | None = nnx.LayerNorm(2 * d, **norm)
      self.query_position_embeddings: nnx.Param | None = None
      self.reference_points: nnx.Linear | None = None
    else:
      embed = _normal_init(kw['rngs'].params(), (self.num_queries, 2 * d), kw['param_dtype'])
      self.query_position_embeddings = nnx.Param(embed)
      self.reference_points = nnx.Linear(d, 2, kernel_init=initializers.xavier_uniform(), bias_init=_zeros, **kw)
      self.enc_output = self.enc_output_norm = self.pos_trans = self.pos_trans_norm = None

  def _check_inputs(self, pixel_values: jax.Array, pixel_mask: jax.Array | None) -> jax.Array:
    channels = getattr(self.backbone, 'stem_conv', None)
    if pixel_values.ndim != 4:
      raise ValueError(f'{_FN}: pixel_values must have shape [N, H, W, C] (NHWC), got {tuple(pixel_values.shape)}')
    if channels is not None and pixel_values.shape[-1] != channels.in_features:
      raise ValueError(f'{_FN}: pixel_values must have shape [N, H, W, {channels.in_features}] (NHWC), got '
                       f'{tuple(pixel_values.shape)}')
    if pixel_mask is None:
      return jnp.ones(pixel_values.shape[:3], bool)
    if tuple(pixel_mask.shape) != tuple(pixel_values.shape[:3]):
      raise ValueError(f'{_FN}: pixel_mask must have shape [N, H, W] = {tuple(pixel_values.shape[:3])}, got '
                       f'{tuple(pixel_mask.shape)}')
    return pixel_mask

  def _two_stage_queries(self, enc: DeformableDetrEncoderOutput) -> tuple[jax.Array, ...]:
    """Queries from the top-scoring encoder proposals: `(position, content, reference boxes, enc_outputs_class,
    enc_outputs_coord_logits)`."""
    memory = enc.last_hidden_state
    if self.num_queries > memory.shape[1]:
      raise ValueError(f"{_FN}: config['two_stage_num_proposals']={self.num_queries} exceeds the encoder's "
                       f'{memory.shape[1]} tokens (levels {enc.spatial_shapes}): use fewer proposals or larger images')
    proposals, valid = encoder_proposals(enc.mask_flatten, enc.spatial_shapes, memory.dtype)
    assert self.enc_output is not None and self.enc_output_norm is not None  # two-stage
    assert self.pos_trans is not None and self.pos_trans_norm is not None
    query = self.enc_output_norm(self.enc_output(jnp.where(valid, memory, 0)))
    enc_class = self.class_embed[-1](query)
    enc_coord = self.bbox_embed[-1](query) + proposals
    _, top = jax.lax.top_k(enc_class[..., 0], self.num_queries)
    coords = jax.lax.stop_gradient(jnp.take_along_axis(enc_coord, top[..., None], axis=1))
    pos = self.pos_trans_norm(self.pos_trans(proposal_position_embedding(coords, self.d_model // 2)))
    return pos[..., :self.d_model], pos[..., self.d_model:], jax.nn.sigmoid(coords), enc_class, enc_coord

  def _predictions(self, hidden: jax.Array, init_ref: jax.Array, refs: jax.Array) -> tuple[list, list]:
    """Each decoder layer's `(logits, boxes)` from its output and the reference points it read."""
    logits, boxes = [], []
    for j in range(hidden.shape[1]):
      ref = inverse_sigmoid(init_ref if j == 0 else refs[:, j - 1])
      delta = self.bbox_embed[j](hidden[:, j])
      coord = delta + ref if ref.shape[-1] == 4 else delta.at[..., :2].add(ref)
      logits.append(self.class_embed[j](hidden[:, j]))
      boxes.append(jax.nn.sigmoid(coord))
    return logits, boxes

  def __call__(self, pixel_values: jax.Array, pixel_mask: jax.Array | None = None, *,
               deterministic: bool | None = None) -> DeformableDetrOutput:
    """Detects objects.

    Args:
      pixel_values: `[N, H, W, C]` NHWC images (normalised as the backbone expects).
      pixel_mask: optional `[N, H, W]`, nonzero (True) where the pixel is real, zero on padding; without it
        every pixel is real.
      deterministic: overrides the modules' `deterministic` (dropout) for this call.

    Returns:
      A `DeformableDetrOutput` (`logits [N, Q, num_labels]`, `pred_boxes [N, Q, 4]`, auxiliary and
      two-stage outputs).
    """
    pixel_mask = self._check_inputs(pixel_values, pixel_mask)
    enc = self.encoder(self.backbone(pixel_values), pixel_mask, deterministic=deterministic)
    memory, n = enc.last_hidden_state, pixel_values.shape[0]
    enc_class = enc_coord = None
    if self.two_stage:
      pos, target, ref, enc_class, enc_coord = self._two_stage_queries(enc)
    else:
      assert self.query_position_embeddings is not None and self.reference_points is not None  # one-stage
      embed = self.query_position_embeddings[...].astype(memory.dtype)
      pos = jnp.broadcast_to(embed[None, :, :self.d_model], (n, self.num_queries, self.d_model))
      target = jnp.broadcast_to(embed[None, :, self.d_model:], (n, self.num_queries, self.d_model))
      ref = jax.nn.sigmoid(self.reference_points(pos))
    last, hidden, refs = self.decoder(target, pos, ref, memory, enc.spatial_shapes, enc.valid_ratios.astype(ref.dtype),
                                      ~enc.mask_flatten, bbox_embed=self.bbox_embed if self.with_box_refine else None,
                                      deterministic=deterministic)
    logits, boxes = self._predictions(hidden, ref, refs)
    aux = tuple({'logits': a, 'pred_boxes': b} for a, b in zip(logits[:-1], boxes[:-1]))
    return DeformableDetrOutput(logits[-1], boxes[-1], aux, last, ref, hidden, refs, memory, enc_class, enc_coord)


class PyramidBackbone(nnx.Module):
  """A backbone for `DeformableDetr(backbone=...)` from a model with a `pyramid(x, out_indices)` method
  (`InternImage`, `FlashInternImage`): its levels' maps, as the upstream detection backbones return them.

  Args:
    model: the model (its classifier head, if any, is kept but not used).
    out_indices: the levels returned (0-based, increasing); Deformable DETR reads three or four.

  Example:
    >>> from flax import nnx
    >>> from deformjax.models import InternImage, InternImageConfig, PyramidBackbone
    >>> cfg = InternImageConfig(channels=16, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8))
    >>> net = nnx.eval_shape(lambda: InternImage(cfg, num_classes=0, rngs=nnx.Rngs(0)))
    >>> PyramidBackbone(net, (1, 2, 3)).channels
    (32, 64, 128)
  """

  def __init__(self, model: nnx.Module, out_indices: Sequence[int] = (1, 2, 3)):
    if not hasattr(model, 'pyramid') or not hasattr(model, 'pyramid_channels'):
      raise TypeError(f'PyramidBackbone: model must have pyramid() and pyramid_channels() (InternImage, '
                      f'FlashInternImage), got {type(model).__name__}')
    self.model, self.out_indices = model, tuple(out_indices)
    self.channels = tuple(model.pyramid_channels(self.out_indices))

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """`x [N, H, W, C]` -> the levels' maps, NHWC, highest resolution first."""
    return self.model.pyramid(x, self.out_indices)


__all__ = ['DEFORMABLE_DETR_DEFAULTS', 'BackboneSpec', 'DeformableDetr', 'DeformableDetrDecoder', 'DeformableDetrDecoderLayer',
           'DeformableDetrEncoder', 'DeformableDetrEncoderLayer', 'DeformableDetrEncoderOutput',
           'DeformableDetrMLPHead', 'DeformableDetrOutput', 'DeformableDetrSelfAttention', 'PyramidBackbone',
           'backbone_spec', 'downsample_mask', 'encoder_proposals', 'inverse_sigmoid', 'proposal_position_embedding',
           'reference_points', 'sine_position_embedding', 'valid_ratios']
