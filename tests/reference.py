"""float64 references written straight from the formulas, with plain loops.

They share no code with deformjax: they are the oracle the ops are tested against.
"""

from __future__ import annotations

import math

import numpy as np


def bilinear_point(img: np.ndarray, y: float, x: float) -> np.ndarray:
  """torchvision's bilinear_interpolate for one point of an [H, W, C] image."""
  h, w, c = img.shape
  out = np.zeros(c, np.float64)
  if not (math.isfinite(y) and math.isfinite(x)) or y <= -1 or y >= h or x <= -1 or x >= w:
    return out
  y0, x0 = math.floor(y), math.floor(x)
  ly, lx = y - y0, x - x0
  for yy, xx, wt in (
      (y0, x0, (1 - ly) * (1 - lx)),
      (y0, x0 + 1, (1 - ly) * lx),
      (y0 + 1, x0, ly * (1 - lx)),
      (y0 + 1, x0 + 1, ly * lx),
  ):
    if 0 <= yy < h and 0 <= xx < w:
      out += wt * img[yy, xx].astype(np.float64)
  return out


def bilinear_sample_ref(images: np.ndarray, coords: np.ndarray) -> np.ndarray:
  """images [B, H, W, C], coords [B, P, 2] -> [B, P, C]."""
  b, p = coords.shape[:2]
  out = np.zeros((b, p, images.shape[-1]))
  for i in range(b):
    for j in range(p):
      out[i, j] = bilinear_point(images[i], float(coords[i, j, 0]), float(coords[i, j, 1]))
  return out


def deform_conv2d_ref(
    x, offsets, kernel, mask=None, bias=None, *, stride=(1, 1), pads=((0, 0), (0, 0)), dilation=(1, 1),
    groups=1, offset_groups=1,
):
  """DCNv2 from its definition: out = sum_k w_k * m_k * x(p0 + p_k + dp_k) (+ bias)."""
  x = np.asarray(x, np.float64)
  offsets = np.asarray(offsets, np.float64)
  kernel = np.asarray(kernel, np.float64)
  n, h, w, c = x.shape
  kh, kw, cin_g, cout = kernel.shape
  (pt, pb), (pl, pr) = pads
  sh, sw = stride
  dh, dw = dilation
  ho = (h + pt + pb - ((kh - 1) * dh + 1)) // sh + 1
  wo = (w + pl + pr - ((kw - 1) * dw + 1)) // sw + 1
  taps = kh * kw
  cg = c // offset_groups
  og_out = cout // groups
  out = np.zeros((n, ho, wo, cout))
  for b in range(n):
    for oy in range(ho):
      for ox in range(wo):
        cols = np.zeros((kh, kw, c))
        for i in range(kh):
          for j in range(kw):
            k = i * kw + j
            for g in range(offset_groups):
              dy = offsets[b, oy, ox, (g * taps + k) * 2]
              dx = offsets[b, oy, ox, (g * taps + k) * 2 + 1]
              y = oy * sh - pt + i * dh + dy
              xx = ox * sw - pl + j * dw + dx
              m = 1.0 if mask is None else float(mask[b, oy, ox, g * taps + k])
              cols[i, j, g * cg:(g + 1) * cg] = m * bilinear_point(x[b, :, :, g * cg:(g + 1) * cg], y, xx)
        for gr in range(groups):
          patch = cols[:, :, gr * cin_g:(gr + 1) * cin_g]
          wk = kernel[:, :, :, gr * og_out:(gr + 1) * og_out]
          out[b, oy, ox, gr * og_out:(gr + 1) * og_out] = np.einsum('ijc,ijco->o', patch, wk)
  if bias is not None:
    out += np.asarray(bias, np.float64)
  return out


def roi_bilinear_point(img: np.ndarray, y: float, x: float) -> np.ndarray:
  """torchvision roi_align's bilinear_interpolate (clamps onto the border)."""
  h, w, c = img.shape
  if not (math.isfinite(y) and math.isfinite(x)) or y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(c)
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_high = y_low = h - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_high = x_low = w - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1 - ly, 1 - lx
  return (hy * hx * img[y_low, x_low] + hy * lx * img[y_low, x_high] + ly * hx * img[y_high, x_low]
          + ly * lx * img[y_high, x_high])


