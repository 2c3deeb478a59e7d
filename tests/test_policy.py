"""deform_conv2d's per-backend execution policy, symbolic-shape export and deterministic gradients.

What every sampling op shares (the accelerator plan's numbers, index blocks, lowerings per platform, deterministic
gradients) is tested once for all of them in test_family.py; this file holds what is deform_conv2d's own: its
memory accounting, the budget scope, symbolic H and W, and the modules and classifiers built on it.

What runs on GPU/TPU is checked two ways on a CPU host: its lowering
(`jax.export(..., platforms=['cuda'|'tpu'])`, the StableHLO read for loops,
sorts and scatters), and its numbers, by forcing the accelerator branch of
`_policy.by_platform` so the CPU executes the very structure a GPU would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax.test_util import check_grads

from deformjax.models import CifarNet, ConvClassifier
from deformjax.nn import DeformConv
from deformjax.ops import _policy, columns_bytes, deform_conv2d
from deformjax.ops._engine import sorted_segment_sum
from tests.test_deform_conv import Case, away_from_integers, make_inputs, op_kwargs


@pytest.fixture
def accelerator_policy(patch_traced):
  """Run the branch that GPU/TPU lowerings get, on this CPU."""
  patch_traced(_policy, 'by_platform', lambda cpu, accelerator, *args: accelerator(*args))


def spec(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def lowered(fn, args, platforms) -> str:
  return export.export(jax.jit(fn), platforms=platforms)(*args).mlir_module()


def num_loops(module: str) -> int:
  return module.count('stablehlo.while')


def conv_specs(n, hw, c, dtype=jnp.float32):
  return (spec((n, hw, hw, c), dtype), spec((n, hw, hw, 18), dtype), spec((3, 3, c, c), dtype),
          spec((n, hw, hw, 9), dtype))


def conv(**kw):
  return lambda x, o, w, m: deform_conv2d(x, o, w, m, padding=1, **kw)


def fwd_bwd(**kw):
  return jax.grad(lambda *a: jnp.sum(conv(**kw)(*a)), argnums=(0, 1, 2, 3))


# --- the policy, read off the lowerings -------------------------------------------------------


def test_accelerators_block_beyond_the_budget():
  """N=256, 56x56x256 is 7.4 GB of float32 columns: past the 1 GiB default the op loops over blocks."""
  assert num_loops(lowered(conv(), conv_specs(256, 56, 256), ['cuda'])) >= 1
  args = conv_specs(64, 56, 128)
  assert num_loops(lowered(conv(memory_budget=256 * 2**20), args, ['cuda'])) >= 1
  assert num_loops(lowered(conv(chunk_size=4096), args, ['tpu'])) >= 1  # chunk_size caps every platform


def test_small_problems_need_no_platform_switch():
  """Where both policies give one pass, the op is traced once: a 2-platform export is no larger than a 1-platform one."""
  args = conv_specs(2, 7, 8)
  both = lowered(conv(), args, ['cpu', 'cuda'])
  assert num_loops(both) == 0
  assert both.count('stablehlo.gather') == lowered(conv(), args, ['cuda']).count('stablehlo.gather') > 0


def test_columns_bytes_follows_the_policy():
  shapes = ((64, 56, 56, 128), (3, 3, 128, 128), (64, 56, 56, 18))
  full = 64 * 56 * 56 * 9 * 128 * 4
  assert columns_bytes(*shapes, platform='gpu') == full
  assert columns_bytes(*shapes, platform='tpu', memory_budget=full // 4) <= full // 4
  assert columns_bytes(*shapes, platform='cpu') <= _policy.CPU_CHUNK_BYTES
  assert columns_bytes(*shapes, platform='cpu', chunk_size=1024) == 1024 * 9 * 128 * 4
  assert columns_bytes(*shapes, platform='gpu', chunk_size=1024) == 1024 * 9 * 128 * 4


def test_pixels_per_pass():
  assert _policy.pixels_per_pass(1024, None, None, 'cpu') == _policy.CPU_CHUNK_BYTES // 1024
  assert _policy.pixels_per_pass(1024, 7, None, 'cpu') == 7  # explicit chunk replaces the cache-sized one
  assert _policy.pixels_per_pass(1024, None, None, 'accelerator') == _policy.DEFAULT_ACCELERATOR_MEMORY_BUDGET // 1024
  assert _policy.pixels_per_pass(1024, None, 10 * 1024, 'accelerator') == 10
  assert _policy.pixels_per_pass(1024, 5, 10 * 1024, 'accelerator') == 5
  assert _policy.pixels_per_pass(1024, 50, 10 * 1024, 'cpu') == 10


def test_the_budget_context_applies_to_what_is_traced_inside():
  """Also the compiled op's cache key: the same shapes inside and outside the scope give two programs."""
  from deformjax.ops import accelerator_memory_budget

  args = conv_specs(64, 56, 128)
  with accelerator_memory_budget(64 * 2**20):
    assert num_loops(lowered(conv(), args, ['cuda'])) >= 1
    assert num_loops(lowered(conv(memory_budget=2**31), args, ['cuda'])) == 0  # the argument wins
  assert num_loops(lowered(conv(), args, ['cuda'])) == 0
  assert _policy.current_accelerator_memory_budget() == _policy.DEFAULT_ACCELERATOR_MEMORY_BUDGET == 2**30
  with pytest.raises(ValueError, match='nbytes must be a positive int'), accelerator_memory_budget(0):
    pass


