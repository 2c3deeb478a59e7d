"""dcnv3 and dcnv4 against the float64 loop reference, a depthwise box filter, and each pinned convention."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from deformjax.ops import dcnv3, dcnv4, offset_mask_channels
from tests.reference import dcnv3_ref, dcnv4_split


@dataclasses.dataclass(frozen=True)
class Case:
  n: int = 2
  hw: tuple = (6, 5)
  c: int = 4
  k: tuple = (3, 3)
  stride: tuple = (1, 1)
  pad: tuple = (1, 1)
  dilation: tuple = (1, 1)
  groups: int = 2
  scale: float = 1.0
  remove_center: bool = False

  def __str__(self):
    return '-'.join(f'{f.name}={getattr(self, f.name)}' for f in dataclasses.fields(self)).replace(' ', '')

  @property
  def points(self):
    return self.k[0] * self.k[1] - int(self.remove_center)

  @property
  def out_hw(self):
    return tuple((s + 2 * p - ((k - 1) * d + 1)) // st + 1
                 for s, p, k, d, st in zip(self.hw, self.pad, self.k, self.dilation, self.stride))

  def kwargs(self):
    return dict(kernel_size=self.k, strides=self.stride, padding=self.pad, dilation=self.dilation, groups=self.groups,
                offset_scale=self.scale, remove_center=self.remove_center)

  def ref_kwargs(self):
    return dict(kernel=self.k, stride=self.stride, pads=self.pad, dilation=self.dilation, groups=self.groups,
                offset_scale=self.scale, remove_center=self.remove_center)


CASES = [
    Case(),
    Case(groups=1, c=3),
    Case(k=(1, 1), pad=(0, 0)),
    Case(k=(2, 3), pad=(1, 0)),
    Case(k=(3, 2), pad=(0, 2), hw=(7, 4)),
    Case(stride=(2, 1)),
    Case(dilation=(2, 1), pad=(2, 1), k=(3, 3)),
    Case(dilation=(2, 3), pad=(2, 3), hw=(8, 9), scale=0.5),
    Case(scale=2.0),
    Case(remove_center=True),
    Case(remove_center=True, k=(5, 5), pad=(2, 2), scale=1.5, groups=4, c=8),
    Case(n=1, hw=(1, 1), pad=(1, 1)),
    Case(n=0),
]


def make_inputs(case: Case, dtype=jnp.float64, spread=3.0, seed=0):
  rng = np.random.default_rng(seed)
  ho, wo = case.out_hw
  x = rng.normal(size=(case.n, *case.hw, case.c))
  off = rng.uniform(-spread, spread, size=(case.n, ho, wo, case.groups * case.points * 2))
  m = rng.uniform(-0.5, 1.5, size=(case.n, ho, wo, case.groups * case.points))
  return tuple(jnp.asarray(a, dtype) for a in (x, off, m))


def pack_dcnv4(off, m, groups, points, fill=7.0):
  """DCNv3's (offsets, mask) packed as DCNv4's offset_mask, the padding channels filled with junk."""
  n, ho, wo = off.shape[:3]
  per_group = jnp.concatenate([off.reshape(n, ho, wo, groups, points * 2), m.reshape(n, ho, wo, groups, points)], -1)
  om = per_group.reshape(n, ho, wo, groups * points * 3)
  pad = offset_mask_channels(groups, points) - om.shape[-1]
  return jnp.concatenate([om, jnp.full((n, ho, wo, pad), fill, om.dtype)], -1)


@pytest.mark.parametrize('case', CASES, ids=str)
def test_dcnv3_matches_float64_reference(case):
  x, off, m = make_inputs(case)
  got = jax.jit(lambda *a: dcnv3(*a, **case.kwargs()))(x, off, m)
  assert got.dtype == jnp.float64 and got.shape == (case.n, *case.out_hw, case.c)
  np.testing.assert_allclose(np.asarray(got), dcnv3_ref(x, off, m, **case.ref_kwargs()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('case', CASES, ids=str)
def test_dcnv4_matches_float64_reference(case):
  x, off, m = make_inputs(case)
  om = pack_dcnv4(off, m, case.groups, case.points)
  np.testing.assert_array_equal(dcnv4_split(om, case.groups, case.points)[0], off)
  got = jax.jit(lambda *a: dcnv4(*a, **case.kwargs()))(x, om)
  np.testing.assert_allclose(np.asarray(got), dcnv3_ref(x, off, m, **case.ref_kwargs()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('case', [CASES[0], CASES[3], CASES[8], CASES[10]], ids=str)
def test_float32_matches_reference(case):
  x, off, m = make_inputs(case, jnp.float32)
  want = dcnv3_ref(x, off, m, **case.ref_kwargs())
  got = dcnv3(x, off, m, **case.kwargs())
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  got4 = dcnv4(x, pack_dcnv4(off, m, case.groups, case.points), **case.kwargs())
  np.testing.assert_allclose(np.asarray(got4), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', [c for c in CASES if c.n], ids=str)
def test_zero_offsets_uniform_mask_is_a_depthwise_box_filter(case):
  """With offset_scale 1 the taps sit on the regular dilated grid: a depthwise conv with weights 1/P
  (0 at the centre with remove_center)."""
  case = dataclasses.replace(case, scale=1.0)
  x, off, m = make_inputs(case)
  got = dcnv3(x, jnp.zeros_like(off), jnp.full_like(m, 1 / case.points), **case.kwargs())
  box = np.full(case.k, 1 / case.points)
  if case.remove_center:
    box[case.k[0] // 2, case.k[1] // 2] = 0.0
  kernel = jnp.asarray(np.broadcast_to(box[:, :, None, None], case.k + (1, case.c)))
  want = lax.conv_general_dilated(x, kernel, case.stride, [(p, p) for p in case.pad], rhs_dilation=case.dilation,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=case.c,
                                  precision='highest')
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-10)


# --- each convention of the reference, pinned on its own ------------------------------------------------------


def ramp(h=7, w=7):
  """value = 10*y + x at pixel (y, x): a read shows where it sampled."""
  y, x = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  return jnp.asarray((10.0 * y + x)[None, :, :, None])


def one_tap(k, taps=9, ho=7, wo=7):
  return jnp.zeros((1, ho, wo, taps)).at[..., k].set(1.0)


def test_offsets_are_x_then_y():
  off = jnp.zeros((1, 7, 7, 18)).at[..., 4 * 2].set(1.0)  # centre tap: first channel moves x by one pixel
  got = dcnv3(ramp(), off, one_tap(4), kernel_size=3, padding=1)
  assert float(got[0, 3, 3, 0]) == 34.0  # (y, x) = (3, 4), not (4, 3)


def test_taps_are_x_major():
  """Tap k = i*kh + j has column i and row j: tap 1 of a 3x3 kernel is (row 0 + 1, column 0) = left of centre."""
  got = dcnv3(ramp(), jnp.zeros((1, 7, 7, 18)), one_tap(1), kernel_size=3, padding=1)
  assert float(got[0, 3, 3, 0]) == 32.0  # (3, 2); torchvision's row-major tap 1 would read (2, 3) = 23
  got = dcnv3(ramp(), jnp.zeros((1, 7, 7, 6)), one_tap(1, taps=3), kernel_size=(1, 3), padding=(0, 1))
  assert float(got[0, 3, 3, 0]) == 33.0  # kh=1: tap i=1 is the centre column


def test_offset_scale_scales_the_dilation_grid_around_the_centre():
  off = jnp.zeros((1, 7, 7, 18))
  corner = dcnv3(ramp(), off, one_tap(0), kernel_size=3, padding=1, offset_scale=2.0)
  assert float(corner[0, 3, 3, 0]) == 11.0  # (3 - 2, 3 - 2): the grid step is 2, not 1
  centre = dcnv3(ramp(), off, one_tap(4), kernel_size=3, padding=1, offset_scale=2.0)
  assert float(centre[0, 3, 3, 0]) == 33.0  # the centre stays put
  moved = dcnv3(ramp(), off.at[..., 8].set(0.5), one_tap(4), kernel_size=3, padding=1, offset_scale=2.0)
  assert float(moved[0, 3, 3, 0]) == 34.0  # an offset of 0.5 px scaled by 2


def test_sampling_is_centred_on_the_kernel_window():
  """Without padding, output (0, 0) of a 3x3 kernel is centred on input (1, 1); with dilation 2 on (2, 2)."""
  got = dcnv3(ramp(), jnp.zeros((1, 5, 5, 18)), one_tap(4, ho=5, wo=5), kernel_size=3)
  assert float(got[0, 0, 0, 0]) == 11.0
  got = dcnv3(ramp(), jnp.zeros((1, 3, 3, 18)), one_tap(4, ho=3, wo=3), kernel_size=3, dilation=2, offset_scale=3.0)
  assert float(got[0, 0, 0, 0]) == 22.0


def test_remove_center_drops_the_centre_tap():
  """P = kh*kw - 1 points per group; tap 4 is then the first one right of the centre column."""
  with pytest.raises(ValueError, match=r'offsets must have shape .*\(1, 7, 7, 16\)'):
    dcnv3(ramp(), jnp.zeros((1, 7, 7, 18)), one_tap(4), kernel_size=3, padding=1, remove_center=True)
  got = dcnv3(ramp(), jnp.zeros((1, 7, 7, 16)), one_tap(4, taps=8), kernel_size=3, padding=1, remove_center=True)
  assert float(got[0, 3, 3, 0]) == 43.0  # kept tap 4 is (i, j) = (1, 2): centre column, one row down


def test_unequal_padding_follows_the_cuda_kernel():
  """pad (2, 0) pads H by 2 and W by 0 (the CUDA kernels; InternImage's PyTorch path would swap them)."""
  x = ramp(5, 8)
  got = dcnv3(x, jnp.zeros((1, 7, 6, 18)), one_tap(4, ho=7, wo=6), kernel_size=3, padding=(2, 0))
  assert got.shape == (1, 7, 6, 1)
  assert float(got[0, 2, 0, 0]) == 11.0  # output (2, 0) is centred on input (2 - 2 + 1, 0 + 1) = (1, 1)
  assert float(got[0, 0, 0, 0]) == 0.0  # centred on row -1: padding


def test_dcnv4_ignores_the_padding_channels_and_applies_the_mask_unnormalised():
  case = Case(groups=4, c=8)
  x, off, m = make_inputs(case)
  a = dcnv4(x, pack_dcnv4(off, m, 4, 9, fill=0.0), **case.kwargs())
  b = dcnv4(x, pack_dcnv4(off, m, 4, 9, fill=np.nan), **case.kwargs())
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(dcnv4(x, pack_dcnv4(off, 3 * m, 4, 9), **case.kwargs())), 3 * np.asarray(a),
                             rtol=1e-12)
