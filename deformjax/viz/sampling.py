"""Where a deformable network looks: sampling locations, offset fields, effective dilation.

Works on any NNX model whose convs are `nnx.Conv` / `deformjax.nn.DeformConv`
modules: the model runs once under `nnx.capture`, with every DeformConv set to
sow its offsets and mask, and the per-layer fields are read from the capture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformjax.nn import DeformConv
from deformjax.ops.sampling import bilinear_sample


@dataclasses.dataclass
class LayerField:
  """One conv layer's geometry and, for a DeformConv, its offsets and mask."""

  name: str
  kernel_size: tuple[int, int]
  dilation: tuple[int, int]
  padding: tuple[int, int]  # (top, left)
  offsets: np.ndarray | None  # [N, Ho, Wo, 2*kh*kw] (offset group 0) or None for a regular conv
  mask: np.ndarray | None  # [N, Ho, Wo, kh*kw] or None


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, int):
    return v, v
  a, b = v
  return a, b


def _pads(layer: nnx.Conv | DeformConv) -> tuple[int, int]:
  """(top, left) padding of a conv layer. Explicit padding and stride-1 'SAME' do not
  depend on the input size, so any size large enough for the kernel serves."""
  from deformjax.ops.deform_conv import output_size

  kh, kw = layer.kernel_size
  _, ((pt, _), (pl, _)) = output_size((1000, 1000), (kh, kw), getattr(layer, 'strides', 1) or 1,
                                      layer.padding, _pair(getattr(layer, 'kernel_dilation', 1) or 1))
  return pt, pl


def _sown_value(v: Any) -> np.ndarray | None:
  """The first sown value of an `nnx.Intermediate` entry (None when absent), as numpy."""
  if v is None:
    return None
  return np.asarray((v.get_value() if hasattr(v, 'get_value') else v.value)[0])


def _default_convs(model: Any) -> Sequence[nnx.Conv | DeformConv]:
  """`model.convs`: the conv stack of a deformjax classifier (`deformjax.models.ConvClassifier`, `CifarNet`)."""
  return model.convs


def layer_fields(model: nnx.Module, images: jax.Array,
                 convs: Sequence[nnx.Conv | DeformConv] | None = None) -> list[LayerField]:
  """Runs `model(images)` once and returns the offset field of every conv in `convs`.

  Args:
    model: an NNX model.
    images: `[N, H, W, C]` model input.
    convs: the conv modules to report, in forward order (default: `model.convs`).
  """
  convs = list(_default_convs(model) if convs is None else convs)
  deform = [m for m in convs if isinstance(m, DeformConv)]
  saved = [m.sow_offsets for m in deform]
  for m in deform:
    m.sow_offsets = True
  try:
    _, sown = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(model, images)
  finally:
    for m, s in zip(deform, saved):
      m.sow_offsets = s
  flat = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(sown)}
  modules = nnx.iter_modules(model) if hasattr(nnx, 'iter_modules') else model.iter_modules()
  paths = {id(m): tuple(str(p) for p in path) for path, m in modules}
  fields = []
  for conv in convs:
    key = paths.get(id(conv), ())
    off = _sown_value(flat.get(key + ('offsets',)))
    msk = _sown_value(flat.get(key + ('mask',)))
    kh, kw = tuple(conv.kernel_size)
    taps = kh * kw
    fields.append(LayerField(
        name='.'.join(key), kernel_size=(kh, kw), dilation=_pair(getattr(conv, 'kernel_dilation', 1) or 1),
        padding=_pads(conv),
        offsets=None if off is None else off[..., :2 * taps],  # offset group 0
        mask=None if msk is None else msk[..., :taps]))
  return fields


def tap_grid(kernel_size: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int]) -> np.ndarray:
  """`[kh*kw, 2]` (dy, dx) of the regular taps relative to the output position."""
  kh, kw = kernel_size
  ii, jj = np.meshgrid(np.arange(kh), np.arange(kw), indexing='ij')
  return np.stack([ii.reshape(-1) * dilation[0] - padding[0], jj.reshape(-1) * dilation[1] - padding[1]], -1)


def trace_sampling_points(fields: Sequence[LayerField], start_yx: tuple[float, float], image_index: int = 0,
                          deformed: bool = True) -> list[np.ndarray]:
  """Sampling points reached from one output activation back through stacked layers.

  Args:
    fields: layers in forward order, all stride 1 at one resolution (e.g. the
      last three convs of `ConvClassifier`); the trace starts at the last.
    start_yx: (y, x) position in the last layer's output.
    image_index: which image of the batch.
    deformed: use the learned offsets (False: the regular grid).

  Returns:
    list, one `[9**d, 2]` array per depth d = 1..len(fields), of (y, x) in the
    input coordinates of the layer reached (9, 81, 729 points for 3x3 kernels).
    Offsets at fractional positions are read bilinearly from the offset field.
  """
  points = np.asarray([start_yx], np.float64)
  out = []
  for f in reversed(fields):
    grid = tap_grid(f.kernel_size, f.dilation, f.padding)  # [K, 2]
    if deformed and f.offsets is not None:
      field = jnp.asarray(f.offsets[image_index][None], jnp.float32)  # [1, Ho, Wo, 2K]
      off = np.asarray(bilinear_sample(field, jnp.asarray(points[None], jnp.float32)))[0]
      off = off.reshape(len(points), -1, 2)
    else:
      off = np.zeros((len(points), len(grid), 2))
    points = (points[:, None, :] + grid[None] + off).reshape(-1, 2)
    out.append(points)
  return out


def effective_dilation(field: LayerField, image_index: int = 0, where: np.ndarray | None = None) -> float:
  """Mean distance between adjacent taps (DCN paper): 1.0 x dilation for a regular conv.

  Args:
    field: one layer.
    where: optional bool `[Ho, Wo]` selecting the output positions averaged
      (e.g. positions on the object); default all.
  """
  kh, kw = field.kernel_size
  grid = tap_grid(field.kernel_size, field.dilation, field.padding).reshape(kh, kw, 2).astype(np.float64)
  if field.offsets is None:
    pts = np.broadcast_to(grid, (1, 1, kh, kw, 2))
  else:
    off = field.offsets[image_index].reshape(field.offsets.shape[1], field.offsets.shape[2], kh, kw, 2)
    pts = grid[None, None] + off
  dists = []
  if kw > 1:
    dists.append(np.linalg.norm(pts[:, :, :, 1:] - pts[:, :, :, :-1], axis=-1).reshape(*pts.shape[:2], -1))
  if kh > 1:
    dists.append(np.linalg.norm(pts[:, :, 1:] - pts[:, :, :-1], axis=-1).reshape(*pts.shape[:2], -1))
  per_position = np.concatenate(dists, -1).mean(-1)  # [Ho, Wo]
  if where is not None and field.offsets is not None:
    per_position = per_position[np.asarray(where, bool)] if np.any(where) else per_position
  return float(np.mean(per_position))


__all__ = ['LayerField', 'effective_dilation', 'layer_fields', 'tap_grid', 'trace_sampling_points']
