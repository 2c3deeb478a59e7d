"""deform_conv2d against the float64 loop reference and lax.conv over every geometry, its gradients, memory and
arguments. The transforms, batch 0, half precision, hostile offsets and export that every sampling op shares are
tested once for all of them in test_family.py (deform_conv2d is in its table of ops)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from deformjax.ops import columns_bytes, deform_conv2d
from tests.reference import deform_conv2d_ref


@dataclasses.dataclass(frozen=True)
class Case:
  n: int = 2
  hw: tuple = (6, 5)
  c: int = 4
  cout: int = 6
  k: tuple = (3, 3)
  stride: object = 1
  padding: object = 1
  dilation: object = 1
  groups: int = 1
  offset_groups: int = 1
  mask: bool = True
  bias: bool = True

  def __str__(self):
    return '-'.join(f'{f.name}={getattr(self, f.name)}' for f in dataclasses.fields(self)).replace(' ', '')


CASES = [
    Case(),
    Case(mask=False, bias=False),
    Case(k=(1, 1), padding=0),
    Case(k=(2, 3), padding=(1, 0)),
    Case(k=(3, 1), padding=((0, 2), (1, 0))),
    Case(stride=2),
    Case(stride=(2, 1), padding='SAME'),
    Case(padding='VALID', hw=(7, 6)),
    Case(padding='SAME', stride=3, hw=(8, 7)),
    Case(dilation=2, padding=2),
    Case(dilation=(1, 2), padding=(1, 2), stride=(1, 2)),
    Case(groups=2),
    Case(offset_groups=2),
    Case(groups=2, offset_groups=4, c=8, cout=4),
    Case(groups=4, offset_groups=2, c=8, cout=8, stride=2, dilation=2, padding=2, k=(3, 2)),
    Case(n=0),
    Case(n=33, hw=(4, 4), c=2, cout=3),
    Case(n=1, hw=(1, 1), padding=1),
]


def explicit_pads(case: Case):
  pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
  stride, dilation = pair(case.stride), pair(case.dilation)
  if isinstance(case.padding, str):
    window = tuple((k - 1) * d + 1 for k, d in zip(case.k, dilation))
    return tuple(tuple(p) for p in lax.padtype_to_pads(case.hw, window, stride, case.padding))
  if isinstance(case.padding, int):
    return ((case.padding,) * 2,) * 2
  if isinstance(case.padding[0], int):
    return tuple((p, p) for p in case.padding)
  return case.padding


def make_inputs(case: Case, dtype=jnp.float64, offset_scale=3.0, seed=0):
  pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
  stride, dilation = pair(case.stride), pair(case.dilation)
  pads = explicit_pads(case)
  ho, wo = (
      (s + p[0] + p[1] - ((k - 1) * d + 1)) // st + 1
      for s, p, k, d, st in zip(case.hw, pads, case.k, dilation, stride)
  )
  taps = case.k[0] * case.k[1]
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(case.n, *case.hw, case.c))
  # Offsets up to +-3 pixels push many taps outside the 6x5 image.
  off = rng.uniform(-offset_scale, offset_scale, size=(case.n, ho, wo, case.offset_groups * taps * 2))
  w = rng.normal(size=(*case.k, case.c // case.groups, case.cout)) / np.sqrt(taps * case.c)
  m = rng.uniform(-0.5, 1.5, size=(case.n, ho, wo, case.offset_groups * taps)) if case.mask else None
  b = rng.normal(size=(case.cout,)) if case.bias else None
  cast = lambda a: None if a is None else jnp.asarray(a, dtype)
  return cast(x), cast(off), cast(w), cast(m), cast(b), dict(stride=stride, pads=pads, dilation=dilation)


def op_kwargs(case: Case):
  return dict(
      strides=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups,
      offset_groups=case.offset_groups,
  )


@pytest.mark.parametrize('case', CASES, ids=str)
def test_matches_float64_reference(case):
  x, off, w, m, b, geo = make_inputs(case)
  want = deform_conv2d_ref(x, off, w, m, b, groups=case.groups, offset_groups=case.offset_groups, **geo)
  got = jax.jit(lambda *a: deform_conv2d(*a, **op_kwargs(case)))(x, off, w, m, b)
  assert got.dtype == jnp.float64
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('case', CASES, ids=str)
def test_float32_matches_reference(case):
  x, off, w, m, b, geo = make_inputs(case, jnp.float32)
  want = deform_conv2d_ref(x, off, w, m, b, groups=case.groups, offset_groups=case.offset_groups, **geo)
  got = jax.jit(lambda *a: deform_conv2d(*a, **op_kwargs(case), precision='highest'))(x, off, w, m, b)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', CASES, ids=str)
def test_zero_offsets_unit_mask_equal_conv(case):
  x, off, w, m, b, _ = make_inputs(case)
  off = jnp.zeros_like(off)
  m = None if m is None else jnp.ones_like(m)
  got = deform_conv2d(x, off, w, m, b, **op_kwargs(case))
  want = lax.conv_general_dilated(
      x, w, window_strides=(case.stride,) * 2 if isinstance(case.stride, int) else case.stride,
      padding=explicit_pads(case), rhs_dilation=(case.dilation,) * 2 if isinstance(case.dilation, int) else case.dilation,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=case.groups, precision='highest',
  )
  if b is not None:
    want = want + b.reshape(1, 1, 1, -1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('chunk_size', [1, 7, 50, 10_000])
def test_chunk_size_does_not_change_result(chunk_size):
  case = Case(n=3)
  x, off, w, m, b, _ = make_inputs(case)
  want = deform_conv2d(x, off, w, m, b, **op_kwargs(case))
  got = deform_conv2d(x, off, w, m, b, **op_kwargs(case), chunk_size=chunk_size)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)


def away_from_integers(off, seed=1):
  """Offsets whose sampling points sit >= 0.2 px from any integer (the kinks of bilinear)."""
  rng = np.random.default_rng(seed)
  whole = rng.integers(-2, 3, size=off.shape)
  return jnp.asarray(whole + rng.uniform(0.2, 0.8, size=off.shape), off.dtype)


# The plain case is in the slow tier: its order-1 gradients are test_family.py's (deform_conv2d row, fast), its
# order-2 ones that file's slow test; the strided, dilated, grouped case stays fast.
GRAD_CASES = [
    pytest.param(Case(n=1, hw=(4, 4), c=2, cout=2), marks=pytest.mark.slow),
    Case(n=2, hw=(5, 4), c=4, cout=2, k=(2, 3), stride=2, dilation=(2, 1), padding=((1, 0), (2, 1)),
         groups=2, offset_groups=2),
]


@pytest.mark.parametrize('case', GRAD_CASES, ids=str)
def test_gradients_order2_fwd_and_rev(case):
  x, off, w, m, b, _ = make_inputs(case)
  off = away_from_integers(off)
  f = jax.jit(lambda *a: deform_conv2d(*a, **op_kwargs(case), chunk_size=5))
  check_grads(f, (x, off, w, m, b), order=2, modes=('fwd', 'rev'), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_gradients_without_mask_and_bias():
  case = Case(n=1, hw=(4, 4), c=2, cout=2, mask=False, bias=False)
  x, off, w, _, _, _ = make_inputs(case)
  off = away_from_integers(off)
  check_grads(jax.jit(lambda *a: deform_conv2d(*a, padding=1)), (x, off, w), order=2, modes=('fwd', 'rev'))


def test_vmap_over_offsets_only():
  case = Case(n=2)
  x, off, w, m, b, _ = make_inputs(case)
  offs = jnp.stack([off, -off, 0.5 * off])
  got = jax.vmap(lambda o: deform_conv2d(x, o, w, m, b, padding=1))(offs)
  for i in range(3):
    np.testing.assert_allclose(np.asarray(got[i]), np.asarray(deform_conv2d(x, offs[i], w, m, b, padding=1)))


def test_half_inputs_with_a_float32_result():
  """`preferred_element_type=float32` returns float32 from bf16 inputs (the samples stay bf16, the contraction
  accumulates and returns float32), within one bf16 rounding of the float32 op on the same rounded inputs (the
  half-precision result itself, and its gradients: test_family.py::test_half_precision_...)."""
  x, off, w, m, b, _ = make_inputs(Case(n=1, c=8, cout=8), jnp.bfloat16)
  f32 = jax.jit(lambda *a: deform_conv2d(*a, padding=1, preferred_element_type=jnp.float32))(x, off, w, m, b)
  assert f32.dtype == jnp.float32
  want = np.asarray(deform_conv2d(*(a.astype(jnp.float32) for a in (x, off, w, m, b)), padding=1))
  eps = float(jnp.finfo(jnp.bfloat16).eps)
  np.testing.assert_allclose(np.asarray(f32), want, rtol=0, atol=eps * np.abs(want).max())


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_input_gradient_accumulates_in_float32(dtype):
  """Every tap of every output pixel samples the same 2x2 input patch, so each of
  those input pixels sums 16*16*9 gradient contributions. Accumulated in bf16 the
  sum would be off by far more than one bf16 rounding; it must not be."""
  hw, c = 16, 4
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, hw, hw, c))
  w = np.abs(rng.normal(size=(3, 3, c, c))) / 6  # one sign: no cancellation in the sums
  oy, ox = np.meshgrid(np.arange(hw), np.arange(hw), indexing='ij')
  ti, tj = np.divmod(np.arange(9), 3)
  off = np.zeros((1, hw, hw, 9, 2))
  off[..., 0] = 8.25 - (oy[..., None] - 1 + ti)
  off[..., 1] = 8.5 - (ox[..., None] - 1 + tj)
  off = off.reshape(1, hw, hw, 18)
  grad_x = lambda dt: jax.grad(
      lambda x: jnp.sum(deform_conv2d(x, jnp.asarray(off, dt), jnp.asarray(w, dt), padding=1).astype(jnp.float32))
  )(jnp.asarray(x, dt))
  want = np.asarray(grad_x(jnp.float64))
  got = np.asarray(grad_x(dtype).astype(jnp.float64))
  assert np.abs(want[0, 8:10, 8:10]).min() > 100  # thousands of contributions each
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-3 * np.abs(want).max())


def test_bf16_offsets_keep_float32_positions():
  """Positions are computed in float32: bf16 cannot represent 257.5, float32 can."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 300, 300, 1)), jnp.float32)
  w = jnp.ones((1, 1, 1, 1), jnp.float32)
  off = jnp.full((1, 300, 300, 2), 0.5, jnp.bfloat16)
  out = deform_conv2d(x, off, w)
  want = 0.25 * (x[0, 257, 257, 0] + x[0, 257, 258, 0] + x[0, 258, 257, 0] + x[0, 258, 258, 0])
  np.testing.assert_allclose(float(out[0, 257, 257, 0]), float(want), rtol=1e-6)


