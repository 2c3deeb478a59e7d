"""Flax NNX MSDeformAttn: Deformable DETR's multi-scale deformable attention layer over `deformjax.ops.ms_deform_attn`.

The layer of transformers' `DeformableDetrMultiscaleDeformableAttention` and
mmcv's `MultiScaleDeformableAttention` (same parameter names: `value_proj`,
`sampling_offsets`, `attention_weights`, `output_proj`), with their shapes:
queries `[N, Lq, C]` with the position embeddings already added, reference
points `[N, Lq, L, 2]` ((x, y) in [0, 1]) or `[N, Lq, L, 4]` ((cx, cy, w, h)
boxes), and the flattened multi-level inputs `[N, sum(H_l * W_l), C]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import initializers

from deformjax.nn import _common
from deformjax.ops import _args, level_shapes


def directional_bias_init(num_heads: int, num_levels: int,
                          num_points: int) -> Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]:
  """Deformable DETR's sampling-offset bias: head `m` looks along the angle `2*pi*m/num_heads`, its point `p`
  at `p + 1` grid steps (the direction scaled so its larger coordinate is 1), identical at every level.

  Returns a flax initializer `(key, shape, dtype) -> [num_heads*num_levels*num_points*2]` in the
  `(head, level, point, (x, y))` order of the layer's `sampling_offsets` outputs.

  Example:
    >>> import jax
    >>> from deformjax.nn.ms_deform_attn import directional_bias_init
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