# --- each op one compiled program (`_policy.jit_core`) ---------------------------------------------


def pjit_calls(fn, *args) -> list[str]:
  return [e.params['name'] for e in jax.make_jaxpr(fn)(*args).eqns if e.primitive.name in ('pjit', 'jit')]


def test_an_op_is_one_compiled_call_traced_inline_by_exporters():
  x, off, w, m, b, _ = make_inputs(Case())
  call = lambda *a: deform_conv2d(*a, padding=1)
  assert pjit_calls(call, x, off, w, m, b) == ['deform_conv2d']
  with _policy.single_pass():  # what an exporter (ONNX) traces: the op's own primitives, no nested call
    # (a new function: make_jaxpr caches traces by function, and the scope is not part of that key)
    assert 'deform_conv2d' not in pjit_calls(lambda *a: deform_conv2d(*a, padding=1), x, off, w, m, b)
  eager = deform_conv2d(x, off, w, m, b, padding=[1, 1])  # a list where jit needs a hashable static argument
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(jax.jit(call)(x, off, w, m, b)))


def test_static_arguments_are_compared_with_their_type():
  """jit compares static arguments by `==`, and `True == 1`: a bool must still reach the op's own check."""
  x, off, w, m, b, _ = make_inputs(Case())
  deform_conv2d(x, off, w, m, b, padding=1, groups=1)
  with pytest.raises(ValueError, match='groups must be a positive int, got True'):
    deform_conv2d(x, off, w, m, b, padding=1, groups=True)
  with pytest.raises(TypeError, match="deform_conv2d\\(\\) got an unexpected keyword argument 'stride'"):
    deform_conv2d(x, off, w, m, b, stride=1)  # Python's own error, with the op's name


# --- the accelerator structure gives the same numbers -------------------------------------------


# Slow tier: the fast tier checks the accelerator plan's first-order gradients against the reference for every op
# (test_family) and second order on the CPU plan (test_deform_conv).
@pytest.mark.slow
def test_accelerator_policy_gradients_order2(accelerator_policy):
  case = Case(n=1, hw=(4, 4), c=2, cout=2)
  x, off, w, m, b, _ = make_inputs(case)
  check_grads(jax.jit(lambda *a: deform_conv2d(*a, **op_kwargs(case))), (x, away_from_integers(off), w, m, b),
              order=2, modes=('fwd', 'rev'), atol=1e-6, rtol=1e-6)


# --- symbolic shapes --------------------------------------------------------------------------


