"""Bilinear sampling with torchvision's zero-outside rule.

`bilinear_sample` reads images at arbitrary points through the sampling
engine's corner rule (`deformjax.ops._engine.bilinear_corners`), the one every
op samples with, so all of them agree on the boundary to the last bit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deformjax.ops import _args, _engine, _geometry, _policy

_FN = 'bilinear_sample'


def _check_args(images: jax.Array, coords: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Arrays, dtypes and shapes, each refused by name; returns the arrays."""
  images, coords = _args.as_array(images, 'images', _FN), _args.as_array(coords, 'coords', _FN)
  _args.check_floating(images, 'images', _FN)
  _args.check_floating(coords, 'coords', _FN)
  if np.ndim(images) < 3:
    raise ValueError(f'{_FN}: images must have shape [..., H, W, C], got {np.shape(images)}')
  if np.ndim(coords) < 2 or np.shape(coords)[-1] != 2:
    raise ValueError(f'{_FN}: coords must have shape [..., P, 2], got {np.shape(coords)}')
  batch = images.shape[:-3]
  if coords.shape[:-2] != batch:
    raise ValueError(
        f'{_FN}: coords must have shape {batch + ("P", 2)} (leading dims of images {images.shape}), '
        f'got {coords.shape}'
    )
  return images, coords


def bilinear_sample(images: jax.Array, coords: jax.Array) -> jax.Array:
  """Samples `images` bilinearly at `coords`.

  Args:
    images: `[..., H, W, C]` float array (NHWC, any leading batch dims).
    coords: `[..., P, 2]` points as (y, x) in pixel units, where pixel (i, j) has
      its centre at (i, j); leading dims equal to those of `images`.

  Returns:
    `[..., P, C]`, in `images.dtype`. A point with y <= -1, y >= H, x <= -1 or
    x >= W reads exactly 0, corners outside the image contribute 0 (torchvision's
    rule), and non-finite or huge coordinates read 0 with zero gradient.

  Example:
    >>> import jax.numpy as jnp
    >>> from deformjax.ops import bilinear_sample
    >>> img = jnp.arange(12.0).reshape(1, 3, 4, 1)
    >>> bilinear_sample(img, jnp.array([[[1.0, 1.5], [-5.0, 0.0]]])).shape
    (1, 2, 1)
    >>> bilinear_sample(img, jnp.array([[[1.0, 1.5], [-5.0, 0.0]]]))[0, :, 0].tolist()
    [5.5, 0.0]
  """
  images, coords = _check_args(images, coords)
  geom = _sample_geometry(images, coords)
  if geom.empty:
    return _geometry.empty_result(geom)
  return _bilinear_sample(images, coords, geom=geom)


def _sample_geometry(images: jax.Array, coords: jax.Array) -> _geometry.Geometry:
  """The call's geometry: `[..., P, C]` in `images.dtype`, read and summed in the coordinate dtype; empty when
  there is no point, no channel or no pixel."""
  batch, (h, w, c), p = images.shape[:-3], images.shape[-3:], coords.shape[-2]
  b = math.prod(batch)  # an int, or a jax.export symbolic dimension
  cdtype = _args.coordinate_dtype(images.dtype, coords.dtype)
  return _geometry.Geometry(out_shape=batch + (p, c), out_dtype=np.dtype(images.dtype), acc_dtype=cdtype,
                            cdtype=cdtype, **_geometry.extent(b * p * c, h * w, b * h * w, _FN))


@_policy.jit_core('geom')
def _bilinear_sample(images: jax.Array, coords: jax.Array, *, geom: _geometry.Geometry) -> jax.Array:
  """`bilinear_sample` on checked arrays, one compiled program per geometry."""
  batch, (h, w, c), p = images.shape[:-3], images.shape[-3:], coords.shape[-2]
  b = math.prod(batch)
  coords = coords.reshape(b, p, 2).astype(geom.cdtype)
  indices, weights = _engine.bilinear_corners(coords[..., 0], coords[..., 1], h, w, geom.idx_dtype)
  # One flat table over the batch turns a batched gather into a plain row gather.
  image_start = (jnp.arange(b, dtype=geom.idx_dtype) * (h * w))[:, None]
  indices = tuple(i + image_start for i in indices)
  table = images.reshape(b * h * w, c)
  out = _engine.gather_corners(table, indices, weights, geom.acc_dtype)
  return out.astype(geom.out_dtype).reshape(geom.out_shape)


__all__ = ['bilinear_sample']
