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
