"""Geometric augmentation in JAX: batched affine warps built on `bilinear_sample`.

Runs on device inside the jitted train step (and builds the transformed test
sets of the experiments). Points that map outside the source image read 0,
the background of the digit datasets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from deformjax.ops.sampling import bilinear_sample

__all__ = ['affine_matrices', 'random_affine', 'transform', 'warp_affine']


def affine_matrices(angle_deg: jax.Array, scale: jax.Array, shift_yx: jax.Array, height: int,
                    width: int) -> tuple[jax.Array, jax.Array]:
  """Inverse maps of "rotate by angle, scale, then shift" about the image centre.

  Args:
    angle_deg: `[B]` rotation, counter-clockwise as displayed (y points down).
    scale: `[B]` zoom factor (> 1 enlarges the content).
    shift_yx: `[B, 2]` translation of the content in pixels (down, right).
    height, width: image size.

  Returns:
    `(a [B, 2, 2], b [B, 2])` with source = a @ target + b in (y, x) pixels.
  """
  theta = jnp.deg2rad(angle_deg)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  # Forward map on (y, x) with y down: a counter-clockwise turn on screen.
  rot = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)
  inv_rot = jnp.swapaxes(rot, -1, -2)
  a = inv_rot / scale[:, None, None]
  centre = jnp.asarray([[(height - 1) / 2.0, (width - 1) / 2.0]], a.dtype)  # [1, 2]
  b = centre - jnp.einsum('bij,bj->bi', a, centre + shift_yx)
  return a, b


def warp_affine(images: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Warps `images [B, H, W, C]`: output pixel p reads input at `a @ p + b` (bilinear, 0 outside)."""
  _, h, w, _ = images.shape
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=a.dtype), jnp.arange(w, dtype=a.dtype), indexing='ij')
  grid = jnp.stack([ys.reshape(-1), xs.reshape(-1)], -1)  # [H*W, 2]
  coords = jnp.einsum('bij,pj->bpi', a, grid) + b[:, None, :]
  return bilinear_sample(images, coords.astype(images.dtype if images.dtype == jnp.float64 else jnp.float32)).reshape(
      images.shape)


def transform(images: jax.Array, *, angle_deg: ArrayLike = 0.0, scale: ArrayLike = 1.0,
              shift_yx: ArrayLike | tuple[float, float] = (0.0, 0.0)) -> jax.Array:
  """Applies one rotation / scale / shift (scalars or per-image `[B]`, `[B, 2]`) to a batch.

  Args:
    images: `[B, H, W, C]`.
    angle_deg: rotation in degrees, counter-clockwise as displayed: a scalar or `[B]`.
    scale: zoom factor (> 1 enlarges the content): a scalar or `[B]`.
    shift_yx: translation of the content in pixels (down, right): `(dy, dx)` or `[B, 2]`.

  Returns:
    `[B, H, W, C]`, the warped images (points mapped from outside the image read 0).
  """
  bsz, h, w, _ = images.shape
  dtype = jnp.float64 if images.dtype == jnp.float64 else jnp.float32
  angle = jnp.broadcast_to(jnp.asarray(angle_deg, dtype), (bsz,))
  zoom = jnp.broadcast_to(jnp.asarray(scale, dtype), (bsz,))
  shift = jnp.broadcast_to(jnp.asarray(shift_yx, dtype), (bsz, 2))
  a, b = affine_matrices(angle, zoom, shift, h, w)
  return warp_affine(images, a, b)


def random_affine(
    key: jax.Array,
    images: jax.Array,
    *,
    max_rotation_deg: float | np.floating | jax.Array = 0.0,
    max_shift: float | np.floating | jax.Array = 0.0,
    scale_range: tuple[float | np.floating | jax.Array, float | np.floating | jax.Array] = (1.0, 1.0),
) -> jax.Array:
  """Random per-image rotation, translation and scaling of `images [B, H, W, C]`.

  Angles are uniform in [-max_rotation_deg, max_rotation_deg], shifts uniform in
  [-max_shift, max_shift] pixels per axis, scales log-uniform in `scale_range`.
  Deterministic in `key`; values do not depend on how the batch is sharded.
  """
  bsz = images.shape[0]
  k_rot, k_shift, k_scale = jax.random.split(key, 3)
  dtype = jnp.float32
  angle = jax.random.uniform(k_rot, (bsz,), dtype, -max_rotation_deg, max_rotation_deg)
  shift = jax.random.uniform(k_shift, (bsz, 2), dtype, -max_shift, max_shift)
  lo, hi = jnp.log(jnp.asarray(scale_range[0], dtype)), jnp.log(jnp.asarray(scale_range[1], dtype))
  zoom = jnp.exp(jax.random.uniform(k_scale, (bsz,), dtype, 0.0, 1.0) * (hi - lo) + lo)
  return transform(images, angle_deg=angle, scale=zoom, shift_yx=shift)
