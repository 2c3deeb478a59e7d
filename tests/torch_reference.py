"""PyTorch formulations of the deformable family that deformjax's ops are compared with (tests and benchmarks).

- `dcnv3_grid_sample`: InternImage's pure-PyTorch DCNv3 (`dcnv3_core_pytorch`): reference points and a dilation
  grid normalised to the padded input, then `grid_sample(align_corners=False, padding_mode='zeros')`. Re-written
  here since InternImage is not installable from PyPI. Like the original it pads W by pad_h and H by pad_w (the
  CUDA kernels pad H by pad_h), so it matches the ops for equal paddings only.
- `msda_transformers`: transformers' own multi-scale deformable attention (its pure-PyTorch path).

Importing this module needs torch.
"""

from __future__ import annotations

import torch

F = torch.nn.functional


def dcnv3_grid_sample(x, offset, mask, *, kernel, stride, pad, dilation, groups, offset_scale, remove_center):
  """InternImage's dcnv3_core_pytorch formulation; x `[N, H, W, C]`, offset `[N, Ho, Wo, G*P*2]`, mask `[N, Ho, Wo, G*P]`."""
  kh, kw = kernel
  n, _, _, c = x.shape
  x = F.pad(x, [0, 0, pad, pad, pad, pad])  # the reference's order: C, then W by pad_h, then H by pad_w
  _, hp, wp, _ = x.shape
  _, ho, wo, _ = offset.shape
  cy, cx = (dilation * (kh - 1)) // 2, (dilation * (kw - 1)) // 2
  ref_y, ref_x = torch.meshgrid(
      torch.linspace(cy + 0.5, cy + 0.5 + (ho - 1) * stride, ho, dtype=x.dtype, device=x.device),
      torch.linspace(cx + 0.5, cx + 0.5 + (wo - 1) * stride, wo, dtype=x.dtype, device=x.device), indexing='ij')
  ref = torch.stack((ref_x / wp, ref_y / hp), -1).reshape(1, ho, wo, 1, 2)
  gx, gy = torch.meshgrid(  # taps x-major
      torch.linspace(-cx, -cx + (kw - 1) * dilation, kw, dtype=x.dtype, device=x.device),
      torch.linspace(-cy, -cy + (kh - 1) * dilation, kh, dtype=x.dtype, device=x.device), indexing='ij')
  grid = torch.stack((gx / wp, gy / hp), -1).reshape(-1, 1, 2).repeat(1, groups, 1).permute(1, 0, 2)
  points = kh * kw
  if remove_center:
    keep = [t for t in range(points) if t != (points - 1) // 2]
    grid = grid[:, keep]
    points -= 1
  loc = (ref + grid.reshape(1, 1, 1, groups * points, 2) * offset_scale).repeat(n, 1, 1, 1, 1).flatten(3, 4)
  norm = torch.tensor([wp, hp], dtype=x.dtype, device=x.device).repeat(groups * points)
  loc = loc + offset * offset_scale / norm
  cg = c // groups
  value = x.reshape(n, hp * wp, c).transpose(1, 2).reshape(n * groups, cg, hp, wp)
  grids = (2 * loc - 1).reshape(n, ho * wo, groups, points, 2).transpose(1, 2).flatten(0, 1)
  sampled = F.grid_sample(value, grids, mode='bilinear', padding_mode='zeros', align_corners=False)
  weights = mask.reshape(n, ho * wo, groups, points).transpose(1, 2).reshape(n * groups, 1, ho * wo, points)
  out = (sampled * weights).sum(-1).reshape(n, c, ho * wo)
  return out.transpose(1, 2).reshape(n, ho, wo, c)


def msda_transformers():
  """transformers' multi-scale deformable attention as a function of (value, shapes, locations, weights); None where
  transformers does not import."""
  try:
    from transformers.models.deformable_detr import modeling_deformable_detr as detr
  except ImportError:
    return None
  if hasattr(detr, 'multi_scale_deformable_attention'):  # transformers 4.x: a function
    return lambda v, shapes, loc, a: detr.multi_scale_deformable_attention(
        v, torch.tensor(shapes, device=v.device), loc, a)
  module = detr.MultiScaleDeformableAttention()

  def call(v, shapes, loc, a):
    sizes = torch.tensor(shapes, device=v.device)
    start = torch.cat([sizes.new_zeros(1), (sizes[:, 0] * sizes[:, 1]).cumsum(0)[:-1]])
    return module(v, sizes, list(shapes), start, loc, a, 64)

  return call