def deform_roi_pool_ref(features, rois, offsets=None, *, output_size, spatial_scale=1.0, sampling_ratio=0,
                        gamma=0.1, aligned=True):
  """torchvision roi_align's loops, each bin shifted by gamma * offset * roi size (DCN / mmcv)."""
  features = np.asarray(features, np.float64)
  rois = np.asarray(rois, np.float64)
  n, h, w, c = features.shape
  oh, ow = output_size
  out = np.zeros((rois.shape[0], oh, ow, c))
  for r, (b, x1, y1, x2, y2) in enumerate(rois):
    if not (b == int(b) and 0 <= b < n):
      continue
    shift = 0.5 if aligned else 0.0
    start_w, start_h = x1 * spatial_scale - shift, y1 * spatial_scale - shift
    roi_w, roi_h = x2 * spatial_scale - shift - start_w, y2 * spatial_scale - shift - start_h
    if not aligned:
      roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / oh, roi_w / ow
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / oh)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / ow)
    count = max(grid_h * grid_w, 1)
    for ph in range(oh):
      for pw in range(ow):
        dy = dx = 0.0
        if offsets is not None:
          dy = gamma * roi_h * float(offsets[r, ph, pw, 0])
          dx = gamma * roi_w * float(offsets[r, ph, pw, 1])
        acc = np.zeros(c)
        for iy in range(grid_h):
          y = start_h + dy + ph * bin_h + (iy + 0.5) * bin_h / grid_h
          for ix in range(grid_w):
            x = start_w + dx + pw * bin_w + (ix + 0.5) * bin_w / grid_w
            acc += roi_bilinear_point(features[int(b)], y, x)
        out[r, ph, pw] = acc / count
  return out


def dcnv3_ref(x, offsets, mask, *, kernel=(3, 3), stride=(1, 1), pads=(0, 0), dilation=(1, 1), groups=1,
              offset_scale=1.0, remove_center=False):
  """DCNv3 from the CUDA kernel's definition: for group g and x-major tap (i over kw, j over kh),
  loc_x = cx - pad_w + wo*sw - cx*s + (i*dw + dx)*s (cx = (dw*(kw-1))//2), the same in y; out = sum mask * x(loc)."""
  x = np.asarray(x, np.float64)
  offsets = np.asarray(offsets, np.float64)
  mask = np.asarray(mask, np.float64)
  n, h, w, c = x.shape
  kh, kw = kernel
  sh, sw = stride
  ph, pw = pads
  dh, dw = dilation
  ho = (h + 2 * ph - ((kh - 1) * dh + 1)) // sh + 1
  wo = (w + 2 * pw - ((kw - 1) * dw + 1)) // sw + 1
  cy, cx = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
  taps = [(i, j) for i in range(kw) for j in range(kh) if not (remove_center and i == kw // 2 and j == kh // 2)]
  p = len(taps)
  cg = c // groups
  out = np.zeros((n, ho, wo, c))
  for b in range(n):
    for oy in range(ho):
      for ox in range(wo):
        for g in range(groups):
          acc = np.zeros(cg)
          for t, (i, j) in enumerate(taps):
            dx = offsets[b, oy, ox, (g * p + t) * 2]
            dy = offsets[b, oy, ox, (g * p + t) * 2 + 1]
            lx = cx - pw + ox * sw - cx * offset_scale + (i * dw + dx) * offset_scale
            ly = cy - ph + oy * sh - cy * offset_scale + (j * dh + dy) * offset_scale
            acc += mask[b, oy, ox, g * p + t] * bilinear_point(x[b, :, :, g * cg:(g + 1) * cg], ly, lx)
          out[b, oy, ox, g * cg:(g + 1) * cg] = acc
  return out


def dcnv4_split(offset_mask, groups, points):
  """DCNv4's packed offset_mask -> DCNv3's (offsets, mask): per group `points*2` offsets then `points` mask values."""
  om = np.asarray(offset_mask)
  om = om[..., :groups * points * 3].reshape(om.shape[:3] + (groups, points * 3))
  offsets = om[..., :points * 2].reshape(om.shape[:3] + (groups * points * 2,))
  return offsets, om[..., points * 2:].reshape(om.shape[:3] + (groups * points,))


def ms_deform_attn_ref(value, spatial_shapes, locations, weights):
  """Deformable DETR's attention from its definition: out[n, q, m*D:(m+1)*D] = sum_{l,p} a * value_l(loc*size - 0.5)."""
  value = np.asarray(value, np.float64)
  locations = np.asarray(locations, np.float64)
  weights = np.asarray(weights, np.float64)
  n, _, heads, d = value.shape
  lq, points = locations.shape[1], locations.shape[4]
  out = np.zeros((n, lq, heads * d))
  start = 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    level = value[:, start:start + h * w].reshape(n, h, w, heads, d)
    start += h * w
    for b in range(n):
      for q in range(lq):
        for m in range(heads):
          for p in range(points):
            lx, ly = locations[b, q, m, lvl, p]
            out[b, q, m * d:(m + 1) * d] += weights[b, q, m, lvl, p] * bilinear_point(
                level[b, :, :, m], ly * h - 0.5, lx * w - 0.5)
  return out