@pytest.mark.parametrize('case', [Case(offset_groups=2), Case(groups=2, offset_groups=4, c=8, cout=4)], ids=str)
def test_offset_groups_inferred_from_the_offsets(case):
  """torchvision's rule: offset_groups = offsets channels / (2*kh*kw) when not given."""
  x, off, w, m, b, _ = make_inputs(case)
  kw = op_kwargs(case)
  want = deform_conv2d(x, off, w, m, b, **kw)
  del kw['offset_groups']
  np.testing.assert_array_equal(np.asarray(deform_conv2d(x, off, w, m, b, **kw)), np.asarray(want))


def test_chunk_size_caps_compiled_temporary_memory():
  """Compiled temporaries follow the chunk, not the whole sampled-columns buffer.

  Forward: the inputs/outputs, the corner rows and weights (8 numbers per sample
  point, 1/8 of the columns here) plus about one chunk of columns.
  Forward+backward: twice the inputs/outputs (their cotangents), the corner
  arrays and their weight cotangents, plus about 12 chunks of columns (the
  rematerialised corner gathers, their scatters, columns and cotangent).
  """
  n, hw, c, cout = 8, 32, 64, 16
  x = jnp.zeros((n, hw, hw, c), jnp.float32)
  off = jnp.zeros((n, hw, hw, 18), jnp.float32)
  m = jnp.ones((n, hw, hw, 9), jnp.float32)
  w = jnp.zeros((3, 3, c, cout), jnp.float32)
  full_columns = n * hw * hw * 9 * c * 4  # 18.9 MB
  io_bytes = (x.size + off.size + m.size + n * hw * hw * cout) * 4  # 3.5 MB
  corner_bytes = n * hw * hw * 9 * 8 * 4  # 2.4 MB

  def temp_bytes(chunk, grad):
    fwd = lambda x, o, m, w: deform_conv2d(x, o, w, m, padding=1, chunk_size=chunk)
    f = jax.grad(lambda *a: jnp.sum(fwd(*a) ** 2), argnums=(0, 1, 2, 3)) if grad else fwd
    return jax.jit(f).lower(x, off, m, w).compile().memory_analysis().temp_size_in_bytes

  for chunk in (64, 256):
    cap = columns_bytes(x.shape, w.shape, off.shape, chunk_size=chunk)
    assert cap == chunk * 9 * c * 4
    fwd_temp = temp_bytes(chunk, grad=False)
    assert fwd_temp <= io_bytes + corner_bytes + 2 * cap, (chunk, fwd_temp, cap)
    bwd_temp = temp_bytes(chunk, grad=True)
    assert bwd_temp <= 2 * io_bytes + 1.5 * corner_bytes + 16 * cap, (chunk, bwd_temp, cap)
  assert temp_bytes(64, grad=True) < full_columns
  # The cap is what bounds it: one chunk over all pixels holds the whole buffer.
  assert temp_bytes(n * hw * hw, grad=False) >= full_columns


