"""deform_conv2d == torchvision.ops.deform_conv2d on the same numbers.

Runs wherever torch and torchvision import (the GPU box has both); skipped
elsewhere, never faked.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip('torch', exc_type=ImportError)
torchvision = pytest.importorskip('torchvision', exc_type=ImportError)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from deformjax.ops import deform_conv2d  # noqa: E402

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'

CASES = [
    dict(stride=1, padding=1, dilation=1, groups=1, offset_groups=1, mask=True),
    dict(stride=2, padding=(1, 0), dilation=1, groups=1, offset_groups=1, mask=False),
    dict(stride=1, padding=2, dilation=2, groups=2, offset_groups=2, mask=True),
    dict(stride=(2, 1), padding=(0, 1), dilation=(1, 2), groups=1, offset_groups=4, mask=True),
]


def rel_l2(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


# float32 at precision='highest' (JAX's default runs float32 contractions in TF32
# on recent NVIDIA GPUs, ~3e-4; torchvision's kernel does not); float64 exact.
TOLERANCE = {'float64': 1e-12, 'float32': 1e-5}


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
@pytest.mark.parametrize('case', CASES, ids=str)
def test_parity_forward_and_gradients(case, dtype):
  rng = np.random.default_rng(0)
  n, c, h, w, cout, kh, kw = 2, 8, 9, 7, 6, 3, 3
  x = rng.normal(size=(n, c, h, w))
  weight = rng.normal(size=(cout, c // case['groups'], kh, kw)) * 0.2
  bias = rng.normal(size=(cout,))
  pair = lambda v: (v, v) if isinstance(v, int) else v
  (sh, sw), (ph, pw), (dh, dw) = pair(case['stride']), pair(case['padding']), pair(case['dilation'])
  ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
  wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
  og = case['offset_groups']
  offset = rng.uniform(-3, 3, size=(n, 2 * og * kh * kw, ho, wo))
  mask = rng.uniform(0, 1, size=(n, og * kh * kw, ho, wo)) if case['mask'] else None
  cot = rng.normal(size=(n, cout, ho, wo))

  tdtype = getattr(torch, dtype)
  t = lambda a: None if a is None else torch.tensor(a, dtype=tdtype, device=DEVICE, requires_grad=True)
  tx, tw, tb, toff, tm = t(x), t(weight), t(bias), t(offset), t(mask)
  tout = torchvision.ops.deform_conv2d(tx, toff, tw, tb, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), mask=tm)
  tout.backward(torch.tensor(cot, dtype=tdtype, device=DEVICE))

  nhwc = lambda a: None if a is None else jnp.asarray(np.transpose(a, (0, 2, 3, 1)), dtype)
  args = (nhwc(x), nhwc(offset), jnp.asarray(np.transpose(weight, (2, 3, 1, 0)), dtype), nhwc(mask),
          jnp.asarray(bias, dtype))
  f = lambda *a: deform_conv2d(*a, strides=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=case['groups'],
                               offset_groups=og, precision='highest')
  out, vjp = jax.vjp(f, *args)
  tol = TOLERANCE[dtype]
  back = lambda g: g.grad.detach().cpu().numpy()
  assert rel_l2(out, tout.detach().cpu().numpy().transpose(0, 2, 3, 1)) < tol
  gx, goff, gw, gm, gb = vjp(jnp.asarray(cot.transpose(0, 2, 3, 1), dtype))
  assert rel_l2(gx, back(tx).transpose(0, 2, 3, 1)) < tol
  assert rel_l2(goff, back(toff).transpose(0, 2, 3, 1)) < tol
  assert rel_l2(gw, back(tw).transpose(2, 3, 1, 0)) < tol
  assert rel_l2(gb, back(tb)) < tol
  if mask is not None:
    assert rel_l2(gm, back(tm).transpose(0, 2, 3, 1)) < tol
