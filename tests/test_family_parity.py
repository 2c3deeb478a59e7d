"""dcnv3 / dcnv4 / ms_deform_attn against the PyTorch references users port from, where torch imports.

- DCNv3 and DCNv4: InternImage's pure-PyTorch formulation (`dcnv3_core_pytorch`: reference points and a
  dilation grid normalised to the padded input, then `grid_sample(align_corners=False, padding_mode='zeros')`),
  written out below in torch since InternImage is not installable from PyPI. It pads W by pad_h and H by pad_w,
  so it is compared with equal paddings only, where it agrees with the CUDA kernels our ops follow.
- Multi-scale deformable attention: transformers' `MultiScaleDeformableAttention` (its pure-PyTorch path), imported.

Forward and every gradient agree to 1e-5 relative in float32. Skipped (never faked) where torch is missing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformjax.ops import dcnv3, dcnv4, ms_deform_attn, offset_mask_channels

torch = pytest.importorskip('torch', exc_type=ImportError)
from references.torch_reference import dcnv3_grid_sample, msda_transformers  # noqa: E402


def assert_close(got, want, rtol=1e-5):
  """Relative to the largest magnitude of the reference: elementwise relative error is meaningless near 0."""
  want = want.detach().numpy() if hasattr(want, 'detach') else np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * max(1e-30, float(np.abs(want).max())))


def check_parity(jax_fn, torch_fn, arrays, seed=0):
  """Forward and the gradient w.r.t. every input (under one random cotangent) of both, float32."""
  arrays = [np.asarray(a, np.float32) for a in arrays]
  out, vjp = jax.vjp(jax_fn, *(jnp.asarray(a) for a in arrays))
  cot = np.random.default_rng(seed + 100).normal(size=out.shape).astype(np.float32)
  tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
  t_out = torch_fn(*tensors)
  t_grads = torch.autograd.grad(t_out, tensors, torch.tensor(cot))
  assert_close(out, t_out)
  for g, tg in zip(vjp(jnp.asarray(cot)), t_grads):
    assert_close(g, tg)


DCN_CASES = [
    dict(kernel=(3, 3), stride=1, pad=1, dilation=1, groups=2, offset_scale=1.0, remove_center=False),
    dict(kernel=(3, 3), stride=2, pad=1, dilation=2, groups=4, offset_scale=2.0, remove_center=False),
    dict(kernel=(3, 3), stride=1, pad=0, dilation=1, groups=1, offset_scale=0.5, remove_center=True),
    dict(kernel=(5, 5), stride=1, pad=2, dilation=1, groups=2, offset_scale=1.0, remove_center=True),
    dict(kernel=(1, 3), stride=1, pad=1, dilation=1, groups=2, offset_scale=1.0, remove_center=False),
]


def dcn_problem(case, n=2, hw=(7, 6), c=8, seed=0):
  rng = np.random.default_rng(seed)
  kh, kw = case['kernel']
  d, s, p = case['dilation'], case['stride'], case['pad']
  ho, wo = ((size + 2 * p - (d * (k - 1) + 1)) // s + 1 for size, k in zip(hw, (kh, kw)))
  points = kh * kw - int(case['remove_center'])
  g = case['groups']
  return (rng.normal(size=(n, *hw, c)), rng.uniform(-3, 3, size=(n, ho, wo, g * points * 2)),
          rng.uniform(0, 1, size=(n, ho, wo, g * points)))


def ours_kwargs(case):
  return dict(kernel_size=case['kernel'], strides=case['stride'], padding=case['pad'], dilation=case['dilation'],
              groups=case['groups'], offset_scale=case['offset_scale'], remove_center=case['remove_center'])


@pytest.mark.parametrize('case', DCN_CASES, ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()).replace(' ', ''))
def test_dcnv3_matches_internimage_grid_sample(case):
  check_parity(lambda x, o, m: dcnv3(x, o, m, **ours_kwargs(case)),
               lambda x, o, m: dcnv3_grid_sample(x, o, m, **case), dcn_problem(case))


@pytest.mark.parametrize('case', DCN_CASES[:2], ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()).replace(' ', ''))
def test_dcnv4_matches_internimage_grid_sample_on_the_split_offset_mask(case):
  x, off, m = dcn_problem(case)
  g = case['groups']
  points = case['kernel'][0] * case['kernel'][1] - int(case['remove_center'])
  n, ho, wo = off.shape[:3]
  packed = np.concatenate([off.reshape(n, ho, wo, g, points * 2), m.reshape(n, ho, wo, g, points)], -1)
  packed = packed.reshape(n, ho, wo, -1)
  om = np.concatenate([packed, np.zeros((n, ho, wo, offset_mask_channels(g, points) - packed.shape[-1]))], -1)

  def torch_dcnv4(x, om):
    per_group = om[..., :g * points * 3].reshape(n, ho, wo, g, points * 3)
    return dcnv3_grid_sample(x, per_group[..., :points * 2].reshape(n, ho, wo, -1),
                             per_group[..., points * 2:].reshape(n, ho, wo, -1), **case)

  check_parity(lambda x, om: dcnv4(x, om, **ours_kwargs(case)), torch_dcnv4, (x, om))


@pytest.mark.parametrize('shapes', [((6, 5), (3, 3)), ((8, 8), (4, 4), (2, 2), (1, 1))], ids=str)
def test_ms_deform_attn_matches_transformers(shapes):
  reference = msda_transformers()
  if reference is None:
    pytest.skip('transformers is not importable')
  rng = np.random.default_rng(1)
  n, lq, heads, d, points = 2, 9, 4, 8, 4
  value = rng.normal(size=(n, sum(h * w for h, w in shapes), heads, d))
  loc = rng.uniform(-0.1, 1.1, size=(n, lq, heads, len(shapes), points, 2))
  attn = rng.uniform(0, 1, size=(n, lq, heads, len(shapes), points))
  check_parity(lambda v, lo, a: ms_deform_attn(v, shapes, lo, a), lambda v, lo, a: reference(v, shapes, lo, a),
               (value, loc, attn))