BAD = [
    (dict(inputs=np.zeros((6, 6, 4))), 'inputs must have rank 4'),
    (dict(kernel=np.zeros((3, 3, 4))), 'kernel must have rank 4'),
    (dict(kernel=np.zeros((3, 3, 3, 6))), r'kernel must have shape \[kh, kw, C // groups, C_out\]'),
    (dict(offsets=np.zeros((2, 6, 6, 17))), r'offsets must have shape .* 17 channels are not a positive multiple of '
                                            r'2\*kh\*kw = 18'),
    (dict(offsets=np.zeros((2, 6, 6, 17)), offset_groups=1),
     r'offsets must have shape .*\(2, 6, 6, 18\), got \(2, 6, 6, 17\)'),
    (dict(offsets=np.zeros((2, 6, 6, 36)), mask=np.zeros((2, 6, 6, 9))),
     r'mask must have shape .*\(2, 6, 6, 18\), got \(2, 6, 6, 9\)'),
    (dict(offsets=np.zeros((2, 6, 6))), r'offsets must have shape'),
    (dict(mask=np.zeros((2, 6, 6, 18))), r'mask must have shape .*\(2, 6, 6, 9\)'),
    (dict(bias=np.zeros((5,))), r'bias must have shape \[C_out\] = \(6,\), got \(5,\)'),
    (dict(groups=3), 'divisible by groups=3'),
    (dict(offset_groups=3), 'divisible by offset_groups=3'),
    (dict(groups=0), 'groups must be a positive int'),
    (dict(strides=0), 'strides must be positive'),
    (dict(dilation=(1, -1)), 'dilation must be positive'),
    (dict(padding='FULL'), 'padding must be'),
    (dict(padding=-1), 'padding must be non-negative'),
    (dict(chunk_size=0), 'chunk_size must be a positive int'),
    (dict(inputs=np.zeros((2, 6, 6, 4), np.int32)), 'inputs must be a floating-point array'),
    (dict(kernel=np.zeros((9, 9, 4, 6)), offsets=np.zeros((2, 0, 0, 162))), 'smaller than the dilated kernel'),
]


@pytest.mark.parametrize('override,message', BAD, ids=[m for _, m in BAD])
def test_bad_input_names_the_argument(override, message):
  args = dict(inputs=np.zeros((2, 6, 6, 4)), offsets=np.zeros((2, 6, 6, 18)), kernel=np.zeros((3, 3, 4, 6)),
              mask=None, bias=None, padding=1)
  args.update(override)
  exc = TypeError if 'floating' in message else ValueError
  with pytest.raises(exc, match=message):
    deform_conv2d(**args)