def check_spatial_shapes(spatial_shapes: Sequence[tuple[int, int]] | np.ndarray, num_levels: int,
                         name: str) -> tuple[tuple[int, int], ...]:
  """A static sequence of `num_levels` positive `(H_l, W_l)` pairs (numpy arrays accepted; jax arrays refused, so
  that a layer called under jit and outside it takes the same argument)."""
  if not isinstance(spatial_shapes, (Sequence, np.ndarray)):
    raise TypeError(f'{name}: spatial_shapes must be a static sequence of (H_l, W_l) pairs (Python ints), '
                    f'got {type(spatial_shapes).__name__}')
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
    >>> from deformjax.nn.ms_deform_attn import sampling_locations
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
                         spatial_shapes: Sequence[tuple[int, int]], padding_mask: jax.Array | None,
                         value_proj: Callable[[jax.Array], jax.Array],
                         sampling_offsets: Callable[[jax.Array], jax.Array],
                         attention_weights: Callable[[jax.Array], jax.Array],
                         output_proj: Callable[[jax.Array], jax.Array], *, num_heads: int, num_levels: int,
                         num_points: int, name: str = 'MSDeformAttn', chunk_size: int | None = None,
                         memory_budget: int | None = None,
                         deterministic: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The layer's computation given its four projections (what `MSDeformAttn` and its Linen twin share).

  Shapes as `MSDeformAttn.__call__`; `value_proj` maps `d_model` to the value
  width (a multiple of `num_heads`), `output_proj` maps it back. Returns
  `(out [N, Lq, C], locations [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P])`.
  `chunk_size`, `memory_budget`, `deterministic` go to `deformjax.ops.ms_deform_attn`.
  """
  from deformjax.ops import ms_deform_attn

  m, lv, p, c = num_heads, num_levels, num_points, query.shape[-1] if query.ndim == 3 else -1
  shapes = check_spatial_shapes(spatial_shapes, lv, name)
  if query.ndim != 3:
    raise ValueError(f'{name}: query must have shape [N, Lq, d_model], got {tuple(query.shape)}')
  n, lq = query.shape[:2]
  total = sum(h * w for h, w in shapes)
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
                                   memory_budget=memory_budget, deterministic=deterministic))
  return out, locations, weights


class MSDeformAttn(nnx.Module):
  """Multi-scale deformable attention (Deformable DETR), the layer of transformers and mmcv.

  `value = value_proj(inputs)` (zeroed where `padding_mask`), split into
  `num_heads` heads of `value_features // num_heads`; `sampling_offsets(query)` gives
  every head `num_levels * num_points` offsets from the query's reference point
  (`sampling_locations`); `attention_weights(query)`, a softmax over the
  `num_levels * num_points` samples of each head, weights the bilinear samples
  (`deformjax.ops.ms_deform_attn`); `output_proj` mixes the heads.

  Initialisation (the paper's, as transformers / mmcv): `sampling_offsets` zero
  kernel and the directional bias (`directional_bias_init`), so a fresh layer
  samples a fixed star of points around each reference point; `attention_weights`
  zeros (uniform weights); `value_proj` / `output_proj` Xavier-uniform kernels,
  zero biases.

  Args:
    d_model: C, the query, input and output width.
    num_heads: M (`d_model` must be divisible by it).
    num_levels: L, feature levels of the inputs.
    num_points: P, samples per head and level.
    value_features: width of the value projection (`value_proj` maps
      `d_model -> value_features`, `output_proj` maps it back; a multiple of
      `num_heads`); default `d_model`. mmcv's `value_proj_ratio` is
      `value_features = int(d_model * value_proj_ratio)`.
    dtype, param_dtype, precision: as `nnx.Linear`.
    chunk_size, memory_budget, deterministic: the execution policy, passed to
      `deformjax.ops.ms_deform_attn` (chunks over the `N * Lq` queries), as
      `DeformConv`'s to `deform_conv2d`.
    rngs: random number generators (keyword-only).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.nn import MSDeformAttn
    >>> layer = MSDeformAttn(32, num_heads=4, num_levels=2, num_points=3, rngs=nnx.Rngs(0))
    >>> shapes = [(8, 8), (4, 4)]
    >>> inputs = jnp.ones((2, 64 + 16, 32), jnp.float32)
    >>> query, ref = jnp.ones((2, 5, 32), jnp.float32), jnp.full((2, 5, 2, 2), 0.5, jnp.float32)
    >>> layer(query, ref, inputs, shapes).shape
    (2, 5, 32)
  """

  def __init__(self, d_model: int, num_heads: int = 8, num_levels: int = 4, num_points: int = 4, *,
               value_features: int | None = None, dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
               precision: jax.lax.PrecisionLike = None, chunk_size: int | None = None,
               memory_budget: int | None = None, deterministic: bool = False, rngs: nnx.Rngs):
    name = type(self).__name__
    value_features = check_layer_args(name, d_model, num_heads, num_levels, num_points, value_features)
    self.policy = _common.sampling_policy(chunk_size, memory_budget, deterministic, name)
    self.d_model, self.num_heads, self.num_levels, self.num_points = d_model, num_heads, num_levels, num_points
    self.value_features = value_features
    self.dtype = dtype
    samples = num_heads * num_levels * num_points
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    zeros, xavier = initializers.zeros_init(), initializers.xavier_uniform()
    self.sampling_offsets = nnx.Linear(d_model, samples * 2, kernel_init=zeros,
                                       bias_init=directional_bias_init(num_heads, num_levels, num_points), **kw)
    self.attention_weights = nnx.Linear(d_model, samples, kernel_init=zeros, bias_init=zeros, **kw)
    self.value_proj = nnx.Linear(d_model, value_features, kernel_init=xavier, bias_init=zeros, **kw)
    self.output_proj = nnx.Linear(value_features, d_model, kernel_init=xavier, bias_init=zeros, **kw)

  def __call__(self, query: jax.Array, reference_points: jax.Array, inputs: jax.Array,
               spatial_shapes: Sequence[tuple[int, int]], padding_mask: jax.Array | None = None, *,
               return_sampling: bool = False) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Attends from `query [N, Lq, C]` to `inputs [N, sum(H_l*W_l), C]`.

    Args:
      query: `[N, Lq, d_model]`, position embeddings already added.
      reference_points: `[N, Lq, num_levels, 2]` (x, y) in [0, 1], or
        `[N, Lq, num_levels, 4]` boxes (cx, cy, w, h).
      inputs: `[N, S, d_model]`, the levels' pixels concatenated row-major, `S = sum(H_l * W_l)`.
      spatial_shapes: static sequence of `num_levels` `(H_l, W_l)`.
      padding_mask: optional bool `[N, S]`, True where `inputs` is padding (mmcv's
        `key_padding_mask`; transformers' `attention_mask` is its negation).
      return_sampling: also return the sampling locations `[N, Lq, M, L, P, 2]`
        and attention weights `[N, Lq, M, L, P]`.

    Returns:
      `[N, Lq, d_model]`, or `(out, locations, weights)` with `return_sampling`.
    """
    if query.ndim != 3 or query.shape[-1] != self.d_model:
      raise ValueError(f'{type(self).__name__}: query must have shape [N, Lq, d_model={self.d_model}], got '
                       f'{tuple(query.shape)}')
    out, locations, weights = ms_deform_attn_block(
        query, reference_points, inputs, spatial_shapes, padding_mask, self.value_proj, self.sampling_offsets,
        self.attention_weights, self.output_proj, num_heads=self.num_heads, num_levels=self.num_levels,
        num_points=self.num_points, name=type(self).__name__,
        **self.policy.as_kwargs())
    return (out, locations, weights) if return_sampling else out


__all__ = ['MSDeformAttn', 'check_layer_args', 'check_spatial_shapes', 'directional_bias_init', 'ms_deform_attn_block',
           'sampling_locations']
