"""What a module returns with `return_sampling=True`: where it sampled, beside its output."""

from __future__ import annotations

from typing import NamedTuple

import jax


class Sampling(NamedTuple):
  """Where a deformable conv or RoI pool sampled: its offsets and mask, in the layout its op takes them.

  Returned as `(output, sampling)` by `DeformConv`, `DCNv3`, `DCNv4` and `DeformRoIPool` (and their Linen twins)
  called with `return_sampling=True`. `DeformConv` also sows both under these names with `sow_offsets=True`.

  Attributes:
    offsets: `DeformConv`: `[..., Ho, Wo, offset_groups*kh*kw*2]`, (dy, dx) pairs in pixels (torchvision's order).
      `DCNv3` / `DCNv4`: `[..., H, W, groups*K*2]`, (x, y) pairs, x-major taps (`deformjax.ops.dcnv3`'s layout;
      DCNv4's split out of its packed `offset_mask`). `DeformRoIPool`: `[R, out_h, out_w, 2]`, normalised (dy, dx).
    mask: `DeformConv`: the DCNv2 modulation `[..., Ho, Wo, offset_groups*kh*kw]`, None when unmodulated and none
      was passed. `DCNv3`: the softmaxed weights `[..., H, W, groups*K]`. `DCNv4`: its unnormalised mask
      `[..., H, W, groups*K]`. `DeformRoIPool`: the per-bin mask `[R, out_h, out_w, 1]`, None when unmodulated.
  """

  offsets: jax.Array
  mask: jax.Array | None


class AttentionSampling(NamedTuple):
  """Where `MSDeformAttn` sampled (returned as `(output, sampling)` with `return_sampling=True`).

  Attributes:
    locations: `[N, Lq, M, L, P, 2]`, (x, y) in [0, 1] (`align_corners=False`), the op's `sampling_locations`.
    weights: `[N, Lq, M, L, P]`, the attention weights after the softmax over `L*P`.
  """

  locations: jax.Array
  weights: jax.Array


__all__ = ['AttentionSampling', 'Sampling']
