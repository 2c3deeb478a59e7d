"""Flax NNX MSDeformAttn: Deformable DETR's multi-scale deformable attention layer over `deformjax.ops.ms_deform_attn`.

The layer of transformers' `DeformableDetrMultiscaleDeformableAttention` and
mmcv's `MultiScaleDeformableAttention` (same parameter names: `value_proj`,
`sampling_offsets`, `attention_weights`, `output_proj`), with their shapes:
queries `[N, Lq, C]` with the position embeddings already added, reference
points `[N, Lq, L, 2]` ((x, y) in [0, 1]) or `[N, Lq, L, 4]` ((cx, cy, w, h)
boxes), and the flattened multi-level inputs `[N, sum(H_l * W_l), C]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from jax.typing import DTypeLike

from deformjax.nn import _common
from deformjax.nn._blocks import check_layer_args, directional_bias_init, ms_deform_attn_block
from deformjax.nn.sampling import AttentionSampling


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
    dtype: the computation dtype, as `nnx.Linear`'s.
    param_dtype: the parameters' dtype, as `nnx.Linear`'s.
    precision: of the projections, as `nnx.Linear`'s.
    chunk_size: most queries per pass of `ms_deform_attn` (None: the execution policy).
    memory_budget: most bytes of sampled values per pass of `ms_deform_attn`.
    deterministic_gradients: bit-identical gradients run to run on GPU/TPU (reverse mode only).
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
               value_features: int | None = None, dtype: DTypeLike | None = None, param_dtype: DTypeLike = jnp.float32,
               precision: jax.lax.PrecisionLike = None, chunk_size: int | None = None,
               memory_budget: int | None = None, deterministic_gradients: bool = False, rngs: nnx.Rngs):
    name = type(self).__name__
    value_features = check_layer_args(name, d_model, num_heads, num_levels, num_points, value_features)
    self.policy = _common.sampling_policy(chunk_size, memory_budget, deterministic_gradients, name)
    self.d_model, self.num_heads, self.num_levels, self.num_points = d_model, num_heads, num_levels, num_points
    self.value_features = value_features
    self.dtype = dtype
    samples = num_heads * num_levels * num_points
    kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    zeros, xavier = initializers.zeros_init(), initializers.xavier_uniform()
    self.sampling_offsets = nnx.Linear(d_model, samples * 2, kernel_init=zeros,
                                       bias_init=directional_bias_init(num_heads, num_levels, num_points), **kw)
    self.attention_weights = nnx.Linear(d_model, samples, kernel_init=zeros, bias_init=zeros, **kw)
    self.value_proj = nnx.Linear(d_model, value_features, kernel_init=xavier, bias_init=zeros, **kw)
    self.output_proj = nnx.Linear(value_features, d_model, kernel_init=xavier, bias_init=zeros, **kw)

  def __call__(self, query: jax.Array, reference_points: jax.Array, inputs: jax.Array,
               spatial_shapes: Sequence[tuple[int, int]] | jax.Array, padding_mask: jax.Array | None = None, *,
               return_sampling: bool = False) -> jax.Array | tuple[jax.Array, AttentionSampling]:
    """Attends from `query [N, Lq, C]` to `inputs [N, sum(H_l*W_l), C]`.

    Args:
      query: `[N, Lq, d_model]`, position embeddings already added.
      reference_points: `[N, Lq, num_levels, 2]` (x, y) in [0, 1], or
        `[N, Lq, num_levels, 4]` boxes (cx, cy, w, h).
      inputs: `[N, S, d_model]`, the levels' pixels concatenated row-major, `S = sum(H_l * W_l)`.
      spatial_shapes: `num_levels` `(H_l, W_l)` pairs: a sequence, or a concrete `[L, 2]` integer array (numpy or
        jax, as transformers passes it); static either way.
      padding_mask: optional bool `[N, S]`, True where `inputs` is padding (mmcv's
        `key_padding_mask`; transformers' `attention_mask` is its negation).
      return_sampling: also return where the layer sampled.

    Returns:
      `[N, Lq, d_model]`, or `(out, AttentionSampling(locations, weights))` with
      `return_sampling`: locations `[N, Lq, M, L, P, 2]`, weights `[N, Lq, M, L, P]`.
    """
    if query.ndim != 3 or query.shape[-1] != self.d_model:
      raise ValueError(f'{type(self).__name__}: query must have shape [N, Lq, d_model={self.d_model}], got '
                       f'{tuple(query.shape)}')
    out, locations, weights = ms_deform_attn_block(
        query, reference_points, inputs, spatial_shapes, padding_mask, self.value_proj, self.sampling_offsets,
        self.attention_weights, self.output_proj, num_heads=self.num_heads, num_levels=self.num_levels,
        num_points=self.num_points, name=type(self).__name__,
        **self.policy.as_kwargs())
    return (out, AttentionSampling(locations, weights)) if return_sampling else out


__all__ = ['MSDeformAttn']
