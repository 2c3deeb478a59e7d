"""Flax NNX DeformRoIPool: RoIAlign -> FC -> normalised offsets -> deformable pooling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.typing import Dtype, PrecisionLike

from deformjax.nn import _blocks, _common
from deformjax.nn.sampling import Sampling
from deformjax.ops import _args


class DeformRoIPool(nnx.Module):
  """Deformable RoI pooling as in the DCN paper (and DCNv2 when `modulated`).

  RoIAlign pools each RoI to `output_size`; the flattened result (`[R, out_h *
  out_w * C]`, bins row-major, channels last) goes through `hidden_features`
  ReLU FC layers and a last FC (zero-initialised) that predicts normalised
  per-bin offsets (dy, dx); `deform_roi_pool` then pools with the bins shifted
  by `gamma * offset * (roi_h, roi_w)`. With `modulated`, a second branch (one
  ReLU FC of width `hidden_features[0]`, then a zero-initialised FC) predicts
  per-bin mask logits, and the mask scales each bin: `2*sigmoid(logits)` by
  default (1 at init, so a fresh layer equals RoIAlign) or `sigmoid(logits)`
  with `modulation='sigmoid'` (mmcv's `ModulatedDeformRoIPoolPack`; a fresh
  layer is then half of RoIAlign). `deformjax.convert.from_mmcv_deform_roi_pool` loads
  mmcv's `DeformRoIPoolPack` and `ModulatedDeformRoIPoolPack` into this layer.

  Args:
    in_features: feature channels C.
    output_size: int or (out_h, out_w).
    spatial_scale: feature pixels per input pixel (e.g. 1/16).
    sampling_ratio: samples per bin along each axis; 0: adaptive, as torchvision.
    gamma: offset magnitude scale (0.1 in the DCN paper).
    aligned: torchvision's `aligned`; True by default, as mmcv's DeformRoIPool.
    max_sampling_grid: static bound on the adaptive grid, as `deform_roi_pool`'s.
    hidden_features: widths of the hidden FC layers (mmcv uses (1024, 1024)).
    modulated: predict a per-bin mask (DCNv2).
    modulation: the mask's activation when `modulated`: `'2sigmoid'`
      (default) or `'sigmoid'` (mmcv's; the mask ranges over (0, 1)).
    dtype: the computation dtype, as `nnx.Linear`'s.
    param_dtype: the parameters' dtype, as `nnx.Linear`'s.
    precision: of the projections, as `nnx.Linear`'s.
    chunk_size: most bins per pass of `deform_roi_pool` (None: the execution policy).
    memory_budget: most bytes of sampled values per pass of `deform_roi_pool`.
    deterministic_gradients: bit-identical gradients run to run on GPU/TPU (reverse mode only).
    rngs: random number generators (keyword-only).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformjax.nn import DeformRoIPool
    >>> pool = DeformRoIPool(8, 7, hidden_features=(64,), rngs=nnx.Rngs(0))
    >>> feats = jnp.ones((2, 32, 32, 8), jnp.float32)
    >>> rois = jnp.array([[0, 1.0, 2.0, 20.0, 24.0], [1, 4.0, 4.0, 30.0, 12.0]], jnp.float32)
    >>> pool(feats, rois).shape
    (2, 7, 7, 8)
  """

  def __init__(
      self,
      in_features: int,
      output_size: int | Sequence[int],
      *,
      spatial_scale: float = 1.0,
      sampling_ratio: int = 0,
      gamma: float = 0.1,
      aligned: bool = True,
      max_sampling_grid: int | tuple[int, int] | None = None,
      hidden_features: Sequence[int] = (1024, 1024),
      modulated: bool = False,
      modulation: str = '2sigmoid',
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      precision: PrecisionLike = None,
      chunk_size: int | None = None,
      memory_budget: int | None = None,
      deterministic_gradients: bool = False,
      rngs: nnx.Rngs,
  ) -> None:
    oh, ow = _args.positive_pair(output_size, 'output_size', type(self).__name__)
    _blocks.check_roi_pool_options(aligned, modulated, modulation, type(self).__name__)
    self.policy = _common.sampling_policy(chunk_size, memory_budget, deterministic_gradients, type(self).__name__)
    self.in_features = in_features
    self.output_size = (oh, ow)
    self.spatial_scale = spatial_scale
    self.sampling_ratio = sampling_ratio
    self.gamma = gamma
    self.aligned = aligned
    self.max_sampling_grid = max_sampling_grid
    self.modulated = modulated
    self.modulation = modulation
    flat = oh * ow * in_features

    def linear(i: int, o: int, zero: bool = False) -> nnx.Linear:
      init: dict[str, Any] = {'kernel_init': initializers.zeros_init()} if zero else {}
      return nnx.Linear(i, o, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs, **init)

    widths = [flat, *hidden_features]
    self.offset_hidden = nnx.List([linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
    self.offset_out = linear(widths[-1], oh * ow * 2, zero=True)
    if modulated:
      self.mask_hidden = linear(flat, widths[1]) if hidden_features else None
      self.mask_out = linear(widths[1] if hidden_features else flat, oh * ow, zero=True)

  def __call__(self, features: jax.Array, rois: jax.Array, *, return_sampling: bool = False
               ) -> jax.Array | tuple[jax.Array, Sampling]:
    """Pools `rois` (`[R, 5]`, (batch_index, x1, y1, x2, y2)) from `features` (`[N, H, W, C]`).

    Returns `[R, out_h, out_w, C]`, or `(pooled, Sampling(offsets [R, out_h, out_w, 2],
    mask [R, out_h, out_w, 1] or None))` with `return_sampling`.
    """
    _common.check_in_features(features, self.in_features, type(self).__name__)
    pooled, offsets, mask = _blocks.deform_roi_pool_block(
        features, rois, self.offset_hidden, self.offset_out, self.mask_hidden if self.modulated else None,
        self.mask_out if self.modulated else None, output_size=self.output_size, gamma=self.gamma,
        modulation=self.modulation, spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
        aligned=self.aligned, max_sampling_grid=self.max_sampling_grid, **self.policy.as_kwargs())
    return (pooled, Sampling(offsets, mask)) if return_sampling else pooled

__all__ = ['DeformRoIPool']
