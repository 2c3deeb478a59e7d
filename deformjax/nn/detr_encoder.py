"""Flax NNX Deformable DETR encoder: from backbone feature maps to the encoder's memory, as transformers computes it.

What transformers' `DeformableDetrModel` does between its backbone and its
decoder, in NHWC:

1. **Input projection** per level: a 1x1 conv + GroupNorm(32) for each backbone
   map; when `num_levels` exceeds the backbone's maps, extra levels made by a
   3x3 stride-2 conv (padding 1) + GroupNorm, the first on the last backbone map,
   the next ones on the previous extra level.
2. **Padding masks**: the image's `pixel_mask [N, H, W]` (1 where real)
   downsampled to each level by PyTorch's `interpolate(mode='nearest')`
   (`downsample_mask`).
3. **Position embeddings**: the normalised sine embedding of the mask
   (`sine_position_embedding`) plus a learned `level_embed` per level.
4. **Flattening** of every level row-major and of the levels in order, the
   per-level valid ratios (`valid_ratios`) and the reference points of every
   pixel (`reference_points`).
5. **Encoder layers** (`DeformableDetrEncoderLayer`), post-norm: multi-scale
   deformable self-attention of `hidden + pos` over `hidden`, dropout, residual,
   LayerNorm; FFN (`fc1`, activation, dropout, `fc2`, dropout), residual,
   LayerNorm.

The decoder, the query embeddings and the detection heads are not part of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from flax.nnx.nn import initializers

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
    >>> from deformjax.nn.detr_encoder import downsample_mask
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
    >>> from deformjax.nn.detr_encoder import sine_position_embedding
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
    >>> from deformjax.nn.detr_encoder import valid_ratios
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
    >>> from deformjax.nn.detr_encoder import reference_points
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
      (`MSDeformAttn(deterministic=...)`, a sorted segment sum in place of scatter-adds); the same forward.
      Named apart from `deterministic` because that one is dropout's: ``nnx.Module.train()`` / ``.eval()``
      switch dropout and leave this alone.
    chunk_size, memory_budget: the attention's execution policy (`MSDeformAttn`'s: queries per pass, or
      a byte budget for one pass); they change how it runs, not what it computes.
    dtype, param_dtype, precision: as `nnx.Linear`.
    rngs: random number generators; `rngs.dropout` (or the default stream) drives dropout.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.nn import DeformableDetrEncoderLayer
    >>> layer = DeformableDetrEncoderLayer(32, 4, 2, 2, 64, deterministic=True, rngs=nnx.Rngs(0))
    >>> h, ref = jnp.ones((1, 20, 32), jnp.float32), jnp.full((1, 20, 2, 2), 0.5, jnp.float32)
    >>> nnx.eval_shape(lambda m, h, ref: m(h, h, ref, [(4, 4), (2, 2)]), layer, h, ref).shape  # shapes only
    (1, 20, 32)
  """

  def __init__(self, d_model: int, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
               ffn_features: int = 1024, *, dropout: float = 0.1, activation_dropout: float = 0.0,
               activation: Callable[[jax.Array], jax.Array] = jax.nn.relu, layer_norm_epsilon: float = 1e-5,
               deterministic: bool = False, deterministic_gradients: bool = False, chunk_size: int | None = None,
               memory_budget: int | None = None, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    name = type(self).__name__
    _args.positive_int(ffn_features, 'ffn_features', name)
    policy = _attention_policy(chunk_size, memory_budget, deterministic_gradients, name)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = MSDeformAttn(d_model, num_heads, num_levels, num_points, precision=precision, **policy, **kw)
    norm = dict(epsilon=layer_norm_epsilon, use_fast_variance=False, **kw)
    self.self_attn_layer_norm = nnx.LayerNorm(d_model, **norm)
    linear = dict(kernel_init=_normal_init, bias_init=_zeros, precision=precision, **kw)
    self.fc1 = nnx.Linear(d_model, ffn_features, **linear)
    self.fc2 = nnx.Linear(ffn_features, d_model, **linear)
    self.final_layer_norm = nnx.LayerNorm(d_model, **norm)
    self.dropout = nnx.Dropout(dropout, deterministic=deterministic, rngs=rngs)
    self.activation_dropout = nnx.Dropout(activation_dropout, deterministic=deterministic, rngs=rngs)
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
    ffn = self.activation_dropout(self.activation(self.fc1(h)), deterministic=deterministic)
    ffn = self.dropout(self.fc2(ffn), deterministic=deterministic)
    return self.final_layer_norm(h + ffn)


def _attention_policy(chunk_size: int | None, memory_budget: int | None, deterministic_gradients: bool,
                      name: str) -> dict:
  """The attention's execution-policy keywords (`MSDeformAttn`'s names), refused under the encoder's names."""
  _args.check_bool(deterministic_gradients, 'deterministic_gradients', name)
  _common.check_policy(chunk_size, memory_budget, False, name)
  return dict(chunk_size=chunk_size, memory_budget=memory_budget, deterministic=bool(deterministic_gradients))


def _extra_level_shape(h: int, w: int) -> tuple[int, int]:
  """Output size of the 3x3, stride-2, padding-1 conv of an extra level."""
  return (h - 1) // 2 + 1, (w - 1) // 2 + 1


class DeformableDetrEncoder(nnx.Module):
  """Deformable DETR's encoder from backbone feature maps (transformers' `DeformableDetrModel` up to
  `encoder_last_hidden_state`): input projection, masks, position and level embeddings, reference points
  and `num_layers` `DeformableDetrEncoderLayer`s.

  Parameter names follow transformers': `input_convs[l]` / `input_norms[l]` are
  `input_proj.{l}.0` / `input_proj.{l}.1`, `level_embed`, `layers[j]` is
  `encoder.layers.{j}` (see `deformjax.nn.convert.from_deformable_detr_encoder`).
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
      `DeformableDetrEncoderLayer` (`deterministic_gradients` is `MSDeformAttn`'s `deterministic`:
      bit-identical gradients on GPU/TPU, untouched by ``.train()`` / ``.eval()``).
    dtype, param_dtype, precision: as `nnx.Conv`.
    rngs: random number generators.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.nn import DeformableDetrEncoder
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
               memory_budget: int | None = None, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
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
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    conv = dict(kernel_init=_normal_init, bias_init=_zeros, precision=precision, **kw)
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
    shapes = [tuple(s) for s in feature_shapes]
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


__all__ = ['DeformableDetrEncoder', 'DeformableDetrEncoderLayer', 'DeformableDetrEncoderOutput', 'downsample_mask',
           'reference_points', 'sine_position_embedding', 'valid_ratios']