def random_problem(n, h, w, c=4, cout=6, seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return (f32(rng.normal(size=(n, h, w, c))), f32(rng.uniform(-3, 3, size=(n, h, w, 18))),
          f32(rng.normal(size=(3, 3, c, cout)) / 6), f32(rng.uniform(size=(n, h, w, 9))))


@pytest.mark.parametrize('dims', ['b, 7, 6', 'b, h, w'])
@pytest.mark.parametrize('kw', [dict(padding=1), dict(padding='SAME', chunk_size=16), dict(padding=1, chunk_size=5)],
                         ids=['policy', 'same-chunked', 'chunked'])
def test_symbolic_export_round_trip(dims, kw):
  """Serialised with a symbolic batch (and H, W), deserialised, run at two sizes: the concrete op's numbers."""
  b, h, w = export.symbolic_shape(dims)
  c, cout = 4, 6
  f = jax.jit(lambda x, o, k, m: deform_conv2d(x, o, k, m, precision='highest', **kw))
  exp = export.export(f)(spec((b, h, w, c)), spec((b, h, w, 18)), spec((3, 3, c, cout)), spec((b, h, w, 9)))
  restored = export.deserialize(exp.serialize())
  sizes = [(1, 7, 6), (9, 7, 6)] if dims.endswith('7, 6') else [(1, 7, 6), (5, 11, 4)]
  for n, hh, ww in sizes:
    args = random_problem(n, hh, ww, c, cout, seed=n)
    np.testing.assert_allclose(np.asarray(restored.call(*args)), np.asarray(f(*args)), rtol=1e-5, atol=1e-5)


def test_symbolic_export_of_the_gradient():
  (b,) = export.symbolic_shape('b')
  g = jax.jit(jax.grad(lambda *a: jnp.sum(deform_conv2d(*a, padding=1, precision='highest') ** 2),
                       argnums=(0, 1, 2, 3)))
  exp = export.deserialize(export.export(g)(*conv_specs(b, 6, 4)).serialize())
  for n in (1, 4):
    args = random_problem(n, 6, 6, 4, 4, seed=n)
    for got, want in zip(exp.call(*args), g(*args)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_symbolic_export_lowers_for_accelerators(platform):
  """With the batch unknown until run time, the accelerator lowering keeps it symbolic and carries both plans (one
  pass, budget-sized blocks) behind a run-time switch on the batch."""
  (b,) = export.symbolic_shape('b')
  exp = export.export(jax.jit(fwd_bwd()), platforms=[platform])(*conv_specs(b, 56, 128))
  module = exp.mlir_module()
  assert exp.platforms == (platform,)
  assert 'tensor<?x56x56x128xf32>' in module
  assert 'stablehlo.case' in module and num_loops(module) >= 1


@pytest.mark.parametrize('build,shape', [
    (lambda: DeformConv(3, 8, 3, rngs=nnx.Rngs(0)), (16, 16, 3)),
    (lambda: ConvClassifier(1, 10, deformable=2, modulated=True, rngs=nnx.Rngs(0)), (28, 28, 1)),
    pytest.param(lambda: CifarNet(3, 10, deformable='all', rngs=nnx.Rngs(0)), (32, 32, 3), marks=pytest.mark.slow),
], ids=['DeformConv', 'ConvClassifier', 'CifarNet'])
def test_symbolic_batch_module_and_classifier_export(build, shape):
  (b,) = export.symbolic_shape('b')
  graphdef, state = nnx.split(build())
  apply = jax.jit(lambda x: nnx.merge(graphdef, state)(x))  # weights baked in, as for serving
  restored = export.deserialize(export.export(apply)(spec((b,) + shape)).serialize())
  for n in (1, 3):
    x = jnp.asarray(np.random.default_rng(n).uniform(size=(n,) + shape), jnp.float32)
    np.testing.assert_allclose(np.asarray(restored.call(x)), np.asarray(apply(x)), rtol=1e-5, atol=1e-5)


# --- deterministic gradients ------------------------------------------------------------------


def test_sorted_segment_sum_equals_segment_sum():
  rng = np.random.default_rng(0)
  values = jnp.asarray(rng.normal(size=(500, 3)))
  ids = jnp.asarray(rng.integers(-3, 45, size=500), jnp.int32)  # some dropped, some segments empty
  got = jax.jit(sorted_segment_sum, static_argnums=2)(values, ids, 40)
  want = jax.ops.segment_sum(values, ids, 40)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)
  assert sorted_segment_sum(values[:0], ids[:0], 4).shape == (4, 3)


@pytest.mark.slow
def test_deterministic_supports_second_order_reverse_mode_and_vmap(accelerator_policy):
  """The sorted-sum backward differentiates again, and vmaps: per-example gradients equal each example's own
  (forward-mode refusal and equality with the default gradients, fast:
  test_family.py::test_deterministic_gradients_equal_the_default)."""
  case = Case(n=1, hw=(4, 4), c=2, cout=2)
  x, off, w, m, b, _ = make_inputs(case)
  f = lambda *a: deform_conv2d(*a, **op_kwargs(case), deterministic_gradients=True)
  check_grads(f, (x, away_from_integers(off), w, m, b), order=2, modes=('rev',), atol=1e-6, rtol=1e-6)
  x, off, w, m, b, _ = make_inputs(Case(n=2, hw=(4, 4), c=2, cout=2))
  g = jax.grad(lambda x, o, mm: jnp.sum(jnp.sin(deform_conv2d(x[None], o[None], w, mm[None], b, **op_kwargs(case),
                                                              deterministic_gradients=True))))
  vm = jax.vmap(g)(x, off, m)
  for i in range(2):
    np.testing.assert_allclose(np.asarray(vm[i]), np.asarray(g(x[i], off[i], m[i])), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('override,message', [
    (dict(memory_budget=0), 'memory_budget must be a positive int or None'),
    (dict(memory_budget=1.5), 'memory_budget must be a positive int or None'),
    (dict(deterministic_gradients='yes'), 'deterministic_gradients must be a bool'),
])
def test_bad_policy_arguments(override, message):
  x, off, w, m = random_problem(1, 5, 5)
  with pytest.raises(TypeError if 'bool' in message else ValueError, match=message):
    deform_conv2d(x, off, w, m, padding=1, **override)
