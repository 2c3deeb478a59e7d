"""PyTorch formulations of the deformable family that deformjax's ops are compared with (tests and benchmarks).

- `dcnv3_grid_sample`: InternImage's pure-PyTorch DCNv3 (`dcnv3_core_pytorch`): reference points and a dilation
  grid normalised to the padded input, then `grid_sample(align_corners=False, padding_mode='zeros')`. Re-written
  here since InternImage is not installable from PyPI. Like the original it pads W by pad_h and H by pad_w (the
  CUDA kernels pad H by pad_h), so it matches the ops for equal paddings only.
- `msda_transformers`: transformers' own multi-scale deformable attention (its pure-PyTorch path).
- `dcnv4_core_torch`: DCNv4's CUDA forward kernel written with grid_sample, in the signature of the reference
  `DCNv4Function.apply` (the reference has no CPU path for DCNv4); `dcnv4_package` stubs the reference's `DCNv4`
  package with it.

Importing this module needs torch (the package's docstring says where it may be imported).
"""

from __future__ import annotations

import types

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


def dcnv4_core_torch(value, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                     dilation_w, group, group_channels, offset_scale, im2col_step, remove_center):
  """DCNv4's CUDA forward (`forward_kernel_dcn`, softmax off) in PyTorch: `value [N, H, W, G*D]`,
  `offset_mask [N, Ho, Wo, >= G*K*3]` (per group K (x, y) offset pairs then K mask values) -> `[N, Ho, Wo, G*D]`.

  Tap `k` runs over the kernel width outer, height inner; the point of tap (i, j) at output (ho, wo) is
  `w = (dil_w*(kw-1))//2 - pad_w + wo*stride_w - ((dil_w*(kw-1))//2)*offset_scale + (i*dil_w + dx)*offset_scale`
  (h alike); bilinear with out-of-image corners reading 0, which is grid_sample's `align_corners=False`,
  `padding_mode='zeros'` at `(2*w + 1)/W - 1`.
  """
  del im2col_step
  n, h, w, _ = value.shape
  _, ho, wo, _ = offset_mask.shape
  taps = [(i, j) for i in range(kernel_w) for j in range(kernel_h)
          if not (remove_center and i == kernel_w // 2 and j == kernel_h // 2)]
  k = len(taps)
  packed = offset_mask[..., :group * k * 3].reshape(n, ho, wo, group, k * 3)
  off = packed[..., :2 * k].reshape(n, ho, wo, group, k, 2)
  mask = packed[..., 2 * k:]
  cw, ch = (dilation_w * (kernel_w - 1)) // 2, (dilation_h * (kernel_h - 1)) // 2
  dt = value.dtype
  p0w = (cw - pad_w + torch.arange(wo, dtype=dt) * stride_w - cw * offset_scale).reshape(1, 1, wo, 1, 1)
  p0h = (ch - pad_h + torch.arange(ho, dtype=dt) * stride_h - ch * offset_scale).reshape(1, ho, 1, 1, 1)
  ti = torch.tensor([i * dilation_w for i, _ in taps], dtype=dt)
  tj = torch.tensor([j * dilation_h for _, j in taps], dtype=dt)
  x = p0w + (ti + off[..., 0]) * offset_scale
  y = p0h + (tj + off[..., 1]) * offset_scale
  grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], -1)  # n ho wo g k 2
  grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, ho, wo * k, 2)
  planes = value.reshape(n, h, w, group, group_channels).permute(0, 3, 4, 1, 2).reshape(n * group, -1, h, w)
  sampled = F.grid_sample(planes, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
  sampled = sampled.reshape(n, group, group_channels, ho, wo, k)
  out = (sampled * mask.permute(0, 3, 1, 2, 4)[:, :, None]).sum(-1)  # n g d ho wo
  return out.permute(0, 3, 4, 1, 2).reshape(n, ho, wo, group * group_channels)


def dcnv4_package() -> dict[str, types.ModuleType]:
  """`{name: module}` of the `DCNv4` package the reference FlashInternImage imports, its compiled op replaced by
  `dcnv4_core_torch`; the caller installs them in `sys.modules` (for good, or for one test), then loads the
  reference `DCNv4_op/DCNv4/modules/dcnv4.py` as `DCNv4.modules.dcnv4` and sets the package's `DCNv4` to its class."""
  package = types.ModuleType('DCNv4')
  package.__path__ = []
  functions = types.ModuleType('DCNv4.functions')
  functions.DCNv4Function = types.SimpleNamespace(apply=dcnv4_core_torch)
  modules = types.ModuleType('DCNv4.modules')
  modules.__path__ = []
  return {'DCNv4': package, 'DCNv4.functions': functions, 'DCNv4.modules': modules}
