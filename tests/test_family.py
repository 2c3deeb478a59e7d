"""What every sampling op shares: gradients, transforms, batch 0, low precision, hostile points, errors, the
per-backend execution policy, deterministic gradients and export.

Each test runs for deform_conv2d, dcnv3, dcnv4 and ms_deform_attn through one small description of the op (`Op`),
so a property of the shared sampling core is stated once. What only one op has (deform_conv2d's geometry sweep
against lax.conv, the family's reference conventions) lives in that op's own test file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.test_util import check_grads

from deformjax.ops import (
  _engine,
  _policy,
  bilinear_sample,
  dcnv3,
  dcnv4,
  deform_conv2d,
  deform_roi_pool,
  ms_deform_attn,
  offset_mask_channels,
  roi_align,
)
from tests.reference import dcnv3_ref, dcnv4_split, deform_conv2d_ref, ms_deform_attn_ref

DCN_KW = dict(kernel_size=3, padding=1, groups=2, offset_scale=1.0)
CONV_KW = dict(padding=1, groups=2, offset_groups=2)  # weight groups and offset groups both split the channels
LEVELS = ((4, 3), (2, 2))


def _frac(rng, shape):
  """Values >= 0.2 from any integer (away from the kinks of bilinear interpolation)."""
  return rng.integers(-2, 3, size=shape) + rng.uniform(0.2, 0.8, size=shape)


@dataclasses.dataclass(frozen=True)
class Op:
  name: str
  make: Callable  # (n, rng) -> tuple of float64 numpy arrays
  call: Callable  # (*arrays, **policy) -> jax.Array
  ref: Callable  # (*arrays) -> float64 numpy array
  coords: int  # index of the array that holds sampling positions
  coord_slice: tuple = (Ellipsis,)  # the positions inside it
  unbatched: tuple = ()  # indices of the arrays without a batch dimension (a kernel)

  def __str__(self):
    return self.name


def _dcnv3_make(n, rng, hw=(5, 4), c=4, groups=2):
  x = rng.normal(size=(n, *hw, c))
  return x, _frac(rng, (n, *hw, groups * 18)), rng.uniform(-0.5, 1.5, size=(n, *hw, groups * 9))


def _conv_make(n, rng, hw=(5, 4), c=4, cout=4):
  x = rng.normal(size=(n, *hw, c))
  kernel = rng.normal(size=(3, 3, c // 2, cout)) / 6
  return x, _frac(rng, (n, *hw, 2 * 18)), kernel, rng.uniform(-0.5, 1.5, size=(n, *hw, 2 * 9))


def _dcnv4_make(n, rng):
  x, off, m = _dcnv3_make(n, rng)
  per_group = np.concatenate([off.reshape(off.shape[:3] + (2, 18)), m.reshape(m.shape[:3] + (2, 9))], -1)
  om = per_group.reshape(off.shape[:3] + (54,))
  pad = offset_mask_channels(2, 9) - 54
  return x, np.concatenate([om, rng.normal(size=om.shape[:3] + (pad,))], -1)


def _msda_make(n, rng, lq=5, heads=2, d=3, points=2):
  value = rng.normal(size=(n, sum(h * w for h, w in LEVELS), heads, d))
  size = np.array([[w, h] for h, w in LEVELS], np.float64)[:, None, :]  # [L, 1, 2] as (x, y)
  pix = _frac(rng, (n, lq, heads, len(LEVELS), points, 2)) + size // 2
  return value, (pix + 0.5) / size, rng.uniform(-0.5, 1.5, size=(n, lq, heads, len(LEVELS), points))


OPS = [
    Op('deform_conv2d', _conv_make, lambda x, o, w, m, **kw: deform_conv2d(x, o, w, m, **CONV_KW, **kw),
       lambda x, o, w, m: deform_conv2d_ref(x, o, w, m, pads=((1, 1), (1, 1)), groups=2, offset_groups=2), coords=1,
       unbatched=(2,)),
    Op('dcnv3', _dcnv3_make, lambda x, o, m, **kw: dcnv3(x, o, m, **DCN_KW, **kw),
       lambda x, o, m: dcnv3_ref(x, o, m, kernel=(3, 3), pads=(1, 1), groups=2), coords=1),
    Op('dcnv4', _dcnv4_make, lambda x, om, **kw: dcnv4(x, om, **DCN_KW, **kw),
       lambda x, om: dcnv3_ref(x, *dcnv4_split(om, 2, 9), kernel=(3, 3), pads=(1, 1), groups=2), coords=1,
       coord_slice=(Ellipsis, slice(0, 18))),
    Op('ms_deform_attn', _msda_make, lambda v, loc, a, **kw: ms_deform_attn(v, LEVELS, loc, a, **kw),
       lambda v, loc, a: ms_deform_attn_ref(v, LEVELS, loc, a), coords=1),
]


# Tests that compile several programs per op run deform_conv2d and ms_deform_attn in the fast tier, and dcnv3 and
# dcnv4 in the slow tier only: the two run the same sampling core as deform_conv2d (one plan, one pass, the same
# gradients) and differ from each other only in the offset layout, which their float64 references (fast, here and in
# test_dcnv3.py) pin.
HEAVY = [pytest.param(op, marks=pytest.mark.slow) if op.name in ('dcnv3', 'dcnv4') else op for op in OPS]


def inputs(op: Op, n=2, dtype=jnp.float64, seed=0):
  return tuple(jnp.asarray(a, dtype) for a in op.make(n, np.random.default_rng(seed)))


@pytest.fixture
def accelerator_policy(patch_traced):
  """Run the branch that GPU/TPU lowerings get, on this CPU."""
  patch_traced(_policy, 'by_platform', lambda cpu, accelerator, *args: accelerator(*args))


def loss(op, **kw):
  return lambda *a: jnp.sum(jnp.sin(op.call(*a, **kw)))


def grads(op, args, **kw):
  return jax.grad(loss(op, **kw), argnums=tuple(range(len(args))))(*args)


# --- values and gradients ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('op', OPS, ids=str)
def test_matches_float64_reference_in_passes(op):
  args = inputs(op, n=3)
  want = op.ref(*args)
  for kw in (dict(), dict(chunk_size=4), dict(chunk_size=1)):
    np.testing.assert_allclose(np.asarray(jax.jit(lambda *a, kw=kw: op.call(*a, **kw))(*args)), want, rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize('op', HEAVY, ids=str)
def test_gradients_order1_fwd_and_rev(op):
  check_grads(jax.jit(lambda *a: op.call(*a, chunk_size=7)), inputs(op, n=1), order=1, modes=('fwd', 'rev'),
              atol=1e-6, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('op', OPS, ids=str)
def test_gradients_order2_fwd_and_rev(op):
  check_grads(jax.jit(lambda *a: op.call(*a, chunk_size=7)), inputs(op, n=1), order=2, modes=('fwd', 'rev'),
              atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('op', HEAVY, ids=str)
def test_vmap_equals_loop(op):
  stacked = [jnp.stack(a) for a in zip(*(inputs(op, seed=s) for s in range(3)))]
  got = jax.vmap(lambda *a: op.call(*a, chunk_size=6))(*stacked)
  for i in range(3):
    np.testing.assert_allclose(np.asarray(got[i]), np.asarray(op.call(*(a[i] for a in stacked))), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize('op', HEAVY, ids=str)
def test_jvp_remat_and_grad_agree(op):
  args = inputs(op)
  tangents = inputs(op, seed=1)
  f = lambda *a: op.call(*a, chunk_size=5)
  _, jvp_out = jax.jvp(f, args, tangents)
  _, vjp = jax.vjp(f, *args)
  cot = jnp.asarray(np.random.default_rng(2).normal(size=jvp_out.shape))
  # <J t, c> == <t, J^T c>
  lhs = jnp.sum(jvp_out * cot)
  rhs = sum(jnp.sum(t * g) for t, g in zip(tangents, vjp(cot)))
  np.testing.assert_allclose(float(lhs), float(rhs), rtol=1e-10)
  remat = jax.grad(lambda *a: jnp.sum(jnp.sin(jax.checkpoint(f)(*a))), argnums=(0, 1))(*args)
  plain = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1))(*args)
  for a, b in zip(remat, plain):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('op', HEAVY, ids=str)
def test_batch_zero(op):
  args = inputs(op, n=0)
  out = jax.jit(op.call)(*args)
  assert out.shape == (0,) + op.call(*inputs(op, n=1)).shape[1:]
  g = grads(op, args)
  assert all(gi.shape == a.shape for gi, a in zip(g, args))
  assert all(not np.any(np.asarray(g[i])) for i in op.unbatched)  # no example, no gradient for a kernel


def _z(*shape, dtype=jnp.float32):
  return jnp.zeros(shape, dtype)


# Every public op on an input with nothing to sample: (call, arrays, result shape, result dtype, the bias the result
# holds, or None for zeros).
EMPTY = {
    'bilinear_sample-no-batch': (bilinear_sample, (_z(0, 4, 4, 2, dtype=jnp.bfloat16), _z(0, 5, 2)), (0, 5, 2),
                                 jnp.bfloat16, None),
    'bilinear_sample-no-point': (bilinear_sample, (_z(2, 4, 4, 2), _z(2, 0, 2)), (2, 0, 2), jnp.float32, None),
    'deform_conv2d-no-batch': (lambda x, o, w: deform_conv2d(x, o, w, padding=1),
                               (_z(0, 6, 6, 4), _z(0, 6, 6, 18), _z(3, 3, 4, 6)), (0, 6, 6, 6), jnp.float32, None),
    'deform_conv2d-no-pixel-read': (lambda x, o, w, b: deform_conv2d(x, o, w, bias=b, padding=1),
                                    (_z(1, 0, 0, 4, dtype=jnp.bfloat16), _z(1, 2, 2, 2), _z(1, 1, 4, 3),
                                     jnp.arange(1.0, 4.0)), (1, 2, 2, 3), jnp.float32, jnp.arange(1.0, 4.0)),
    'deform_conv2d-no-channel': (lambda x, o, w, b: deform_conv2d(x, o, w, bias=b, padding=1,
                                                                  preferred_element_type=jnp.bfloat16),
                                 (_z(2, 5, 5, 0), _z(2, 5, 5, 18), _z(3, 3, 0, 2), jnp.array([2.0, -1.0])),
                                 (2, 5, 5, 2), jnp.bfloat16, jnp.array([2.0, -1.0])),
    'dcnv3-no-batch': (lambda x, o, m: dcnv3(x, o, m, kernel_size=3, padding=1),
                       (_z(0, 5, 5, 4, dtype=jnp.float16), _z(0, 5, 5, 18), _z(0, 5, 5, 9)), (0, 5, 5, 4),
                       jnp.float16, None),
    'dcnv3-no-channel': (lambda x, o, m: dcnv3(x, o, m, kernel_size=3, padding=1),
                         (_z(1, 5, 5, 0), _z(1, 5, 5, 18), _z(1, 5, 5, 9)), (1, 5, 5, 0), jnp.float32, None),
    'dcnv4-no-batch': (lambda x, om: dcnv4(x, om, kernel_size=3, padding=1, groups=2),
                       (_z(0, 5, 5, 8), _z(0, 5, 5, offset_mask_channels(2, 9))), (0, 5, 5, 8), jnp.float32, None),
    'ms_deform_attn-no-query': (lambda v, loc, a: ms_deform_attn(v, LEVELS, loc, a),
                                (_z(2, 16, 2, 3), _z(2, 0, 2, 2, 2, 2), _z(2, 0, 2, 2, 2)), (2, 0, 6), jnp.float32,
                                None),
    'ms_deform_attn-no-point': (lambda v, loc, a: ms_deform_attn(v, LEVELS, loc, a),
                                (_z(2, 16, 2, 3, dtype=jnp.bfloat16), _z(2, 5, 2, 2, 0, 2), _z(2, 5, 2, 2, 0)),
                                (2, 5, 6), jnp.bfloat16, None),
    'deform_roi_pool-no-roi': (lambda f, r, o: deform_roi_pool(f, r, o, output_size=2),
                               (_z(1, 8, 8, 3), _z(0, 5), _z(0, 2, 2, 2)), (0, 2, 2, 3), jnp.float32, None),
    'roi_align-no-image': (lambda f, r: roi_align(f, r, output_size=(2, 3)),
                           (_z(0, 8, 8, 3, dtype=jnp.bfloat16), jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])), (1, 2, 3, 3),
                           jnp.bfloat16, None),
}


@pytest.mark.parametrize('case', EMPTY)
def test_nothing_to_sample_gives_zeros_or_the_bias_without_compiling_a_pass(case):
  """Zero batch, points, queries, RoIs, channels or input pixels: the result's shape and dtype, zeros (plus the
  bias), under jit as eagerly, and no sampling core in the traced program."""
  call, arrays, shape, dtype, bias = EMPTY[case]
  want = np.zeros(shape, np.float32) + (0.0 if bias is None else np.asarray(bias, np.float32))
  for out in (jax.jit(call)(*arrays), call(*arrays)):
    assert out.shape == shape and out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), want)
  jaxpr = jax.make_jaxpr(call)(*arrays)
  assert not [e for e in jaxpr.eqns if e.primitive.name in ('pjit', 'jit')], jaxpr


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize('op', HEAVY, ids=str)
def test_half_precision_accumulates_in_float32(op, dtype):
  """The result is the float32 computation on the same (rounded) inputs, rounded once to the half dtype."""
  low = inputs(op, dtype=dtype)
  out = jax.jit(op.call)(*low)
  assert out.dtype == dtype
  want = op.call(*(a.astype(jnp.float32) for a in low))
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np.asarray(want), rtol=eps, atol=eps)
  g = grads(op, low)
  assert all(gi.dtype == dtype and bool(jnp.all(jnp.isfinite(gi.astype(jnp.float32)))) for gi in g)


@pytest.mark.parametrize('op', OPS, ids=str)
def test_hostile_points_read_zero_with_finite_gradients(op):
  args = list(inputs(op))
  coords = np.array(args[op.coords])
  view = coords[op.coord_slice]
  flat = view.reshape(-1)
  picks = np.random.default_rng(4).choice(flat.size, size=12, replace=False)
  flat[picks] = [np.nan, np.inf, -np.inf, 1e30, -1e30, 1e300] * 2
  coords[op.coord_slice] = flat.reshape(view.shape)
  args[op.coords] = jnp.asarray(coords)
  got = op.call(*args)
  np.testing.assert_allclose(np.asarray(got), op.ref(*args), rtol=1e-10, atol=1e-10)
  g = grads(op, args)
  assert all(bool(jnp.all(jnp.isfinite(gi))) for gi in g)
  # A point that reads zero does not move: its coordinates get no gradient.
  hostile = np.asarray(g[op.coords])[op.coord_slice].reshape(-1)[picks]
  np.testing.assert_array_equal(hostile, 0)
  # float32 too: 1e30 * size does not overflow into a non-finite index.
  g32 = grads(op, [a.astype(jnp.float32) for a in args])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in g32)


# --- errors -----------------------------------------------------------------------------------------------------

x, o, m = (jnp.zeros(s) for s in ((1, 5, 4, 4), (1, 5, 4, 36), (1, 5, 4, 18)))
om = jnp.zeros((1, 5, 4, 56))
v, loc, attn = (jnp.zeros(s) for s in ((1, 16, 2, 3), (1, 5, 2, 2, 2, 2), (1, 5, 2, 2, 2)))
ERRORS = [
    (lambda: dcnv3(x[0], o, m, **DCN_KW), ValueError, r'dcnv3: inputs must have rank 4 \(\[N, H, W, C\]\)'),
    (lambda: dcnv3(x, o[..., :30], m, **DCN_KW), ValueError,
     r'dcnv3: offsets must have shape \[N, Ho, Wo, groups\*P\*2\] = \(1, 5, 4, 36\), got \(1, 5, 4, 30\)'),
    (lambda: dcnv3(x, o, m[..., :9], **DCN_KW), ValueError,
     r'dcnv3: mask must have shape \[N, Ho, Wo, groups\*P\] = \(1, 5, 4, 18\), got \(1, 5, 4, 9\)'),
    (lambda: dcnv3(x, o, m, **{**DCN_KW, 'groups': 3}), ValueError, r'C=4 must be divisible by groups=3'),
    (lambda: dcnv3(x, o, m, **{**DCN_KW, 'kernel_size': 0}), ValueError, r'kernel_size must be positive'),
    (lambda: dcnv3(x, o, m, **{**DCN_KW, 'offset_scale': 'big'}), TypeError, r'offset_scale must be a real number'),
    (lambda: dcnv3(x, o, m, **{**DCN_KW, 'remove_center': 1}), TypeError, r'remove_center must be a bool'),
    (lambda: dcnv3(x.astype(jnp.int32), o, m, **DCN_KW), TypeError, r'inputs must be a floating-point array'),
    (lambda: dcnv3(x, o, m, **DCN_KW, chunk_size=0), ValueError, r'chunk_size must be a positive int or None'),
    (lambda: dcnv3(x, o, m, **DCN_KW, deterministic_gradients='yes'), TypeError,
     r'deterministic_gradients must be a bool'),
    (lambda: dcnv4(x, om[..., :54], **DCN_KW), ValueError,
     r'dcnv4: offset_mask must have shape \[N, Ho, Wo, ceil8\(groups\*P\*3\)\] = \(1, 5, 4, 56\), got \(1, 5, 4, 54\)'),
    (lambda: dcnv4(x, om, **{**DCN_KW, 'padding': 'FULL'}), ValueError, r"dcnv4: padding must be 'SAME', 'VALID'"),
    (lambda: ms_deform_attn(v, ((4, 3),), loc, attn), ValueError,
     r'ms_deform_attn: value must have shape \[N, sum\(H_l\*W_l\), M, D\] = \[N, 12, M, D\]'),
    (lambda: ms_deform_attn(v, ((4, 3), (0, 4)), loc, attn), ValueError, r'spatial_shapes must be a non-empty'),
    (lambda: ms_deform_attn(v, LEVELS, loc[..., :1], attn), ValueError,
     r'sampling_locations must have shape \[N, Lq, M, L, P, 2\] = \(1, 5, 2, 2, 2, 2\), got \(1, 5, 2, 2, 2, 1\)'),
    (lambda: ms_deform_attn(v, LEVELS, loc, attn[..., :1]), ValueError,
     r'attention_weights must have shape \[N, Lq, M, L, P\] = \(1, 5, 2, 2, 2\), got \(1, 5, 2, 2, 1\)'),
    (lambda: jax.jit(lambda s: ms_deform_attn(v, s, loc, attn))(jnp.asarray(LEVELS)), TypeError,
     r'spatial_shapes must be static'),
]


@pytest.mark.parametrize('call,error,message', ERRORS, ids=lambda e: e if isinstance(e, str) else None)
def test_errors_name_the_argument_and_shape(call, error, message):
  with pytest.raises(error, match=message) as info:
    call()
  assert '\n' not in str(info.value)


# --- the execution policy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('op', HEAVY, ids=str)
def test_accelerator_policy_matches_reference(op, accelerator_policy):
  args = inputs(op, n=3)
  want = op.ref(*args)
  want_grads = grads(op, args)
  for kw in (dict(), dict(memory_budget=3000), dict(chunk_size=4)):  # one pass, equal blocks, capped passes
    np.testing.assert_allclose(np.asarray(op.call(*args, **kw)), want, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads(op, args, **kw), want_grads):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('op', HEAVY, ids=str)
def test_index_blocks_do_not_change_result_or_gradient(op, patch_traced):
  args = inputs(op, n=3)
  want, want_grads = op.call(*args, chunk_size=4), grads(op, args, chunk_size=4)
  patch_traced(_engine, 'INDEX_BLOCK_BYTES', 1)  # one chunk per block: several blocks, the last padded
  np.testing.assert_allclose(np.asarray(op.call(*args, chunk_size=4)), np.asarray(want), rtol=1e-12, atol=1e-12)
  for a, b in zip(grads(op, args, chunk_size=4), want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize('op', HEAVY, ids=str)
def test_deterministic_gradients_equal_the_default(op, accelerator_policy):
  args = inputs(op)
  for a, b in zip(grads(op, args, deterministic_gradients=True, chunk_size=5), grads(op, args)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(lambda *a: op.call(*a, deterministic_gradients=True), args, args)


def lowered(fn, args, platforms) -> str:
  return export.export(jax.jit(fn), platforms=platforms)(*args).mlir_module()


def scatter_bodies(module: str) -> list[str]:
  return re.findall(r'"stablehlo\.scatter"\(.*?\(\{(.*?)\}\)', module, flags=re.S)


def specs(op, n=2, dtype=jnp.float32):
  return [jax.ShapeDtypeStruct(a.shape, dtype) for a in inputs(op, n=n)]


@pytest.mark.parametrize('op', HEAVY, ids=str)
def test_lowerings_follow_the_target_platform(op):
  """Past the CPU chunk, CPU lowers to a loop over chunks, CUDA and TPU to one pass; the deterministic CUDA
  gradient is a sort with no scatter-add left."""
  big = specs(op, n=2048)
  fwd_bwd = lambda **kw: jax.grad(loss(op, **kw), argnums=tuple(range(len(big))))
  cpu = lowered(op.call, big, ['cpu'])
  assert 'stablehlo.while' in cpu
  # An export for several platforms carries each platform's structure.
  assert lowered(op.call, big, ['cpu', 'cuda']).count('stablehlo.while') == cpu.count('stablehlo.while')
  for platform in ('cuda', 'tpu'):
    module = lowered(fwd_bwd(), big, [platform])
    assert 'stablehlo.while' not in module
    assert any('add' in body for body in scatter_bodies(module))
  det = lowered(fwd_bwd(deterministic_gradients=True), big, ['cuda'])
  assert 'stablehlo.sort' in det and scatter_bodies(det) and not any('add' in b for b in scatter_bodies(det))
  assert 'stablehlo.sort' not in lowered(fwd_bwd(deterministic_gradients=True), big, ['cpu'])
  # A budget smaller than the sampled values splits the accelerator pass into blocks.
  assert 'stablehlo.while' in lowered(lambda *a: op.call(*a, memory_budget=2**16), big, ['cuda'])


@pytest.mark.parametrize('op', HEAVY, ids=str)
def test_symbolic_batch_export_round_trip(op):
  args = inputs(op, n=3, dtype=jnp.float32)
  (b,) = export.symbolic_shape('b')
  shapes = [jax.ShapeDtypeStruct(a.shape if i in op.unbatched else (b,) + a.shape[1:], a.dtype)
            for i, a in enumerate(args)]
  exp = export.deserialize(export.export(jax.jit(op.call), platforms=['cpu', 'cuda'])(*shapes).serialize())
  for n in (3, 1):
    part = [a if i in op.unbatched else a[:n] for i, a in enumerate(args)]
    np.testing.assert_allclose(np.asarray(exp.call(*part)), np.asarray(op.call(*part)), rtol=1e-6, atol=1e-6)
  grad_exp = export.export(jax.jit(jax.grad(loss(op))), platforms=['cpu'])(*shapes)
  np.testing.assert_allclose(np.asarray(grad_exp.call(*args)), np.asarray(jax.grad(loss(op))(*args)), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.skipif(jax.default_backend() == 'cpu', reason='atomics only exist on an accelerator backend')
@pytest.mark.parametrize('op', OPS, ids=str)
def test_deterministic_gradients_are_bit_identical_on_this_accelerator(op):
  """Many points sample the same few pixels: atomic float adds land in varying order, the sorted sum does not."""
  args = list(inputs(op, n=16, dtype=jnp.float32))
  args[op.coords] = jnp.full_like(args[op.coords], 0.5 if op.name == 'ms_deform_attn' else 0.25)
  grad = lambda det: jax.jit(jax.grad(lambda a: jnp.sum(op.call(a, *args[1:], deterministic_gradients=det) ** 2)))
  det = grad(True)
  first = np.asarray(det(args[0]))
  for _ in range(5):
    np.testing.assert_array_equal(np.asarray(det(args[0])), first)
  np.testing.assert_allclose(first, np.asarray(grad(False)(args[0])), rtol=1e-4, atol=1e-4 * np.abs(first).max())
